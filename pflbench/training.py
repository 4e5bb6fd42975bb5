"""Local training pieces the engine owns: the loss, the optimizer and the batch stream.

Methods train through these (via :class:`pflbench.client.Client`) so that every method uses the
same loss, optimizer and data order, and every pass over the data is counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.data import SiteData


class Diverged(FloatingPointError):
    """Training produced a non-finite loss; the run is recorded as diverged, not crashed."""


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per item and channel, averaged; probs and target are N×K×H×W."""
    dims = tuple(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """0.5·BCE + 0.5·soft Dice for one structure (one logit channel); CE + Dice for several.

    Dice is taken per image over the foreground channel(s) and averaged. With the default
    smoothing 1.0 this is pflbench's own loss; FL-MedSegBench's ``DiceBCELoss`` has the same
    binary form with smoothing 1e-6 (``protocol.loss_smoothing``). The multi-class form leaves
    the background channel out of the Dice term, which that benchmark's does not.
    Computed in float32 whatever the logits' dtype (bf16 autocast): a no-op for float32.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        target = (labels > 0).to(logits.dtype).unsqueeze(1)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return 0.5 * bce + 0.5 * soft_dice_loss(torch.sigmoid(logits), target, smooth)
    ce = F.cross_entropy(logits, labels)
    # one-hot by comparison (F.one_hot checks the range with .item(), which vmap cannot trace)
    classes = torch.arange(logits.shape[1], device=labels.device).view(1, -1, 1, 1)
    onehot = (labels.unsqueeze(1) == classes).to(logits.dtype)
    return 0.5 * ce + 0.5 * soft_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:], smooth)


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """The same loss for each item separately (used by per-sample Fisher estimates)."""
    return torch.stack(
        [
            segmentation_loss(logits[i : i + 1], labels[i : i + 1], smooth)
            for i in range(len(logits))
        ]
    )


def make_optimizer(
    params, name: Literal["adam", "sgd"], lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; expected adam or sgd")


def batch_stream(
    data: SiteData,
    batch_size: int,
    *,
    epochs: int | None,
    steps: int | None,
    order: torch.Generator,
    augment: torch.Generator | None,
    shuffle: bool = True,
    device: torch.device | str = "cpu",
    augmentations: Sequence[str] = ("flips",),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches from in-memory tensors: ``epochs`` passes, or exactly ``steps`` batches.

    No DataLoader is built per round: indexing the held tensors is the whole pipeline.
    A final short batch is kept (a site smaller than the batch still trains); a batch of one
    image is merged into the previous one, because BatchNorm cannot train on a single item.
    With an ``augment`` generator, ``augmentations`` are applied per image in the order
    albumentations applies FL-MedSegBench's: "flips" (horizontal, vertical, p 0.5 each), then
    "rot90" (p 0.5, by a uniform k·90°, k ∈ {0, 1, 2, 3}; square images only).
    """
    n = len(data)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    unknown = sorted(set(augmentations) - {"flips", "rot90"})
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; expected flips, rot90")
    if augment is not None and "rot90" in augmentations and n:
        h, w = data.images.shape[-2:]
        if h != w:
            raise ValueError(
                f"site {data.name!r}: rot90 augmentation needs square images, got {h}×{w} "
                "(use augment: [flips])"
            )

    def one_epoch() -> list[torch.Tensor]:
        idx = torch.randperm(n, generator=order) if shuffle else torch.arange(n)
        chunks = list(idx.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2] = torch.cat([chunks[-2], chunks[-1]])
            chunks.pop()
        return chunks

    def emit(ix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = ix.to(data.images.device)  # a no-op on the host; the data may live on the GPU
        x = data.images.index_select(0, ix)
        y = data.labels.index_select(0, ix)
        if augment is not None and augmentations:
            x, y = x.clone(), y.clone()
        if augment is not None and "flips" in augmentations:
            flip = torch.rand(len(ix), 2, generator=augment) < 0.5
            for i in range(len(ix)):
                if flip[i, 0]:
                    x[i], y[i] = x[i].flip(-1), y[i].flip(-1)
                if flip[i, 1]:
                    x[i], y[i] = x[i].flip(-2), y[i].flip(-2)
        if augment is not None and "rot90" in augmentations:
            turn = torch.rand(len(ix), generator=augment) < 0.5
            k = torch.randint(0, 4, (len(ix),), generator=augment)
            for i in range(len(ix)):
                if turn[i] and k[i]:
                    q = int(k[i])
                    x[i], y[i] = x[i].rot90(q, (-2, -1)), y[i].rot90(q, (-2, -1))
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    if epochs is not None:
        for _ in range(epochs):
            for ix in one_epoch():
                yield emit(ix)
        return
    done = 0
    while done < steps:  # type: ignore[operator]
        for ix in one_epoch():
            yield emit(ix)
            done += 1
            if done >= steps:  # type: ignore[operator]
                return


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Refuse a non-finite loss now (one host synchronisation); inside :func:`divergence_guard`
    the loss is only recorded, and checked once when the guarded block ends."""
    meter = _METER.get()
    if meter is not None:
        meter.add(loss, where)
        return
    if not torch.isfinite(loss).all():
        raise Diverged(f"non-finite loss ({loss.item()}) in {where}")


class LossMeter:
    """Losses summed on their device per label (float64, exactly the host's running sum), so
    that a training loop never waits for the device to learn whether a step diverged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, where: str) -> None:
        value = loss.detach().to(torch.float64).sum()
        held = self.sums.get(where)
        self.sums[where] = value if held is None else held + value

    def check(self) -> None:
        """One synchronisation: :class:`Diverged` naming each label whose losses were not all
        finite (a NaN or an infinity anywhere makes the sum non-finite)."""
        if not self.sums:
            return
        labels = list(self.sums)
        finite = torch.isfinite(torch.stack([self.sums[k] for k in labels])).tolist()
        bad = [k for k, ok in zip(labels, finite, strict=True) if not ok]
        if bad:
            raise Diverged(f"non-finite loss in {', '.join(bad)}")


_METER: contextvars.ContextVar[LossMeter | None] = contextvars.ContextVar("meter", default=None)


@contextlib.contextmanager
def divergence_guard() -> Iterator[LossMeter]:
    """Check every loss of the block once, at its end (the engine wraps each client hook, so
    divergence is checked once per local update, not once per step)."""
    meter = LossMeter()
    token = _METER.set(meter)
    try:
        yield meter
    except Diverged:
        raise
    except Exception:
        meter.check()  # an error after a non-finite loss is that divergence, reported as such
        raise
    finally:
        _METER.reset(token)
    meter.check()


#: The fp16 gradient scaler of each optimizer that has one (see :func:`attach_scaler`).
_SCALERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, torch.amp.GradScaler] = (
    weakref.WeakKeyDictionary()
)


def attach_scaler(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Let :func:`backward_step` scale the losses of ``optimizer``'s steps (amp: fp16), so that
    every training loop that steps through it gets the scaler without knowing about it."""
    _SCALERS[optimizer] = scaler


def scaler_of(optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
    return _SCALERS.get(optimizer)


def backward_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """``loss.backward(); optimizer.step()``, through the optimizer's gradient scaler under fp16
    (scaled loss, unscaled step, skipped when a gradient overflowed, scale updated)."""
    scaler = _SCALERS.get(optimizer)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_epochs(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    extra_loss=None,
    where: str = "local training",
    loss_fn: LossFn = segmentation_loss,
) -> tuple[float, int]:
    """Plain supervised steps over ``batches``; returns (mean loss, samples seen).

    The losses are summed on the device; the mean is read once at the end, and the divergence
    check happens then too (or at the end of the enclosing :func:`divergence_guard`)."""
    model.train()
    total: torch.Tensor | None = None
    seen, count = 0, 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        check_finite(loss, where)
        backward_step(optimizer, loss)
        value = loss.detach().to(torch.float64)
        total = value if total is None else total + value
        count += 1
        seen += len(x)
    return (float(total) / count if total is not None else 0.0), seen
