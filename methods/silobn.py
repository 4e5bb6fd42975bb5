"""SiloBN: BatchNorm running statistics stay local, everything else (γ/β included) is shared."""

from __future__ import annotations

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import local_partition
from pflbench.partition import Partition


def running_stat_keys(model: nn.Module) -> list[str]:
    """``running_mean``/``running_var`` keys of every norm layer that tracks them, by module type."""
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for buf in ("running_mean", "running_var"):
                if getattr(module, buf, None) is not None:
                    keys.append(f"{name}.{buf}" if name else buf)
    return keys


class SiloBN(Method):
    """FedAvg except that normalization running statistics stay local; γ and β are averaged.

    Paper: Andreux, du Terrail, Beguier, Tramel, "Siloed Federated Learning for Multi-Centric
    Histopathology Datasets", DART/MICCAI workshop 2020 (arXiv 2008.07424).

    Local entries: ``running_mean`` and ``running_var`` of every module that tracks running
    statistics (BatchNorm, and InstanceNorm built with ``track_running_stats=True``), selected by
    module type; ``num_batches_tracked`` is an integer and local under every method. A model with
    no running statistics (GroupNorm, affine InstanceNorm, no norm) is refused with a
    PartitionError in ``setup``, since SiloBN would silently be FedAvg there. Evaluated model:
    each client's model (shared weights and γ/β, its own statistics). No extra local passes;
    optimizer state reset every round.
    """

    name = "silobn"
    paper = "Andreux et al., 2020, arXiv:2008.07424"
    official_code = "no official code released"
    shares = "everything except BN running statistics (γ/β shared)"
    personal = "BN running statistics"
    evaluates = "the client's model (shared weights, own statistics)"
    newcomer = (
        "shared weights and γ/β, BN statistics recomputed on the new site's unlabelled train "
        "images (option: the clients' statistics averaged)"
    )

    def partition(self, model: nn.Module) -> Partition:
        return local_partition(
            model, running_stat_keys(model), self.name, "normalization running statistics"
        )

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None
