"""Which model entries are shared and which stay with the client.

A partition maps every state-dict key to ``True`` (shared), ``False`` (personal) or a boolean
tensor of the entry's shape (element-wise: ``True`` entries shared). Selections go by module type
(norm layers) or by a module path the model declares, never by substrings of names.
"""

from __future__ import annotations

import torch
from torch import nn

Mask = bool | torch.Tensor
Partition = dict[str, Mask]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


class PartitionError(ValueError):
    """A declared partition that cannot be built (for example, it would be empty)."""


def floating_entries(model: nn.Module) -> Partition:
    """FedAvg's partition: every floating-point entry, BN running statistics included.

    Integer buffers (``num_batches_tracked``) are never averaged as floats: they stay local.
    """
    return {k: bool(v.is_floating_point()) for k, v in model.state_dict().items()}


def parameter_entries(model: nn.Module) -> Partition:
    """Parameters shared, every buffer (BN running statistics included) local.

    The partition of methods whose official code exchanges ``parameters()`` only (FedALA, FedAS,
    FedCAC): each client's BN running statistics are then never overwritten by another's.
    """
    params = {n for n, _ in model.named_parameters()}
    return {k: bool(v and k in params) for k, v in floating_entries(model).items()}


def _module_keys(prefix: str, module: nn.Module) -> list[str]:
    return [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]


def keys_of_types(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """State keys owned by modules of the given types (module type, not name)."""
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            keys.extend(_module_keys(name, module))
    return keys


def norm_keys(model: nn.Module) -> list[str]:
    return keys_of_types(model, NORM_TYPES)


def partition_sizes(model: nn.Module, partition: Partition) -> dict[str, int]:
    """Numbers of shared and personal entries (elements), for the run's manifest."""
    shared = personal = 0
    for k, v in model.state_dict().items():
        m = partition.get(k, False)
        n = v.numel()
        if isinstance(m, torch.Tensor):
            s = int(m.sum())
            shared += s
            personal += n - s
        elif m:
            shared += n
        else:
            personal += n
    return {"shared": shared, "personal": personal}
