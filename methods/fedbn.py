"""FedBN: normalization layers stay with each client, everything else is averaged."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import local_partition
from pflbench.partition import Partition, norm_keys


class FedBN(Method):
    """FedAvg except that every normalization layer (affine parameters and running statistics)
    stays local.

    Paper: Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via Local
    Batch Normalization", ICLR 2021 (arXiv 2102.07623).

    Norm layers are selected by module **type** (BatchNorm, InstanceNorm, GroupNorm, LayerNorm and
    their subclasses), never by the substring "bn" in a name. The paper is about BatchNorm; for a
    model with InstanceNorm or GroupNorm (no running statistics) their affine parameters are what
    is kept local — a choice this implementation makes and states. A model without any norm layer
    (e.g. ``unet`` with ``norm: none``) is refused with a PartitionError instead of silently
    running FedAvg; the refusal happens in ``setup``, before any training. Evaluated model: each
    client's own model (shared entries + its own norm layers). An unseen site gets the shared
    entries with BN statistics recomputed on its unlabelled images (:meth:`Method.newcomer_model`). No extra local passes; optimizer state reset every round.
    """

    name = "fedbn"
    paper = "Li et al., ICLR 2021, arXiv:2102.07623"
    official_code = "med-air/FedBN; PFLlib clientbn"
    shares = "every entry outside normalization layers"
    personal = "normalization layers (affine parameters and running statistics), selected by type"
    evaluates = "the client's model (shared entries + own norm layers)"
    newcomer = (
        "shared entries + initial norm affine parameters, BN statistics recomputed on the new "
        "site's unlabelled train images (option: the clients' norm layers averaged)"
    )
    deviations: ClassVar[tuple[str, ...]] = (
        "on InstanceNorm or GroupNorm models their affine parameters stay local (the paper covers BatchNorm only)",
    )

    def partition(self, model: nn.Module) -> Partition:
        return local_partition(model, norm_keys(model), self.name, "normalization layers")

    def setup(self, client: Client) -> None:
        self.partition(client.model)  # refuse a model without norm layers before training
        return None
