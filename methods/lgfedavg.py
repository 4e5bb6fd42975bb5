"""LG-FedAvg: the lower (representation) layers stay local, the upper layers are averaged."""

from __future__ import annotations

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import declared_path, keys_of_module, local_partition
from pflbench.partition import Partition


class LGFedAvg(Method):
    """Local representation (lower layers), global upper layers; all trained jointly.

    Paper: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
    Globally: Federated Learning with Local and Global Representations", arXiv 2001.01523 (2020).

    The private part is the module the model declares at ``lower_path``: the encoder stem for the
    U-Nets (``encoder.0`` of ``unet``, the stem conv of a timm encoder), never found by name. The
    rest (deeper encoder, decoder, head, and their BN statistics) is averaged. Deviation: the paper
    learns its local representations with auxiliary (e.g. adversarial) objectives in some
    experiments; here the whole model is trained with the suite's loss only. An empty lower part
    is refused with a PartitionError in ``setup``. Evaluated model: the client's own stem + the
    shared rest; no global model for an unseen site. No extra local passes; optimizer state reset
    every round.
    """

    name = "lgfedavg"
    paper = "Liang et al., arXiv:2001.01523"

    def partition(self, model: nn.Module) -> Partition:
        path = declared_path(model, "lower_path", self.name)
        return local_partition(
            model, keys_of_module(model, path), self.name, f"lower layers at {path!r}"
        )

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None
