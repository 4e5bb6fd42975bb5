"""The GPU path's parts a CPU can check (issue 18): one divergence check per local update with
no host synchronisation per step, where the sites' data live, and how many runs share a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_protocol
from method_helpers import make_client, run, tiny_federation, tiny_unet
from torch import nn

from pflbench.data import make_splits
from pflbench.federation import build_clients, choose_placement, place_clients
from pflbench.training import Diverged, check_finite, divergence_guard, train_epochs

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


# divergence: checked once per local update ---------------------------------------------------


def _batches(n: int, poison: int | None = None):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = torch.rand(2, 1, 8, 8, generator=g)
        if i == poison:
            x = x * float("nan")
        yield x, (torch.rand(2, 8, 8, generator=g) > 0.5).long()


def _conv() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Conv2d(1, 1, 3, padding=1)
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_outside_a_guard_a_non_finite_loss_stops_training_at_once():
    m, opt = _conv()
    steps = []
    with pytest.raises(Diverged, match="non-finite loss .* in here"):
        train_epochs(
            m, (b for b in _batches(5, poison=1) if not steps.append(1)), opt, where="here"
        )
    assert len(steps) == 2


def test_inside_a_guard_the_update_runs_on_and_the_check_comes_once_at_the_end():
    m, opt = _conv()
    steps = []
    with pytest.raises(Diverged, match=r"non-finite loss in client a \(local\)") as err:
        with divergence_guard():
            train_epochs(
                m,
                (b for b in _batches(5, poison=1) if not steps.append(1)),
                opt,
                where="client a (local)",
            )
            check_finite(torch.tensor(1.0), "client a (other)")  # finite: not named
            assert len(steps) == 5  # no raise mid-update: nothing waited for the loss
    assert "other" not in str(err.value)


def test_an_error_after_a_non_finite_loss_in_a_guard_is_reported_as_the_divergence():
    with pytest.raises(Diverged, match="non-finite loss in step one"):
        with divergence_guard():
            check_finite(torch.tensor(float("inf")), "step one")
            raise RuntimeError("a NaN broke a later computation")
    with pytest.raises(RuntimeError, match="unrelated"):  # finite losses: the error as it is
        with divergence_guard():
            check_finite(torch.tensor(0.5), "step one")
            raise RuntimeError("unrelated")


def test_the_mean_loss_summed_on_the_device_is_the_host_sum_bit_for_bit():
    m, opt = _conv()
    mean, seen = train_epochs(m, _batches(7), opt)
    m2, opt2 = _conv()
    from pflbench.training import segmentation_loss

    total = 0.0
    for x, y in _batches(7):  # the loop as it was: a float read after every step
        opt2.zero_grad(set_to_none=True)
        loss = segmentation_loss(m2(x), y)
        loss.backward()
        opt2.step()
        total += float(loss.detach())
    assert mean == total / 7 and seen == 14


def test_custom_loops_of_methods_are_checked_by_the_engine_guard():
    """APFL steps through methods._common.step: its divergence still ends the run as diverged."""
    from pflbench.suite import OptimizerSpec

    _, out = run(tiny_federation(), "apfl", rounds=2, optimizer=OptimizerSpec(name="sgd", lr=1e12))
    assert out.info["status"] == "diverged"
    assert "non-finite loss in client" in out.info["error"]


# where the sites' data live ------------------------------------------------------------------


def test_placement_is_host_on_the_cpu_and_decided_by_free_memory_on_a_gpu():
    assert choose_placement("auto", CPU, 10, None) == "host"
    assert choose_placement("auto", GPU, 10, 100) == "device"
    assert choose_placement("auto", GPU, 50, 100) == "device"  # half the free memory fits
    assert choose_placement("auto", GPU, 51, 100) == "pinned"
    assert choose_placement("host", GPU, 1, 100) == "host"


def test_on_the_cpu_the_clients_stay_as_loaded_and_the_manifest_says_so():
    data = tiny_federation()
    clients = build_clients(data, make_splits(data))
    placed, where = place_clients(clients, "auto", CPU)
    assert where == "host" and placed is clients
    _, out = run(data, "fedavg", rounds=1)
    assert out.info["data_placement"] == "host"


def test_placed_splits_hold_the_same_data_and_tuning_never_builds_the_test_split():
    data = tiny_federation()
    final = build_clients(data, make_splits(data))[0]
    moved = final.placed(CPU)
    assert moved._test is not None
    for split in ("train", "val", "test"):
        a, b = getattr(final, split), getattr(moved, split)
        assert torch.equal(a.images, b.images) and a.case_ids == b.case_ids
    assert final.nbytes == sum(getattr(final, s).nbytes for s in ("train", "val", "test"))
    tune = build_clients(data, make_splits(data), mode="tune")[0]
    assert tune.placed(CPU)._test is None
    assert tune.nbytes == tune.train.nbytes + tune.val.nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_placement_puts_a_small_federation_on_the_gpu():
    data = tiny_federation()
    placed, where = place_clients(build_clients(data, make_splits(data)), "auto", GPU)
    assert where == "device" and placed[0].train.images.is_cuda


# runs per GPU ------------------------------------------------------------------------------


def test_workers_per_gpu_deals_that_many_runs_to_each_gpu(monkeypatch):
    from pflbench.pool import choose_workers, gpu_assignment

    probed = []

    def probe() -> int:
        probed.append(1)
        return 3

    monkeypatch.setattr("pflbench.pool.cpu_count", lambda: 16)
    assert choose_workers(None, 1, None, 2, ["0", "1"]) == 4
    assert choose_workers(None, 1, None, "auto", ["0", "1"], probe) == 6 and probed == [1]
    assert choose_workers(None, 1, None, "auto", [], probe) == 1 and probed == [1]  # no GPU
    assert choose_workers(5, 1, None, 2, ["0", "1"]) == 5  # --workers wins
    monkeypatch.setattr("pflbench.pool.cpu_count", lambda: 3)
    assert choose_workers(None, 1, None, 2, ["0", "1"]) == 3  # never more runs than CPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_assignment(4) == ["0", "1", "0", "1"]


def test_auto_packing_divides_the_gpu_by_the_probe_peak():
    from pflbench.packing import CONTEXT_MB, HEADROOM, per_gpu_from_peak

    total = 100_000.0
    peak = 2_000.0
    assert per_gpu_from_peak(peak, total, cap=64) == int(HEADROOM * total // (peak + CONTEXT_MB))
    assert per_gpu_from_peak(peak, total, cap=4) == 4
    assert per_gpu_from_peak(10 * total, total, cap=8) == 1  # too big still gets one
    with pytest.raises(ValueError):
        per_gpu_from_peak(peak, 0, cap=4)


def test_the_probe_refuses_a_cpu():
    from pflbench.packing import probe_peak_mb

    with pytest.raises(ValueError, match="not a GPU"):
        probe_peak_mb(None, CPU)


def test_suite_workers_per_gpu_is_validated():
    from pflbench.suite import Suite

    base = {
        "name": "t",
        "datasets": [{"name": "synthetic"}],
        "methods": ["fedavg"],
        "seeds": [0],
        "protocol": {"rounds": 1},
    }
    assert Suite.model_validate({**base, "workers_per_gpu": "auto"}).workers_per_gpu == "auto"
    with pytest.raises(ValueError, match="workers_per_gpu"):
        Suite.model_validate({**base, "workers_per_gpu": 0})


def test_a_client_batch_stream_indexes_data_where_it_lives():
    client = make_client(tiny_unet())
    x, y = next(client.batches())
    assert x.device == client.train_data.images.device and len(x) == 4
    _ = fast_protocol  # the helpers' protocol is what run() uses above


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_disk_store_gives_records_back_on_the_device_they_came_from():
    from pflbench.state import DiskStore

    store = DiskStore()
    try:
        store.put("a", {"state": {"t": torch.ones(2, device=GPU)}, "cpu": torch.zeros(1)})
        back = store.get("a")
        assert back["state"]["t"].is_cuda and not back["cpu"].is_cuda
    finally:
        store.close()
