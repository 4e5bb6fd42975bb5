"""Server-side averaging shared by FedAvg, FedBN, masked methods and their relatives.

One function serves whole-tensor and element-wise partitions: an element is averaged over the
clients that share it, weighted by their sample counts; an element no client shares is not sent,
so every receiver keeps its own value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from pflbench.messages import Message, Upload

WeightKind = Literal["samples", "batches", "uniform"]


def client_weight(num_train: int, batch_size: int, kind: WeightKind = "samples") -> float:
    """A client's unnormalised aggregation weight under ``protocol.aggregation_weights``.

    batches is ⌈n / b⌉, the length of a DataLoader without drop_last (FL-MedSegBench's
    ``len(train_loader)``), even where our batch stream merges a last batch of one image.
    """
    if kind == "samples":
        return float(num_train)
    if kind == "batches":
        return float(math.ceil(num_train / batch_size))
    if kind == "uniform":
        return 1.0
    raise ValueError(f"unknown aggregation weights {kind!r}; expected samples, batches or uniform")


def aggregation_weights(uploads: Mapping[str, Upload]) -> dict[str, float]:
    """Each client's share of the average (n_i / Σ n): non-negative and summing to one."""
    total = sum(float(u.weight) for u in uploads.values())
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return {cid: float(u.weight) / total for cid, u in uploads.items()}


def masked_average(uploads: Mapping[str, Upload]) -> Message:
    """Element-wise weighted mean of the shared entries, over the clients that share each element.

    w̄[e] = Σ_j n_j s_j[e] θ_j[e] / Σ_j n_j s_j[e]. One pass over the uploads (each is read
    once, so a disk-backed mapping keeps one upload in memory at a time), accumulating in
    float64: with one contributor, or identical ones, the result equals the input bit for bit.
    """
    num: dict[str, torch.Tensor] = {}
    den: dict[str, torch.Tensor | float] = {}
    dtypes: dict[str, torch.dtype] = {}
    for u in uploads.values():
        w = float(u.weight)
        for k, t in u.entries.items():
            if not t.is_floating_point():
                raise TypeError(
                    f"entry {k!r} is {t.dtype}; only floating-point entries are averaged"
                )
            share = u.masks.get(k)
            if k not in num:
                num[k] = torch.zeros_like(t, dtype=torch.float64)
                den[k] = 0.0
                dtypes[k] = t.dtype
            if share is None:
                num[k].add_(t.to(torch.float64), alpha=w)
                den[k] = den[k] + w
            else:
                ws = share.to(torch.float64) * w
                num[k].add_(ws * t.to(torch.float64))
                den[k] = den[k] + ws
    entries: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k, total in den.items():
        if isinstance(total, torch.Tensor):
            covered = total > 0
            entries[k] = (num[k] / torch.where(covered, total, torch.ones_like(total))).to(
                dtypes[k]
            )
            if not bool(covered.all()):
                masks[k] = covered
        else:
            if total <= 0:
                raise ValueError(f"entry {k!r}: aggregation weights must have a positive sum")
            entries[k] = (num[k] / total).to(dtypes[k])
    return Message(entries=entries, masks=masks)


def merge_into(
    state: dict[str, torch.Tensor],
    message: Message,
    shared: Mapping[str, bool | torch.Tensor],
) -> None:
    """Write the message into a client's state where the client shares the element and the
    server had a value for it: θ_k ← m_k ⊙ θ_k + (1 − m_k) ⊙ w̄. Personal elements stay bit-identical.
    """
    for k, value in message.entries.items():
        mine = shared.get(k, False)
        if mine is False:
            continue
        target = state[k]
        take = message.masks.get(k)
        if isinstance(mine, torch.Tensor):
            take = mine if take is None else (mine & take)
        if take is None:
            target.copy_(value.to(target.dtype))
        else:
            target.copy_(torch.where(take.to(target.device), value.to(target.dtype), target))
