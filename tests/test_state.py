"""Client state stores: what a hook gets back is private, what it hands over is cut loose."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from pflbench.state import DiskStore, MemoryStore, clone_tree


def test_clone_tree_copies_every_tensor_and_keeps_structure():
    w = torch.randn(3, requires_grad=True)
    tree = {"a": [w, (torch.ones(2), 4)], "b": {"c": "text", "d": None}, "e": 1.5}
    out = clone_tree(tree)
    assert out["b"] == {"c": "text", "d": None} and out["e"] == 1.5 and out["a"][1][1] == 4
    assert isinstance(out["a"][1], tuple)
    assert torch.equal(out["a"][0], w) and out["a"][0].requires_grad
    assert out["a"][0].data_ptr() != w.data_ptr()
    out["a"][1][0].add_(1)
    assert torch.equal(tree["a"][1][0], torch.ones(2))


def test_clone_tree_deep_copies_other_objects():
    Pair = namedtuple("Pair", "x y")
    module = nn.Linear(2, 2)
    out = clone_tree({"m": module, "p": Pair(torch.zeros(1), [1])})
    assert out["m"] is not module and torch.equal(out["m"].weight, module.weight)
    assert isinstance(out["p"], Pair) and out["p"].y == [1] and out["p"].y is not None
    with torch.no_grad():
        out["m"].weight.add_(1)
    assert not torch.equal(out["m"].weight, module.weight)


@pytest.mark.parametrize("store_cls", [MemoryStore, DiskStore])
def test_store_isolates_records_from_callers(store_cls):
    store = store_cls()
    extra = {"personal": torch.zeros(4), "count": 1}
    store.put("c0", {"model": {"w": torch.ones(2)}, "state": extra})
    extra["personal"].add_(5)  # the caller keeps using its objects after put
    got = store.get("c0")
    assert torch.equal(got["state"]["personal"], torch.zeros(4))
    got["state"]["personal"].add_(7)  # a hook changes its state in place, then fails
    got["state"]["count"] = 99
    again = store.get("c0")
    assert torch.equal(again["state"]["personal"], torch.zeros(4)) and again["state"]["count"] == 1
    assert torch.equal(again["model"]["w"], torch.ones(2))
    store.close()


def test_memory_store_copies_snapshot_modules():
    store = MemoryStore()
    live = nn.Linear(2, 1)
    store.put("c0/snapshot", {"module": live})
    with torch.no_grad():
        live.weight.zero_()  # the live model trains on after the snapshot
    assert store.get("c0/snapshot")["module"].weight.abs().sum() > 0


def test_disk_store_close_removes_its_folder(tmp_path):
    store = DiskStore(tmp_path)
    store.put("site/a", {"state": {}})
    (folder,) = list(tmp_path.iterdir())
    assert any(folder.iterdir())
    store.close()
    assert not folder.exists()
