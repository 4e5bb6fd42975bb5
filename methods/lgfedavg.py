"""LG-FedAvg: the representation stays local, the upper layers are averaged."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import declared_path, keys_of_module, local_partition
from pflbench.params import Param
from pflbench.partition import Partition


class LGFedAvg(Method):
    """Local representation (most of the network), global upper layers; all trained jointly.

    Paper: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think Locally, Act
    Globally: Federated Learning with Local and Global Representations", arXiv 2001.01523 (2020).
    Checked against the official code (pliang279/LG-FedAvg, ``main_lg.py``) and PFLlib's
    ``clientlg``/``serverlg``.

    What is private. The paper's local part is the representation learner, the global part the
    layers on top of it. The official code shares only the last ``num_layers_keep`` weight
    groups of its networks and keeps local everything below them, which is 84–95 % of the
    parameters in its models; PFLlib shares only the head. For a U-Net there are two honest
    readings, chosen with ``local``:

    - ``encoder`` (default, the paper's split): the encoder (the module the model declares at
      ``encoder_path``) is private; decoder and head (with their BN statistics) are averaged.
      On ``unet`` (base 16, depth 4, BatchNorm, 1 → 2 channels) 1,181,474 of 1,945,268
      state entries are private (60.7 %); on ``unet-timm`` (resnet18, 3 → 2 channels)
      11,186,142 of 14,339,712 (78.0 %), counted as in the manifest's ``partition_sizes``.
    - ``body``: everything but the head (the module at ``head_path``) is private, as in PFLlib
      (``unet``: 1,945,234 of 1,945,268 entries, 99.998 %; only the 34 head entries are shared).

    The manifest's ``partition_sizes`` records the split of each run. A model that declares no
    such path, or whose private part would be empty, is refused with a PartitionError in
    ``setup``: LG-FedAvg must never silently be FedAvg. Evaluated model: the client's own
    representation + the shared top; no global model for an unseen site. No extra local passes;
    optimizer state reset every round.
    """

    name = "lgfedavg"
    newcomer = (
        "the shared top + the initial local part (it never leaves the clients); BN statistics of "
        "the local part recomputed on the new site's unlabelled images (option: the clients' "
        "local parts averaged)"
    )
    paper = "Liang et al., arXiv:2001.01523"
    official_code = "pliang279/LG-FedAvg (main_lg.py); PFLlib clientlg/serverlg"
    shares = "`local: encoder`: decoder + head (and their BN statistics); `body`: the head only"
    personal = "`local: encoder`: the encoder (60.7 % of `unet`, 78.0 % of `unet-timm`); `body`: all but the head"
    evaluates = "own representation + shared top"
    deviations: ClassVar[tuple[str, ...]] = (
        "no warm start: the official code starts from a FedAvg checkpoint; here every method "
        "starts from the same random initialisation",
        "the shared part is averaged weighted by training-set size (the official code averages "
        "unweighted)",
        "no auxiliary (e.g. adversarial) objectives on the local representations; the suite's "
        "loss only",
    )
    params = {
        "local": Param(
            "encoder",
            choices=("encoder", "body"),
            search=False,
            help="private part: encoder (paper) | body = all but the head (PFLlib)",
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        if self.local == "encoder":
            path = declared_path(model, "encoder_path", self.name)
            return local_partition(
                model, keys_of_module(model, path), self.name, f"encoder at {path!r}"
            )
        head = declared_path(model, "head_path", self.name)
        head_keys = set(keys_of_module(model, head))
        body = [k for k in model.state_dict() if k not in head_keys]
        return local_partition(model, body, self.name, f"everything but the head at {head!r}")

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None
