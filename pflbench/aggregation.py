"""Server-side averaging shared by FedAvg, FedBN, masked methods and their relatives.

One function serves whole-tensor and element-wise partitions: an element is averaged over the
clients that share it, weighted by their sample counts; an element no client shares is not sent,
so every receiver keeps its own value.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pflbench.messages import Message, Upload


def aggregation_weights(uploads: Mapping[str, Upload]) -> dict[str, float]:
    """Each client's share of the average (n_i / Σ n): non-negative and summing to one."""
    total = sum(float(u.weight) for u in uploads.values())
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return {cid: float(u.weight) / total for cid, u in uploads.items()}


def masked_average(uploads: Mapping[str, Upload]) -> Message:
    """Element-wise weighted mean of the shared entries, over the clients that share each element.

    w̄[e] = Σ_j n_j s_j[e] θ_j[e] / Σ_j n_j s_j[e]. Accumulates in float64; with a single
    contributor (or identical contributors) the result equals the input bit for bit.
    """
    if not uploads:
        return Message(entries={})
    keys: dict[str, None] = {}
    for u in uploads.values():
        keys.update(dict.fromkeys(u.entries))
    entries: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for k in keys:
        holders = [(u, u.entries[k]) for u in uploads.values() if k in u.entries]
        ref = holders[0][1]
        if not ref.is_floating_point():
            raise TypeError(f"entry {k!r} is {ref.dtype}; only floating-point entries are averaged")
        if all(k not in u.masks for u, _ in holders):
            total = sum(float(u.weight) for u, _ in holders)
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for u, t in holders:
                acc.add_(t.to(torch.float64), alpha=float(u.weight) / total)
            entries[k] = acc.to(ref.dtype)
            continue
        num = torch.zeros_like(ref, dtype=torch.float64)
        den = torch.zeros_like(ref, dtype=torch.float64)
        for u, _ in holders:
            share = u.masks.get(k)
            w = torch.full_like(den, float(u.weight))
            if share is not None:
                w = w * share.to(torch.float64)
            den.add_(w)
        covered = den > 0
        safe = torch.where(covered, den, torch.ones_like(den))
        for u, t in holders:
            share = u.masks.get(k)
            w = torch.full_like(den, float(u.weight))
            if share is not None:
                w = w * share.to(torch.float64)
            num.add_((w / safe) * t.to(torch.float64))
        entries[k] = num.to(ref.dtype)
        if not bool(covered.all()):
            masks[k] = covered
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
