"""Where per-client state lives between hook calls: in memory, or on disk for many clients.

A record is ``{"model": state_dict, "state": method extras, "snapshot": best eval model}``. The
engine keeps one live model and loads a client's record into it when the client is active, so
with the disk store only one client's state is in memory at a time.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class StateStore(ABC):
    """Per-client records keyed by client id."""

    @abstractmethod
    def get(self, cid: str) -> dict[str, Any]: ...

    @abstractmethod
    def put(self, cid: str, record: dict[str, Any]) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to release
        """Release whatever the store holds."""


def clone_tree(obj: Any) -> Any:
    """A private copy of nested dicts, lists and tuples of tensors: ``Tensor.clone`` per leaf,
    several times cheaper than ``copy.deepcopy`` on state dicts; anything else is deep-copied.
    Tensors that alias each other come back as separate copies."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().clone()
        return out.requires_grad_() if obj.requires_grad and obj.is_leaf else out
    if isinstance(obj, dict):
        return type(obj)((k, clone_tree(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [clone_tree(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(clone_tree(v) for v in obj)
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    return copy.deepcopy(obj)


class MemoryStore(StateStore):
    """Private copies in a dict: fast, memory grows with the number of clients.

    ``put`` copies what may alias live objects (the method's extras, snapshot modules); the
    ``"model"`` entry is a fresh state dict handed over by the engine and kept as is. ``get``
    copies the extras, since hooks may change them in place, but not ``"model"``: the engine only
    loads it into its live model, which copies the values.
    """

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}

    def get(self, cid: str) -> dict[str, Any]:
        return {k: v if k == "model" else clone_tree(v) for k, v in self._records[cid].items()}

    def put(self, cid: str, record: dict[str, Any]) -> None:
        self._records[cid] = {k: v if k == "model" else clone_tree(v) for k, v in record.items()}

    def close(self) -> None:
        self._records.clear()


class DiskStore(StateStore):
    """One ``torch.save`` file per client in a private temporary folder: flat peak memory."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pflbench-state-", dir=root))

    def _path(self, cid: str) -> Path:
        return self._dir / f"{cid.replace('/', '__')}.pt"

    def get(self, cid: str) -> dict[str, Any]:
        """The record as it was put, each tensor on the device it was saved from: a GPU run's
        client state and best-round snapshot come back on the GPU, as from the memory store
        (loading them to the CPU left a snapshot model on the CPU beside data on the GPU)."""
        return torch.load(self._path(cid), weights_only=False)

    def put(self, cid: str, record: dict[str, Any]) -> None:
        tmp = self._path(cid).with_suffix(".tmp")
        torch.save(record, tmp)
        tmp.replace(self._path(cid))

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class StoredUploads(Mapping):
    """The round's uploads as a read-only mapping that loads each one from the store on access."""

    def __init__(self, store: StateStore, ids: list[str]) -> None:
        self._store = store
        self._ids = list(ids)

    def __getitem__(self, cid: str) -> Any:
        if cid not in self._ids:
            raise KeyError(cid)
        return self._store.get(f"{cid}/upload")["upload"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def make_store(kind: str, root: str | Path | None = None) -> StateStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return DiskStore(root)
    raise ValueError(f"unknown state store {kind!r}; expected memory or disk")
