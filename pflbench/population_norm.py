"""Population Normalization (PN): a norm layer whose statistics are learned parameters.

The layer of the method ``pn`` (:mod:`pflbench.methods.pn`), as FL-MedSegBench implements it
(``models_dict/unet2d.py``, class ``PopulationNormalization``): the input is normalised with a
trainable per-channel mean ``pop_mean`` and a trainable per-channel *variance* ``pop_gamma``
instead of the statistics of the batch,

    y = (x − pop_mean) / sqrt(pop_gamma + eps) · weight + bias,

the same transform in training and in evaluation (there are no running statistics to switch to),
so a client's output never depends on the other images of its batch. ``pop_mean``/``pop_gamma``
start at 0/1 and ``weight``/``bias`` at 1/0, so a fresh layer is the identity.

Kept out of :func:`pflbench.models.norm_layer_types` on purpose: it only exists in a model that
``pn`` converted, and FedBN-style methods select the suite's norm layers, not PN's.
"""

from __future__ import annotations

import torch
from torch import nn

from pflbench.partition import NORM_TYPES, PartitionError

__all__ = ["PopulationNorm2d", "CONVERTIBLE", "population_norm_keys", "to_population_norm"]

#: The norm layers PN replaces, by exact type (a subclass such as timm's ``BatchNormAct2d`` may
#: carry more than a normalisation, e.g. a fused activation, and is refused rather than dropped).
CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)


class PopulationNorm2d(nn.Module):
    """Per-channel normalisation with learned population statistics (N×C×H×W inputs)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.pop_mean = nn.Parameter(torch.zeros(num_features))
        #: the variance itself (not its square root), unconstrained, as in the official code
        self.pop_gamma = nn.Parameter(torch.ones(num_features))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"PopulationNorm2d({self.num_features}) expects an N×{self.num_features}×H×W "
                f"input, got shape {tuple(x.shape)}"
            )

        def c(v: torch.Tensor) -> torch.Tensor:  # per channel
            return v[None, :, None, None]

        x_hat = (x - c(self.pop_mean)) / torch.sqrt(c(self.pop_gamma) + self.eps)
        return x_hat * c(self.weight) + c(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _channels(module: nn.Module) -> int:
    return int(module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features)


def to_population_norm(model: nn.Module, method: str = "pn") -> nn.Module:
    """``model`` with every BatchNorm2d / InstanceNorm2d / GroupNorm replaced, in place, by a
    fresh :class:`PopulationNorm2d` of the same channel count; returns ``model``.

    Refused (PartitionError naming the model and the layer) when the model has no norm layer to
    replace, or has a norm layer PN cannot replace exactly (another type or a subclass): a
    partial conversion would silently be part FedAvg. Consumes no random numbers, so every other
    weight stays exactly the seeded initial model that the other methods start from.
    """
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) in CONVERTIBLE:
            targets.append((name, module))
        elif isinstance(module, NORM_TYPES):
            raise PartitionError(
                f"{method}: model {type(model).__name__} has a normalization layer {name!r} of "
                f"type {type(module).__module__}.{type(module).__qualname__}, which Population "
                f"Normalization cannot replace exactly (it replaces "
                f"{', '.join(t.__name__ for t in CONVERTIBLE)} only); use a model built from "
                "those, e.g. unet with norm: batch"
            )
    if not targets:
        raise PartitionError(
            f"{method}: model {type(model).__name__} has no normalization layer "
            f"({', '.join(t.__name__ for t in CONVERTIBLE)}) to replace by Population "
            f"Normalization, so {method} would silently be FedAvg; use a model with norm layers, "
            "e.g. unet with norm: batch"
        )
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, PopulationNorm2d(_channels(module)))
    return model


def population_norm_keys(model: nn.Module) -> list[str]:
    """State keys of the model's PopulationNorm2d layers."""
    return [
        f"{name}.{k}"
        for name, module in model.named_modules()
        if isinstance(module, PopulationNorm2d)
        for k in module.state_dict()
    ]
