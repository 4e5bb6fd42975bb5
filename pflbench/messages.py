"""What crosses the client–server boundary, and what it costs in bytes.

Everything a method sends is one of these two objects; the engine counts their bytes, so a
method cannot communicate without it showing up in the run's communication figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


def payload_bytes(obj: Any) -> int:
    """Bytes of a payload: tensors at their size, boolean masks at one bit per element."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bool:
            return math.ceil(obj.numel() / 8)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (Upload, Message)):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if isinstance(obj, (int, float, bool)):
        return 8
    if isinstance(obj, str):
        return len(obj.encode())
    raise TypeError(
        f"cannot count the bytes of a {type(obj).__name__}; send tensors, numbers or containers of them"
    )


@dataclass
class Upload:
    """A client's upload: entries it shares, optional element masks, its weight, method extras.

    ``masks[k]`` (boolean, the entry's shape) marks the elements of ``entries[k]`` the client
    shares; an entry without a mask is shared whole.
    """

    entries: Tensors
    weight: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.entries) + payload_bytes(self.masks) + payload_bytes(self.extras)


@dataclass
class Message:
    """What the server sends to one client: aggregated entries and method extras.

    ``masks[k]`` (boolean) marks the elements of ``entries[k]`` that some client shared; elsewhere
    the receiver keeps its own value (see :func:`pflbench.aggregation.merge_into`). An entry
    without a mask was aggregated whole.
    """

    entries: Tensors
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.entries) + payload_bytes(self.masks) + payload_bytes(self.extras)
