"""Diagonal Fisher information, residual scores and the masks pFL-ResFIM builds from them.

Every piece is a separate function so that it can be tested on its own (``reference/resfim.md``
§3–5):

- :func:`per_sample_fisher` (and :func:`per_sample_fisher_sets`, several sets in one pass): the
  faithful estimator, ``F = mean_i (∇θ ℓ(x_i, y_i))²`` with per-sample gradients from
  ``torch.func.vmap(grad(...))``, computed in chunks so that memory stays bounded by
  ``chunk_size`` per-sample gradients and their activations;
- :func:`batch_fisher`: the cheap switch, the mean over mini-batches of the squared mini-batch
  gradient (equal to :func:`per_sample_fisher` when ``batch_size`` is 1);
- :func:`residual_scores`: ``R = (1/(K−1)) Σ_j |F_j − F_k|``;
- :func:`normalize_scores`: per-tensor or global min–max;
- :func:`top_rho_mask`, :func:`random_mask`, :func:`tensor_level_mask`: which entries are
  personal (``True`` = domain-sensitive, kept local).

The model is put in **eval mode** for Fisher passes: BatchNorm then uses its running statistics,
so the loss of one image does not depend on the other images of the batch (a per-sample gradient
is only well defined that way), and no running statistic is touched. The model's parameters,
buffers and ``.grad`` fields are left exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pflbench.training import segmentation_loss

__all__ = [
    "FISHER_CHUNK",
    "LossFn",
    "Scores",
    "batch_fisher",
    "diagonal_fisher",
    "diagonal_fisher_sets",
    "normalize_scores",
    "per_sample_fisher",
    "per_sample_fisher_sets",
    "random_mask",
    "residual_scores",
    "tensor_level_mask",
    "top_rho_mask",
]

Scores = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Per-sample gradients held at once by :func:`per_sample_fisher` (memory ∝ chunk × (parameters
#: + activations of one image)). Larger chunks are much faster on a CPU (32 vs 8: about 2× for
#: the suites' U-Net at 32×32); results do not depend on it beyond float rounding.
FISHER_CHUNK = 32


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _check_inputs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or labels.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fisher needs images N×C×H×W and labels N×H×W, got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("Fisher needs at least one image")


def per_sample_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn = segmentation_loss,
    chunk_size: int = FISHER_CHUNK,
) -> Scores:
    """Diagonal empirical Fisher from per-sample gradients (vmap over chunks of the batch).

    ``loss_fn(logits, labels)`` is called on one item at a time (a batch of one), so with the
    suite's loss it is exactly the training loss of that image. Returns one float32 tensor per
    trainable parameter, keyed like the state dict.
    """
    return per_sample_fisher_sets(model, [(images, labels)], loss_fn, chunk_size)[0]


def per_sample_fisher_sets(
    model: nn.Module,
    sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn = segmentation_loss,
    chunk_size: int = FISHER_CHUNK,
) -> list[Scores]:
    """:func:`per_sample_fisher` of several sets (D_k and its transfers) in one pass.

    The sets are concatenated and cut into chunks of ``chunk_size`` regardless of set borders,
    then each set's squared gradients are summed separately: on a CPU a few large vmap chunks
    are several times faster than one small chunk per set, and the result is the same.
    """
    if not sets:
        return []
    for x, y in sets:
        _check_inputs(x, y)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    images = torch.cat([x for x, _ in sets])
    labels = torch.cat([y for _, y in sets])
    bounds = [0]
    for x, _ in sets:
        bounds.append(bounds[-1] + x.shape[0])
    params = _trainable(model)
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    item_loss = loss_fn

    def one_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return item_loss(logits, y.unsqueeze(0))

    per_sample_grad = vmap(grad(one_loss), in_dims=(None, 0, 0))
    totals = [
        {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()} for _ in sets
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], chunk_size):
            stop = min(start + chunk_size, images.shape[0])
            g = per_sample_grad(params, images[start:stop], labels[start:stop])
            for i, total in enumerate(totals):
                lo, hi = max(bounds[i], start), min(bounds[i + 1], stop)
                if lo >= hi:
                    continue
                for k, v in g.items():
                    total[k].add_(v[lo - start : hi - start].float().square().sum(0))
    finally:
        model.train(was_training)
    return [
        {k: v / float(bounds[i + 1] - bounds[i]) for k, v in total.items()}
        for i, total in enumerate(totals)
    ]


def batch_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn = segmentation_loss,
    batch_size: int = FISHER_CHUNK,
) -> Scores:
    """The cheap estimator: mean over mini-batches of the squared mini-batch gradient.

    Biased towards the squared mean gradient (cross terms between samples do not cancel) and
    about ``batch_size`` times smaller than the per-sample Fisher; only rankings are used, so the
    scale does not matter, but the bias does: that is the point of the ablation switch.
    """
    _check_inputs(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    batches = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            loss = loss_fn(
                model(images[start : start + batch_size]), labels[start : start + batch_size]
            )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(total, grads, strict=True):
                if g is not None:
                    t.add_(g.detach().float().square())
            batches += 1
    finally:
        model.train(was_training)
    return {k: t / batches for k, t in zip(names, total, strict=True)}


def diagonal_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    estimator: Literal["per_sample", "batch"] = "per_sample",
    loss_fn: LossFn = segmentation_loss,
    chunk_size: int = FISHER_CHUNK,
) -> Scores:
    """Dispatch on the estimator switch (``fisher: per_sample | batch``)."""
    return diagonal_fisher_sets(model, [(images, labels)], estimator, loss_fn, chunk_size)[0]


def diagonal_fisher_sets(
    model: nn.Module,
    sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    estimator: Literal["per_sample", "batch"] = "per_sample",
    loss_fn: LossFn = segmentation_loss,
    chunk_size: int = FISHER_CHUNK,
) -> list[Scores]:
    """:func:`diagonal_fisher` of each set; ``chunk_size`` is the mini-batch of ``batch``."""
    if estimator == "per_sample":
        return per_sample_fisher_sets(model, sets, loss_fn, chunk_size)
    if estimator == "batch":
        return [batch_fisher(model, x, y, loss_fn, chunk_size) for x, y in sets]
    raise ValueError(f"unknown Fisher estimator {estimator!r}; expected per_sample or batch")


def residual_scores(local: Mapping[str, torch.Tensor], others: Sequence[Scores]) -> Scores:
    """``R = (1/(K−1)) Σ_j |F(D_{k→j}) − F(D_k)|``; zeros when there is no other style.

    A parameter whose importance moves when only the image style moves is domain-sensitive.
    """
    out: Scores = {}
    for k, f in local.items():
        acc = torch.zeros_like(f)
        for other in others:
            acc.add_((other[k] - f).abs())
        out[k] = acc / len(others) if others else acc
    return out


def normalize_scores(
    scores: Mapping[str, torch.Tensor], mode: Literal["tensor", "global"] = "tensor"
) -> Scores:
    """Min–max to [0, 1] within each tensor (one ratio fits every layer) or over the whole model.

    A constant range maps to zeros (no entry of it is more sensitive than another).
    """
    if mode not in ("tensor", "global"):
        raise ValueError(f"unknown normalization {mode!r}; expected tensor or global")

    def scale(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        span = hi - lo
        if float(span) <= 0:
            return torch.zeros_like(t)
        return (t - lo) / span

    if mode == "tensor":
        return {k: scale(v, v.min(), v.max()) for k, v in scores.items()}
    if not scores:
        return {}
    lo = torch.stack([v.min() for v in scores.values()]).min()
    hi = torch.stack([v.max() for v in scores.values()]).max()
    return {k: scale(v, lo, hi) for k, v in scores.items()}


def _count(rho: float, n: int) -> int:
    if not (math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise ValueError(f"rho must be in [0, 1], got {rho!r}")
    return min(n, int(math.floor(rho * n + 0.5)))


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries; ties go to the lower index (deterministic)."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask


def top_rho_mask(
    scores: Mapping[str, torch.Tensor],
    rho: float,
    scope: Literal["tensor", "model"] = "tensor",
) -> dict[str, torch.Tensor]:
    """``True`` for the top-ρ fraction of entries by score: the domain-sensitive (personal) ones.

    ``scope="tensor"``: ``round(ρ·n)`` entries in every tensor of n entries (spec §5).
    ``scope="model"``: ``round(ρ·N)`` entries over the whole model, so layers compete (this is
    where the normalization switch matters).
    """
    if scope == "tensor":
        return {
            k: _top(v.flatten(), _count(rho, v.numel())).view(v.shape) for k, v in scores.items()
        }
    if scope != "model":
        raise ValueError(f"unknown scope {scope!r}; expected tensor or model")
    keys = list(scores)
    if not keys:
        return {}
    flat = torch.cat([scores[k].flatten().float() for k in keys])
    chosen = _top(flat, _count(rho, flat.numel()))
    out, at = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = chosen[at : at + n].view(scores[k].shape)
        at += n
    return out


def random_mask(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    rho: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The control: exactly ``round(ρ·n)`` personal entries per tensor, drawn at random."""
    out = {}
    for k, shape in shapes.items():
        n = math.prod(shape)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[: _count(rho, n)]] = True
        out[k] = mask.view(tuple(shape))
    return out


def tensor_level_mask(scores: Mapping[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Layer-level personalization: whole tensors, ranked by mean score, until ≈ρ of all entries.

    Tensors are taken in decreasing order of mean score while adding the next one brings the
    personal count closer to ``ρ·N``; ties keep state-dict order.
    """
    keys = list(scores)
    total = sum(scores[k].numel() for k in keys)
    target = rho * total
    _count(rho, max(total, 1))  # validates rho
    means = torch.tensor([float(scores[k].float().mean()) for k in keys]) if keys else None
    order = torch.sort(means, descending=True, stable=True).indices.tolist() if keys else []
    personal: set[str] = set()
    count = 0
    for i in order:
        n = scores[keys[i]].numel()
        if abs(count + n - target) < abs(count - target):
            personal.add(keys[i])
            count += n
        else:
            break
    return {
        k: torch.full(scores[k].shape, k in personal, dtype=torch.bool, device=scores[k].device)
        for k in keys
    }
