"""Helpers several built-in methods share: partitions by declared module path or module type,
refusal of empty partitions, proximal terms over parameters, freezing, optimisation steps.

Kept here so that each method file holds only its algorithm, and so that the rules of the Method
contract (parameters-only proximal terms, no silent FedAvg, restored ``requires_grad``) are
written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from pflbench.partition import Partition, PartitionError, floating_entries
from pflbench.training import backward_step, check_finite


def model_name(model: nn.Module) -> str:
    return type(model).__name__


def declared_path(model: nn.Module, attr: str, method: str) -> str:
    """The module path a model declares as ``attr`` (``head_path``, ``lower_path``), checked."""
    path = getattr(model, attr, None)
    if not isinstance(path, str) or not path:
        raise PartitionError(
            f"{method}: model {model_name(model)} declares no {attr!r}; {method} partitions the "
            f"model by that declared module path and cannot guess it from parameter names"
        )
    try:
        model.get_submodule(path)
    except AttributeError as exc:
        raise PartitionError(
            f"{method}: model {model_name(model)} declares {attr}={path!r}, but it has no module "
            "at that path"
        ) from exc
    return path


def keys_of_module(model: nn.Module, path: str) -> list[str]:
    """State-dict keys of the module at ``path`` (its parameters and buffers)."""
    module = model.get_submodule(path)
    return [f"{path}.{k}" if path else k for k in module.state_dict()]


def local_partition(model: nn.Module, personal: Iterable[str], method: str, what: str) -> Partition:
    """FedAvg's partition with ``personal`` kept local; an empty selection is refused.

    Only floating-point entries count: integer buffers (``num_batches_tracked``) are local under
    every method, so a selection made only of them would silently be FedAvg.
    """
    base = floating_entries(model)
    chosen = [k for k in personal if base.get(k, False)]
    if not chosen:
        raise PartitionError(
            f"{method}: the personal part ({what}) of model {model_name(model)} is empty, so "
            f"{method} would silently be FedAvg; use a model where it is not empty"
        )
    out = dict(base)
    for k in chosen:
        out[k] = False
    return out


def head_partition(model: nn.Module, method: str) -> Partition:
    """FedAvg's partition with the head the model declares (``head_path``) kept local."""
    path = declared_path(model, "head_path", method)
    return local_partition(model, keys_of_module(model, path), method, f"head {path!r}")


def param_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters (not buffers): the anchor of a proximal term."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def proximal_term(
    anchor: dict[str, torch.Tensor], coef: float
) -> Callable[[nn.Module], torch.Tensor]:
    """``coef/2 · Σ ‖θ − anchor‖²`` over the model's parameters (never its buffers).

    BN running statistics are buffers: pulling them towards an anchor is not part of FedProx or
    Ditto, and they are not optimised anyway.
    """

    def term(model: nn.Module) -> torch.Tensor:
        total = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            d = (p - anchor[name]).pow(2).sum()
            total = d if total is None else total + d
        if total is None:
            raise ValueError("proximal term over a model without trainable parameters")
        return 0.5 * coef * total

    return term


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Turn off ``requires_grad`` for ``params`` for the duration, restoring it afterwards.

    The engine reuses one live model for every client, so a freeze must never leak out of a hook.
    """
    saved = [(p, p.requires_grad) for p in params]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, where: str) -> torch.Tensor:
    """Backward and step (through the optimizer's fp16 gradient scaler, if any), refusing a
    non-finite loss exactly as the engine's training loop does; returns the detached loss,
    left on its device (reading it would wait for the device at every step)."""
    check_finite(loss, where)
    backward_step(optimizer, loss)
    return loss.detach()


def cloned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def recompute_norm_statistics(
    model: nn.Module,
    images: torch.Tensor,
    batch: int,
    device: torch.device,
    modules: Iterable[str] | None = None,
) -> int:
    """Replace the running statistics of the BatchNorm layers named in ``modules`` (default:
    all) by those of ``images`` (unlabelled): reset,
    then one forward pass in train mode with ``momentum=None`` (PyTorch's cumulative average, so
    the result is the plain mean over batches, independent of their order's weighting), no
    gradient. Everything but the running statistics is left as it was. Returns the images seen.

    Used by the newcomer hooks of FedBN / SiloBN: a site that joins after training has no
    statistics of its own, and its unlabelled images are all they need.
    """
    chosen = None if modules is None else set(modules)
    bns = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (chosen is None or name in chosen)
    ]
    was_training = model.training
    model.eval()
    saved = []
    for m in bns:
        if m.track_running_stats:
            saved.append((m, m.momentum))
            m.reset_running_stats()
            m.momentum = None
            m.train()
    try:
        for i in range(0, len(images), batch):
            model(images[i : i + batch].to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(images)
