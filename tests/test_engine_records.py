"""What the engine records beside the models: round rows, selection rules, timings, callbacks,
the manifest's sizes and memory (issue 22: engine survivors). Each expected value is computed
from the definition, not read back from the engine."""

from __future__ import annotations

import dataclasses
import resource
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation
from method_helpers import capturing, run

import pflbench.engine as engine_module
from pflbench.data import make_splits
from pflbench.engine import Federation, autocast, output_channels, peak_memory_mb, resolve_device
from pflbench.methods.resfim import ResFIM
from pflbench.metrics import METRIC_COLUMNS
from pflbench.partition import partition_sizes
from pflbench.registry import get_method
from pflbench.training import Diverged


@pytest.mark.parametrize(
    ("platform", "maxrss", "mib"), [("linux", 3 * 1024, 3.0), ("darwin", 5 * 2**20, 5.0)]
)
def test_peak_memory_reads_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, maxrss, mib):
    """``ru_maxrss`` is KiB on Linux and bytes on macOS (getrusage(2)); the manifest says MiB."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    assert peak_memory_mb() == mib
    assert peak_memory_mb(torch.device("cpu")) == mib  # no GPU term on the CPU


def test_round_rows_name_their_client_and_structure():
    """Every round row carries its client and structure, the per-client "mean" rows included
    (selection and the report filter on both)."""
    data = tiny_federation()
    _, out = run(data, "fedavg", rounds=2)
    rows = out.rounds
    assert set(rows["client"]) == {s.name for s in data.sites}
    assert rows["structure"].notna().all() and rows["client"].notna().all()
    assert set(rows["metric"]) == {"dice", "iou"} and set(rows["structure"]) == {"blob", "mean"}
    means = rows[(rows["structure"] == "mean") & (rows["split"] == "val")]
    assert len(means) == 2 * 3 * 2  # rounds × clients × (dice, iou)
    assert set(means["client"]) == {s.name for s in data.sites}


@pytest.mark.parametrize("start", ["after_half", "benchmark"])
def test_a_one_round_run_selects_its_only_round(start):
    """best_after_half on one round: round 1 is selectable under either start rule (the
    benchmark rule alone would put the first selectable round at 2)."""
    _, out = run(tiny_federation(), "fedavg", rounds=1, selection_start=start)
    assert out.info["selected_rounds"] == {"site0": 1, "site1": 1, "site2": 1}
    best = out.cases[out.cases["selection"] == "best"]
    assert len(best) and set(best["round"]) == {1}


def test_selection_last_reports_the_last_model_under_both_labels():
    """``selection: last`` keeps no snapshot: the "best" rows are the last round's, equal."""
    _, out = run(tiny_federation(), "fedavg", rounds=2, selection="last")
    assert set(out.cases["selection"]) == {"best", "last"}
    assert out.info["selected_rounds"] == {}
    best = out.cases[out.cases["selection"] == "best"].drop(columns="selection")
    last = out.cases[out.cases["selection"] == "last"].drop(columns="selection")
    assert set(best["round"]) == {2}
    assert best.reset_index(drop=True).equals(last.reset_index(drop=True))


def test_phase_times_accumulate_over_rounds_and_the_final_cases(monkeypatch):
    """``timings`` sums each phase's windows. The engine's clock is replaced by one that only
    the method's hooks advance: 10 per client set-up, 100 per local update, 1000 per
    aggregation, 1 per model evaluated. Three rounds of three clients give setup 30, train 900,
    aggregate 3000 and eval 3 × 3 + 3 (the final cases) = 12: sums, not the last window. The
    clock starts far from zero, so that a window added to its start, not subtracted, shows."""
    clock = [5000.0]

    class Ticking(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def setup(self, client):
            clock[0] += 10.0
            return super().setup(client)

        def local_update(self, client):
            clock[0] += 100.0
            return super().local_update(client)

        def aggregate(self, uploads, round):
            clock[0] += 1000.0
            return super().aggregate(uploads, round)

        def eval_model(self, client):
            clock[0] += 1.0
            return super().eval_model(client)

    Ticking.name = "fedavg"
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    _, out = run(tiny_federation(), Ticking(), rounds=3)
    timings = {k: out.info["timings"][k] for k in ("setup_s", "train_s", "aggregate_s", "eval_s")}
    assert timings == {"setup_s": 30.0, "train_s": 900.0, "aggregate_s": 3000.0, "eval_s": 12.0}
    assert out.info["timings"]["total_s"] == 3942.0
    assert set(out.info["timings"]) == {"setup_s", "train_s", "aggregate_s", "eval_s", "total_s"}


def test_the_protocols_thread_count_is_applied_and_recorded():
    before = torch.get_num_threads()
    try:
        _, out = run(tiny_federation(), "fedavg", rounds=1, threads=2)
        assert out.info["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_hooks_get_each_round_and_the_clients_mean_validation_dice():
    """The tuner's pruning hook: (round, mean over clients of the round's validation Dice)."""
    data = tiny_federation()
    seen, progress = [], []
    fed = Federation(
        data,
        make_splits(data),
        get_method("fedavg")(),
        TINY_MODEL,
        fast_protocol(rounds=2),
        0,
        on_eval=lambda r, score: seen.append((r, score)),
        on_round=lambda r, total: progress.append((r, total)),
    )
    out = fed.run()
    assert progress == [(1, 2), (2, 2)]  # the progress bar's hook
    rows = out.rounds
    val = rows[
        (rows["split"] == "val") & (rows["structure"] == "mean") & (rows["metric"] == "dice")
    ]
    want = [(r, float(np.nanmean(g["value"]))) for r, g in val.groupby("round")]
    assert [r for r, _ in seen] == [1, 2]
    for (r, score), (wr, wscore) in zip(seen, want, strict=True):
        assert r == wr and score == pytest.approx(wscore, abs=1e-12)


def test_the_manifest_sizes_each_clients_partition_as_of_the_last_round():
    """FedAP shares everything during its warm-up round and keeps BatchNorm local after it: the
    manifest's client sizes are those of the partition after the last round."""
    fed, out = run(tiny_federation(), get_method("fedap")(warmup_rounds=1), rounds=2)
    method = get_method("fedap")(warmup_rounds=1)
    want = partition_sizes(fed.model, method.partition(fed.model))
    assert want["personal"] > 0
    assert out.info["client_partition_sizes"] == {c: want for c in ("site0", "site1", "site2")}


def test_the_manifest_records_placement_partition_deviations_and_the_devices_memory(monkeypatch):
    """The manifest fields the README and the report read: where the site data sit (the host, on
    the CPU), the method's base partition, the deviations in force for this configuration
    (Ditto with an explicit ``personal_epochs``) and peak memory measured for the run's device."""
    asked = []

    def fake_peak(device=None):
        asked.append(device)
        return 7.5

    monkeypatch.setattr(engine_module, "peak_memory_mb", fake_peak)
    method = get_method("ditto")(personal_epochs=1)
    fed, out = run(tiny_federation(), method, rounds=1, local_epochs=2)
    info = out.info
    assert info["data_placement"] == "host"
    assert info["partition_sizes"] == partition_sizes(fed.model, method.partition(fed.model))
    assert info["partition_sizes"]["shared"] > 0
    assert info["deviations"] == method.active_deviations()
    assert any("personal_epochs = 1" in d for d in info["deviations"])
    assert info["peak_memory_mb"] == 7.5 and asked == [torch.device("cpu")]


def test_every_evaluation_forward_runs_in_the_protocols_precision(monkeypatch):
    """``amp: bf16``: the per-round evaluation and the final cases (selected and last rounds)
    predict under bf16 too: reported numbers come from the precision the suite asked for.
    (On the tiny model bf16 and float32 class maps agree, so the precision is checked where
    it is asked for: the ``amp`` every forward receives.)"""
    calls = []
    real = engine_module.predict

    def spy(model, data, device, batch=32, amp="off"):
        calls.append(amp)
        return real(model, data, device, batch, amp)

    monkeypatch.setattr(engine_module, "predict", spy)
    _, out = run(tiny_federation(), "fedavg", rounds=2, amp="bf16")
    # per round: the 3 clients' val splits; final: 2 selections × (val, test) × 3 clients
    assert len(calls) == 2 * 3 + 2 * 2 * 3
    assert set(calls) == {"bf16"}
    assert len(out.cases)


def _breaks_in_round(k: int) -> type:
    class Breaks(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def local_update(self, client):
            if client.round == k:
                raise Diverged(f"non-finite loss (nan) in round {k}")
            super().local_update(client)

    Breaks.name = "fedavg"
    return Breaks


def test_a_run_that_diverges_between_evaluations_is_scored_at_its_last_completed_round():
    """eval_every 2, divergence in round 4: round 3 was never evaluated, so it is evaluated
    then, and the manifest says diverged after 3 rounds, on the CPU, optimizer state reset."""
    _, out = run(tiny_federation(), _breaks_in_round(4)(), rounds=4, eval_every=2)
    info = out.info
    assert info["status"] == "diverged" and info["rounds_done"] == 3
    assert info["error"] == "non-finite loss (nan) in round 4"
    assert sorted(out.rounds["round"].unique()) == [2, 3]
    assert set(out.cases.loc[out.cases["selection"] == "last", "round"]) == {3}
    assert info["device"] == "cpu" and info["optimizer_state"] == "reset"
    # cases.parquet has one layout, whether or not any round completed (see the next test)
    assert list(out.cases.columns) == ["selection", "round", "client", "split", *METRIC_COLUMNS]
    _, kept = run(tiny_federation(), "fedavg", rounds=1, optimizer_state="persist")
    assert kept.info["optimizer_state"] == "persist"


def test_a_run_that_diverges_right_after_an_evaluation_is_not_evaluated_twice():
    """eval_every 1, divergence in round 3: round 2 was evaluated when it ended, so its rows
    appear once (a second evaluation would duplicate every round-2 row)."""
    _, out = run(tiny_federation(), _breaks_in_round(3)(), rounds=3, eval_every=1)
    assert out.info["status"] == "diverged" and out.info["rounds_done"] == 2
    keys = ["round", "client", "split", "structure", "metric"]
    assert not out.rounds.duplicated(keys).any()
    assert len(out.rounds) == 2 * 3 * 2 * 2  # rounds × clients × (blob, mean) × (dice, iou)
    assert set(out.cases.loc[out.cases["selection"] == "last", "round"]) == {2}


def test_unseen_sites_are_scored_only_in_a_final_run_that_holds_some_out():
    """A final run with no held-out site has no unseen rows and no ``unseen_s`` timing; a tuning
    run that holds a site out never scores it (tuning sees validation splits only)."""
    data = tiny_federation()
    _, plain = run(data, "fedavg", rounds=1)
    assert "unseen_s" not in plain.info["timings"] and "held_out" not in plain.info
    assert set(plain.cases["split"]) == {"val", "test"} and "regime" not in plain.cases
    _, tune = run(data, "fedavg", rounds=1, mode="tune", held_out=["site2"])
    assert tune.info["held_out"] == ["site2"] and "unseen_s" not in tune.info["timings"]
    assert set(tune.cases["split"]) == {"val"} and set(tune.cases["client"]) == {"site0", "site1"}


def test_a_run_that_diverges_in_round_one_has_empty_tables_with_their_columns():
    _, out = run(tiny_federation(), _breaks_in_round(1)(), rounds=2)
    assert out.info["status"] == "diverged" and out.info["rounds_done"] == 0
    assert out.cases.empty and out.rounds.empty
    assert list(out.cases.columns) == ["selection", "round", "client", "split", *METRIC_COLUMNS]
    assert list(out.rounds.columns) == ["round", "client", "split", "structure", "metric", "value"]


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_uses_the_precision_asked_for(amp, dtype):
    with autocast(amp, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == dtype
    with autocast("off", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_output_channels_one_logit_for_one_structure_else_one_per_class():
    two = tiny_federation()
    assert two.num_classes == 2 and output_channels(two) == 1
    three = dataclasses.replace(two, classes=["background", "a", "b"], structures={"a": [1]})
    assert output_channels(three) == 3


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_asking_for_cuda_without_one_is_refused_by_name():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu").type == "cpu"
    with pytest.raises(
        RuntimeError, match=r"^protocol\.device is 'cuda' but no CUDA device is available$"
    ):
        resolve_device("cuda")


def test_auto_picks_cuda_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")


def test_holding_out_an_unknown_site_or_every_site_is_refused_by_name():
    """The engine's own check (the suite checks first): the error names the unknown site, the
    dataset and its sites; holding out every site leaves no federation."""
    data = tiny_federation()

    names = str(["site0", "site1", "site2"])
    with pytest.raises(ValueError) as err:
        run(data, "fedavg", held_out=["site1", "site9"])
    assert (
        str(err.value)
        == f"held-out sites ['site9'] are not sites of dataset {data.name!r} ({names})"
    )
    with pytest.raises(ValueError) as err:
        run(data, "fedavg", held_out=("site0", "site1", "site2"))
    assert str(err.value) == f"dataset {data.name!r}: holding out {names} leaves no site"


def test_a_clean_run_says_ok_with_no_error_and_its_phase_times_within_the_total():
    _, out = run(tiny_federation(), "fedavg", rounds=1)
    info = out.info
    assert info["status"] == "ok" and info["error"] == "" and info["rounds_done"] == 1
    t = info["timings"]
    phases = t["setup_s"] + t["train_s"] + t["aggregate_s"] + t["eval_s"]
    assert all(t[k] >= 0 for k in ("setup_s", "train_s", "aggregate_s", "eval_s"))
    assert phases <= t["total_s"]


def test_the_sampled_clients_follow_the_run_seed():
    """``client_fraction`` < 1: which clients take part in a round is drawn from the run seed."""
    data = tiny_federation(n_sites=6)

    def sampled(seed: int) -> list:
        _, out = run(data, "fedavg", seed=seed, rounds=3, client_fraction=0.5)
        comm = out.comm[(out.comm["round"] > 0) & out.comm["sampled"]]
        return sorted(map(tuple, comm[["round", "client"]].values.tolist()))

    first = sampled(0)
    assert len(first) == 3 * 3 and first == sampled(0)
    assert first != sampled(1) or first != sampled(2)


def test_each_rounds_sampled_clients_are_distinct():
    """Clients are sampled without replacement: three of four take part in every round, three
    different ones (a draw with replacement would train some client twice in a round)."""
    _, out = run(tiny_federation(n_sites=4), "fedavg", rounds=8, eval_every=8, client_fraction=0.75)
    sampled = out.comm[(out.comm["round"] > 0) & out.comm["sampled"]]
    assert sampled.groupby("round")["client"].nunique().tolist() == [3] * 8
    assert sampled.groupby("round").size().tolist() == [3] * 8


def test_every_download_is_recorded_against_the_client_that_received_it():
    """FedAvg broadcasts to every client after every round: one download row per client and
    round, each naming its client and carrying the message's bytes."""
    data = tiny_federation()
    _, out = run(data, "fedavg", rounds=2)
    down = out.comm[out.comm["bytes_down"] > 0]
    names = sorted(s.name for s in data.sites)
    assert [sorted(g["client"]) for _, g in down.groupby("round")] == [names, names]
    assert down["bytes_down"].nunique() == 1  # the same broadcast to all


def test_a_method_that_never_communicates_is_never_asked_for_an_upload():
    """``communicates = False`` is a promise the engine keeps: no upload is requested (even
    though the inherited ``upload`` would return one), nothing is aggregated, no byte moves."""
    calls = {"upload": 0, "aggregate": 0}

    class Silent(get_method("fedavg")):  # type: ignore[misc, valid-type]
        communicates = False

        def upload(self, client):
            calls["upload"] += 1
            return super().upload(client)

        def aggregate(self, uploads, round):
            calls["aggregate"] += 1
            return super().aggregate(uploads, round)

    Silent.name = "fedavg"
    _, out = run(tiny_federation(), Silent(), rounds=2)
    assert calls == {"upload": 0, "aggregate": 0}
    assert out.info["bytes_up"] == 0 and out.info["bytes_down"] == 0
    assert out.comm["sampled"].sum() == 2 * 3  # every client still trained in both rounds


def test_the_clients_random_streams_follow_the_run_seed():
    """Each client's generator is seeded from the run seed: the same seed draws the same
    numbers in every client hook, another seed other numbers."""

    def draws(seed: int) -> list[float]:
        seen: list[float] = []

        class Probe(get_method("fedavg")):  # type: ignore[misc, valid-type]
            def local_update(self, client):
                seen.extend(torch.rand(2, generator=client.generator("probe")).tolist())
                return super().local_update(client)

        Probe.name = "fedavg"
        run(tiny_federation(), Probe(), seed=seed, rounds=1)
        return seen

    first = draws(0)
    assert len(first) == 3 * 2 and len(set(first)) == 6  # each client its own numbers
    assert first == draws(0)
    assert set(first).isdisjoint(draws(1))


def test_a_newcomer_of_a_method_that_never_communicates_is_shown_no_messages():
    """``ServerView.messages`` is empty (not absent) when the federation sent nothing."""
    shown = []

    class Silent(get_method("local")):  # type: ignore[misc, valid-type]
        def newcomer_model(self, view, site):
            shown.append(view.messages)
            return super().newcomer_model(view, site)

    Silent.name = "local"
    _, out = run(tiny_federation(), Silent(), rounds=1, held_out=["site2"])
    assert shown == [{}]
    assert set(out.cases.loc[out.cases["split"] == "unseen", "client"]) == {"site2"}


def test_the_server_starts_from_the_initial_model_and_the_set_up_is_round_zero():
    """``start_server`` is handed the seeded initial model and the clients' ids in order; every
    set-up hook (the client's and the server's answer to it) runs in round 0, before round 1."""
    seen: dict = {"setup": [], "receive": []}

    class Recording(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def start_server(self, model, client_ids):
            seen["start"] = ({k: v.clone() for k, v in model.state_dict().items()}, client_ids)
            super().start_server(model, client_ids)

        def setup(self, client):
            seen["setup"].append((client.id, client.round))
            return torch.zeros(3)

        def setup_server(self, payloads):
            seen["payloads"] = sorted(payloads)
            return {cid: torch.ones(2) for cid in payloads}

        def receive_setup(self, client, message):
            seen["receive"].append((client.id, client.round, message.tolist()))

    Recording.name = "fedavg"
    fed, out = run(tiny_federation(), Recording(), rounds=1)
    ids = ["site0", "site1", "site2"]
    state, client_ids = seen["start"]
    assert list(client_ids) == ids and state.keys() == fed.initial.keys()
    assert all(torch.equal(state[k], fed.initial[k]) for k in state)
    assert seen["setup"] == [(c, 0) for c in ids] and seen["payloads"] == ids
    assert seen["receive"] == [(c, 0, [1.0, 1.0]) for c in ids]
    setup = out.comm[out.comm["round"] == 0]
    assert setup["bytes_up"].sum() == 3 * 3 * 4 and setup["bytes_down"].sum() == 3 * 2 * 4


def test_without_a_set_up_payload_the_server_is_not_asked_to_answer_one():
    """FedAvg sends nothing at set-up: ``setup_server`` is never called, round 0 moves no bytes."""
    calls = []

    class Quiet(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def setup_server(self, payloads):
            calls.append(dict(payloads))
            return super().setup_server(payloads)

    Quiet.name = "fedavg"
    _, out = run(tiny_federation(), Quiet(), rounds=1)
    assert calls == []
    assert out.comm[out.comm["round"] == 0].empty


def test_setup_traffic_is_counted_in_round_zero():
    """ResFIM's amplitude bank: each client uploads its bank once and receives the others' in
    round 0, before any training round."""
    _, out = run(tiny_federation(), ResFIM(bank_size=2, fisher_samples=2), rounds=1)
    setup = out.comm[out.comm["round"] == 0]
    bank = 2 * 1 * 16 * 16 * 4  # bank_size × C × H × W float32
    up = setup.groupby("client")["bytes_up"].sum()
    down = setup.groupby("client")["bytes_down"].sum()
    assert up.to_dict() == {c: bank for c in ("site0", "site1", "site2")}
    assert down.to_dict() == {c: 2 * bank for c in ("site0", "site1", "site2")}


def test_the_protocols_shuffle_and_fp16_reach_every_clients_local_work():
    """``shuffle`` and ``amp`` of the protocol are what the clients train with: turning shuffling
    off changes the run, and under fp16 each client keeps its gradient scaler's scale."""
    data = tiny_federation()
    _, shuffled = run(data, "fedavg", rounds=1)
    _, ordered = run(data, "fedavg", rounds=1, shuffle=False)
    assert not shuffled.rounds["value"].equals(ordered.rounds["value"])
    cls = capturing(get_method("fedavg"))
    run(data, cls(), rounds=1, amp="fp16")
    assert all("_grad_scaler/main" in cls.states[c] for c in ("site0", "site1", "site2"))


def test_scores_use_the_sites_spacing_and_the_datasets_case_level():
    """Surface distances are in the site's physical units (doubling the pixel spacing doubles
    HD95 and ASSD of the same predictions), computed only when the protocol asks, and a volume
    dataset is scored once per volume."""
    data = tiny_federation()
    wide = dataclasses.replace(
        data, sites=[dataclasses.replace(s, spacing=(2.0, 2.0)) for s in data.sites]
    )
    _, one = run(data, "fedavg", rounds=1, surface_metrics=True)
    _, two = run(wide, "fedavg", rounds=1, surface_metrics=True)
    for col in ("hd95", "assd"):
        a, b = one.cases[col].to_numpy(), two.cases[col].to_numpy()
        finite = np.isfinite(a)
        assert finite.any() and (a[finite] > 0).any()
        np.testing.assert_allclose(b[finite], 2.0 * a[finite], rtol=1e-6)
    vol = dataclasses.replace(
        data,
        sites=[
            dataclasses.replace(s, case_ids=[f"{s.name}-v{i // 2}" for i in range(len(s))])
            for s in data.sites
        ],
        case_level="volume",
    )
    _, out = run(vol, "fedavg", rounds=1)
    test = out.cases[(out.cases["split"] == "test") & (out.cases["selection"] == "last")]
    per_case = test.groupby(["client", "case_id"]).size()
    assert (per_case == len(data.structures)).all() and len(per_case) > 0
    assert out.cases[["hd95", "assd"]].isna().all().all()  # surface_metrics: false computes none


def test_models_are_handed_out_for_evaluation_at_their_round():
    """``eval_model`` sees the round being evaluated, the final cases' last model included."""
    seen = []

    class Rounds(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def eval_model(self, client):
            seen.append(client.round)
            return super().eval_model(client)

    Rounds.name = "fedavg"
    run(tiny_federation(), Rounds(), rounds=2)
    assert seen == [1] * 3 + [2] * 3 + [2] * 3  # rounds 1 and 2, then the final cases


def test_a_tie_in_validation_dice_keeps_the_earlier_round():
    """A client whose model never changes scores the same every round: the best snapshot is
    the first selectable round (3 of 4 under best_after_half), not a later equal one."""

    class Frozen(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def local_update(self, client):
            pass  # no training: every round evaluates the initial model

    Frozen.name = "fedavg"
    _, out = run(tiny_federation(), Frozen(), rounds=4)
    val = out.rounds[(out.rounds["split"] == "val") & (out.rounds["metric"] == "dice")]
    assert val.groupby(["client", "structure"])["value"].nunique().eq(1).all()  # a real tie
    assert out.info["selected_rounds"] == {"site0": 3, "site1": 3, "site2": 3}


def test_peak_memory_adds_the_gpus_peak_on_a_cuda_device_only(monkeypatch):
    """On a CUDA device the manifest's peak is the process's RSS plus the GPU's peak allocation
    (both MiB); on the CPU the GPU is not asked."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 1024))
    asked = []

    def gpu_peak(device):
        asked.append(device)
        return 5 * 2**20

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", gpu_peak)
    assert peak_memory_mb(torch.device("cpu")) == 3.0 and asked == []
    assert peak_memory_mb(torch.device("cuda", 0)) == 8.0 and asked == [torch.device("cuda", 0)]
