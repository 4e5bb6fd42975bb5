"""Unseen sites (issue 19): what a site that did not take part gets, and that it stays out.

Each test checks a defining property: FedAvg's newcomer is the final global model bit for bit;
FedBN's zero-shot statistics come from the new site's images only and never from its labels;
few-shot spends exactly K steps on the new site's train split; a held-out site's data never
reach the federation; the held-out set enters the run key only when it is set.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation
from method_helpers import exactly, make_client

import pflbench.client as client_module
from pflbench.client import Budget
from pflbench.data import FederatedData, make_splits
from pflbench.engine import Federation
from pflbench.messages import Message, Upload, payload_bytes
from pflbench.method import Method, ServerView, missing_statistics
from pflbench.methods.fedrdn import channel_statistics
from pflbench.registry import get_method
from pflbench.runner import RunSpec, plan
from pflbench.suite import DatasetSpec, Evaluation, MethodSpec, SuiteError, parse_suite
from pflbench.training import Diverged

HELD = "site2"


def _recording(base: str) -> type[Method]:
    """``base`` that keeps its last broadcast, its newcomer models and the sites its client hooks
    saw, in class-level attributes (test only; one class per test)."""
    parent = get_method(base)

    class Recording(parent):  # type: ignore[misc, valid-type]
        broadcasts: list = []
        newcomers: dict = {}
        seen: set = set()
        final: dict = {}

        def local_update(self, client):
            type(self).seen.add((client.id, client.train_data.name))
            super().local_update(client)

        def aggregate(self, uploads, round):
            msg = super().aggregate(uploads, round)
            type(self).broadcasts.append(msg)
            return msg

        def eval_model(self, client):
            model = super().eval_model(client)
            type(self).final[client.id] = {k: v.clone() for k, v in model.state_dict().items()}
            return model

        def newcomer_model(self, view, site):
            model = super().newcomer_model(view, site)
            type(self).newcomers[site.id] = {k: v.clone() for k, v in model.state_dict().items()}
            return model

    Recording.name = parent.name
    return Recording


def _run(data: FederatedData, method: Method, held=(HELD,), splits=None, seed=0, **ev):
    fed = Federation(
        data,
        splits or make_splits(data),
        method,
        TINY_MODEL,
        fast_protocol(rounds=2, local_epochs=1),
        seed,
        held_out=held,
        evaluation=Evaluation(unseen=list(held), **ev) if held else None,
    )
    return fed, fed.run()


def test_fedavg_newcomer_is_the_final_global_model_bit_for_bit():
    cls = _recording("fedavg")
    _, out = _run(tiny_federation(), cls(), regimes=["zero_shot"])
    final = cls.broadcasts[-1]
    got = cls.newcomers[HELD]
    assert set(final.entries) == {k for k, v in got.items() if v.is_floating_point()}
    for k, v in final.entries.items():
        assert torch.equal(got[k], v), k
    # ... which is every federated client's final model (FedAvg: all equal the global one)
    for cid in ("site0", "site1"):
        for k in final.entries:
            assert torch.equal(cls.final[cid][k], got[k]), (cid, k)
    assert "newcomer_bn" not in out.info["budget"]  # nothing was recomputed
    rows = out.cases[out.cases["split"] == "unseen"]
    assert set(rows["client"]) == {HELD} and set(rows["regime"]) == {"zero_shot"}


def test_mrmtl_newcomer_takes_the_broadcast_mean_for_every_parameter():
    """MR-MTL's personal models never leave the clients; a new site gets the mean v̄ itself
    (every parameter the broadcast carries) and BN statistics from its own images."""
    cls = _recording("mrmtl")
    fed, out = _run(tiny_federation(), cls(lam=0.5), regimes=["zero_shot"])
    got = cls.newcomers[HELD]
    final = cls.broadcasts[-1]
    assert set(final.entries) == {k for k, _ in fed.model.named_parameters()}
    for k, v in final.entries.items():
        assert torch.equal(got[k], v), k
        assert not torch.equal(got[k], fed.initial[k]), k  # the mean moved off the init
    assert out.info["budget"]["newcomer_bn"] > 0  # running statistics: the site's own


def test_fedrdn_newcomer_is_the_global_model_on_inputs_normalized_by_its_own_statistics():
    """FedRDN's evaluation rule for a new site: the final global model, its inputs normalized
    with the channel statistics of the site's own unlabelled train images."""
    seen = {}

    class Capture(_recording("fedrdn")):
        def newcomer_model(self, view, site):
            seen[site.id] = site.train_data.images.clone()
            return super().newcomer_model(view, site)

    _run(tiny_federation(), Capture(), regimes=["zero_shot"])
    got = Capture.newcomers[HELD]
    for k, v in Capture.broadcasts[-1].entries.items():
        assert torch.equal(got[f"model.{k}"], v), k
    own = channel_statistics(seen[HELD], HELD)
    assert torch.equal(got["mean"], own["mean"]) and torch.equal(got["std"], own["std"])
    assert set(Capture.newcomers) == {HELD}  # only the held-out site is a newcomer


def _with_site(data: FederatedData, name: str, **change) -> FederatedData:
    sites = [dataclasses.replace(s, **change) if s.name == name else s for s in data.sites]
    return dataclasses.replace(data, sites=sites)


def _probe() -> type[Method]:
    """FedAvg whose newcomer hook records what it was handed (test only)."""

    class Probe(get_method("fedavg")):  # type: ignore[misc, valid-type]
        seen: list = []

        def newcomer_model(self, view, site):
            draw = torch.randint(2**62, (1,), generator=site.generator("probe"))
            type(self).seen.append(
                {
                    "initial": {k: v.clone() for k, v in view.initial.items()},
                    "round": site.round,
                    "state": site.state,
                    "draw": int(draw),
                    "data": site.train_data,
                }
            )
            return super().newcomer_model(view, site)

    Probe.name = "fedavg"
    return Probe


def test_the_newcomer_hook_gets_its_unlabelled_train_split_the_initial_model_and_the_next_round():
    """The zero-shot site: its own train split with every label zeroed but nothing else changed
    (name, cases, slice order, spacing), an empty state of its own, the federation's seeded
    initial weights in the view, and the round after the last one."""
    site = next(s for s in tiny_federation().sites if s.name == HELD)
    n = len(site)
    data = _with_site(
        tiny_federation(), HELD, slice_index=list(range(n, 0, -1)), spacing=(0.5, 2.0)
    )
    splits = make_splits(data)
    cls = _probe()
    fed, _ = _run(data, cls(), splits=splits, regimes=["zero_shot"])
    (seen,) = cls.seen
    assert seen["round"] == fed.rounds_done + 1 == 3
    assert seen["state"] == {}
    assert seen["initial"].keys() == fed.initial.keys()
    assert all(torch.equal(seen["initial"][k], v) for k, v in fed.initial.items())
    train, got = fed.newcomers[0].train, seen["data"]
    assert train.slice_index != list(range(len(train))) and train.spacing == (0.5, 2.0)
    assert (got.name, got.case_ids, got.slice_index, got.spacing) == (
        train.name,
        train.case_ids,
        train.slice_index,
        train.spacing,
    )
    assert torch.equal(got.images, train.images) and int(train.labels.sum()) > 0
    assert got.labels.shape == train.labels.shape and int(got.labels.abs().sum()) == 0


def test_the_newcomers_draws_follow_the_run_seed():
    """Its seeded streams (few-shot shuffling, any draw a newcomer hook makes) are the run's:
    the same seed draws the same, another seed draws otherwise."""
    draws = []
    for seed in (0, 0, 1):
        cls = _probe()
        _run(tiny_federation(), cls(), seed=seed, regimes=["zero_shot"])
        draws.append(cls.seen[0]["draw"])
    assert draws[0] == draws[1] != draws[2]


def test_fedbn_zero_shot_statistics_come_from_the_new_sites_images_only():
    data = tiny_federation()
    splits = make_splits(data)
    cls = _recording("fedbn")
    fed, out = _run(data, cls(), splits=splits, regimes=["zero_shot"])
    got = cls.newcomers[HELD]
    # shared entries: the broadcast; BN affine parameters: the initial ones (never sent)
    final = cls.broadcasts[-1]
    for k, v in final.entries.items():
        assert torch.equal(got[k], v), k
    first_bn = next(n for n, m in fed.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(got[f"{first_bn}.weight"], fed.initial[f"{first_bn}.weight"])
    # by hand: the first BN's running mean is the mean over batches of its input's channel means
    model = fed.model
    model.load_state_dict(got)
    model.eval()
    inputs = []
    hook = model.get_submodule(first_bn).register_forward_hook(
        lambda m, i, o: inputs.append(i[0].detach())
    )
    images = fed.newcomers[0].train.images
    with torch.no_grad():
        for i in range(0, len(images), 4):
            model(images[i : i + 4])
    hook.remove()
    expected = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    assert torch.allclose(got[f"{first_bn}.running_mean"], expected, atol=1e-6)
    assert out.info["budget"]["newcomer_bn"] == len(images)
    # the new site's other images change them; its train labels (poisoned) change nothing
    train = splits[HELD]["train"]
    site = next(s for s in data.sites if s.name == HELD)
    poisoned = site.labels.clone()
    idx = [i for i, c in enumerate(site.case_ids) if c in set(train)]
    poisoned[idx] = 1 - poisoned[idx]
    cls2 = _recording("fedbn")
    _, out2 = _run(
        _with_site(data, HELD, labels=poisoned), cls2(), splits=splits, regimes=["zero_shot"]
    )
    for k, v in got.items():
        assert torch.equal(cls2.newcomers[HELD][k], v), k
    pd.testing.assert_frame_equal(out.cases, out2.cases)
    cls3 = _recording("fedbn")
    _run(
        _with_site(data, HELD, images=site.images * 0.5),
        cls3(),
        splits=splits,
        regimes=["zero_shot"],
    )
    assert not torch.equal(
        cls3.newcomers[HELD][f"{first_bn}.running_mean"], got[f"{first_bn}.running_mean"]
    )


def test_zero_shot_newcomer_cannot_train_on_labels():
    class Cheat(get_method("fedavg")):
        name = "cheat"

        def newcomer_model(self, view, site):
            model = super().newcomer_model(view, site)
            assert int(site.train_data.labels.abs().sum()) == 0  # labels are blanked
            site.fit(model, steps=1, label="cheat")
            return model

    said = (
        f"site {HELD!r} is a zero-shot newcomer: it has no labels to train on (use its "
        "unlabelled images, client.train_data.images, or the few_shot regime)"
    )
    with pytest.raises(PermissionError, match=exactly(said)):
        _run(tiny_federation(), Cheat(), regimes=["zero_shot"])


def test_unseen_rows_are_the_last_rounds_and_their_time_is_recorded():
    data = tiny_federation()
    _, out = _run(data, get_method("fedavg")(), regimes=["zero_shot", "few_shot"])
    rows = out.cases[out.cases["split"] == "unseen"]
    assert len(rows) and set(rows["selection"]) == {"last"} and set(rows["round"]) == {2}
    assert out.cases.index.equals(pd.RangeIndex(len(out.cases)))  # one table, one index
    timings = out.info["timings"]
    assert 0.0 < timings["unseen_s"] <= timings["total_s"]


@pytest.mark.parametrize("regimes", [["few_shot", "zero_shot"], ["few_shot"]])
def test_a_diverged_few_shot_adaptation_is_named_and_the_other_regimes_still_scored(regimes):
    """A newcomer whose few-shot steps diverge loses that regime only: the error names the site,
    the zero-shot rows remain (listed after it or not), and a run left with no unseen row at
    all still finishes."""

    class Unstable(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def newcomer_adapt(self, site, model, steps):
            raise Diverged("non-finite loss (nan) in few_shot step 1")

    Unstable.name = "fedavg"
    _, out = _run(tiny_federation(), Unstable(), regimes=regimes)
    assert out.info["newcomer_errors"] == [
        f"{HELD} few_shot: non-finite loss (nan) in few_shot step 1"
    ]
    rows = out.cases[out.cases["split"] == "unseen"]
    scored = set(rows["regime"]) if "regime" in rows else set()  # no unseen row: no column
    assert scored == ({"zero_shot"} if "zero_shot" in regimes else set())
    assert len(out.cases[out.cases["split"] == "test"]) > 0


def test_few_shot_spends_exactly_k_steps_on_the_new_sites_train_split(monkeypatch):
    K = 3
    data = tiny_federation()
    splits = make_splits(data)
    site = next(s for s in data.sites if s.name == HELD)
    train_images = site.subset(splits[HELD]["train"]).images.flatten(1)
    steps: list[torch.Tensor] = []
    original = client_module.train_epochs

    def spy(model, batches, opt, *, where, **kw):
        if "(few_shot)" in where:
            batches = list(batches)
            steps.extend(x for x, _ in batches)
        return original(model, iter(batches), opt, where=where, **kw)

    monkeypatch.setattr(client_module, "train_epochs", spy)
    _, out = _run(data, get_method("fedavg")(), splits=splits, few_shot_steps=K)
    assert len(steps) == K
    for x in steps:  # every image of every step is one of the new site's train images
        d = torch.cdist(x.flatten(1), train_images)
        assert bool((d.min(1).values == 0).all())
    assert out.info["budget"]["few_shot"] == sum(len(x) for x in steps)
    rows = out.cases[out.cases["split"] == "unseen"]
    zero = rows[rows["regime"] == "zero_shot"]["dice"].to_numpy()
    few = rows[rows["regime"] == "few_shot"]["dice"].to_numpy()
    assert len(zero) == len(few) > 0 and not (zero == few).all()  # K steps changed the model


def test_held_out_site_never_reaches_the_federation():
    data = tiny_federation()
    splits = make_splits(data)
    cls = _recording("fedbn")
    # NaN images: any use of them in training or aggregation would poison every number
    site = next(s for s in data.sites if s.name == HELD)
    poisoned = _with_site(data, HELD, images=torch.full_like(site.images, float("nan")))
    fed, out = _run(poisoned, cls(), splits=splits, regimes=["zero_shot"])
    assert HELD not in fed.ids and {c for c, _ in cls.seen} == {"site0", "site1"}
    assert all(c == n for c, n in cls.seen)
    without = FederatedData(
        name=data.name,
        sites=[s for s in data.sites if s.name != HELD],
        classes=data.classes,
        structures=data.structures,
    )
    _, ref = _run(without, get_method("fedbn")(), held=(), splits=splits)
    pd.testing.assert_frame_equal(out.rounds, ref.rounds)
    pd.testing.assert_frame_equal(out.comm, ref.comm)
    mine = out.cases[out.cases["split"] != "unseen"].drop(columns="regime")
    pd.testing.assert_frame_equal(mine.reset_index(drop=True), ref.cases)


def test_personal_average_gives_the_clients_heads_and_counts_the_bytes():
    cls = _recording("fedper")
    fed, out = _run(tiny_federation(), cls(), regimes=["zero_shot"], newcomer_personal="average")
    got = cls.newcomers[HELD]
    head = [k for k in got if k.startswith("head.")]
    assert head
    w = {c: float(fed.by_id[c].train.images.shape[0]) for c in ("site0", "site1")}
    for k in head:
        want = sum(w[c] * cls.final[c][k].double() for c in w) / sum(w.values())
        assert torch.allclose(got[k].double(), want, atol=1e-6), k
    assert out.info["newcomer_bytes_up"] == 2 * sum(cls.final["site0"][k].numel() * 4 for k in head)


def test_personal_average_of_element_masks_is_per_element_over_the_clients_keeping_it():
    """ResFIM's personal part is element-wise: each element of the newcomer's model is the
    n-weighted mean over the clients that keep that element personal, and the broadcast value
    where every client shares it. Bytes: the kept elements plus their one-bit masks."""

    class Masks(_recording("resfim")):
        shared: dict = {}

        def eval_model(self, client):
            type(self).shared[client.id] = dict(client.state.get("resfim/shared", {}))
            return super().eval_model(client)

    data = tiny_federation(sizes=[6, 14, 8])  # unequal n: a plain mean would show
    fed, out = _run(
        data,
        Masks(rho=0.3, bank_size=2, fisher_samples=2),
        regimes=["zero_shot"],
        newcomer_personal="average",
    )
    got, final, shared = Masks.newcomers[HELD], Masks.final, Masks.shared
    w = {c: float(fed.by_id[c].train.images.shape[0]) for c in ("site0", "site1")}
    assert w["site0"] != w["site1"]
    partial = overlap = 0
    for k, s0 in shared["site0"].items():
        keep = {c: ~torch.as_tensor(shared[c][k]).expand_as(final[c][k]) for c in w}
        den = sum(w[c] * keep[c].double() for c in w)
        num = sum(w[c] * keep[c].double() * final[c][k].double() for c in w)
        want = torch.where(den > 0, num / den.clamp_min(1e-12), final["site0"][k].double())
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6, msg=k)
        partial += isinstance(s0, torch.Tensor)
        overlap += int((keep["site0"] & keep["site1"]).sum())
    # element masks, not whole tensors, were averaged; some elements kept by both (weighted)
    assert partial > 0 and overlap > 0
    assert out.info["newcomer_bytes_up"] > 0


def test_personal_average_uploads_only_tensors_with_a_personal_element():
    """A tensor whose element mask shares every element has nothing personal: it is not part of
    the one upload after the last round (its bytes would be counted for nothing)."""
    keys: dict = {}

    class Masked(get_method("fedavg")):  # type: ignore[misc, valid-type]
        def client_partition(self, client):
            part = super().client_partition(client)
            floats = [k for k, v in client.model.state_dict().items() if v.is_floating_point()]
            keys["all"], keys["one"] = floats[0], floats[1]
            part[keys["all"]] = torch.ones_like(
                client.model.state_dict()[keys["all"]], dtype=torch.bool
            )
            one = torch.ones_like(client.model.state_dict()[keys["one"]], dtype=torch.bool)
            one.view(-1)[0] = False  # one personal element
            part[keys["one"]] = one
            return part

    Masked.name = "fedavg"
    fed, out = _run(tiny_federation(), Masked(), regimes=["zero_shot"], newcomer_personal="average")
    shape = fed.model.state_dict()[keys["one"]].shape
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[0] = True
    one = Upload(entries={keys["one"]: torch.zeros(shape)}, masks={keys["one"]: mask}, weight=1.0)
    assert out.info["newcomer_bytes_up"] == 2 * payload_bytes(one)  # two federated clients


def test_personal_average_reads_each_clients_partition_as_of_the_last_round():
    """FedAP shares everything during its warm-up and keeps BatchNorm local after it: the
    personal entries uploaded once after the last round are the BN ones of that last round."""
    cls = _recording("fedap")
    fed, out = _run(
        tiny_federation(), cls(warmup_rounds=1), regimes=["zero_shot"], newcomer_personal="average"
    )
    got, final = cls.newcomers[HELD], cls.final
    bn = [k for k in got if ".bn" in k or "norm" in k]
    w = {c: float(fed.by_id[c].train.images.shape[0]) for c in ("site0", "site1")}
    personal = [k for k in bn if got[k].is_floating_point()]
    assert personal and out.info["newcomer_bytes_up"] > 0
    for k in personal:
        want = sum(w[c] * final[c][k].double() for c in w) / sum(w.values())
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6, msg=k)


def test_run_key_holds_the_held_out_set_only_when_set():
    from conftest import fast_protocol as proto

    base = RunSpec(DatasetSpec(name="synthetic"), MethodSpec(name="fedavg"), 0, proto(), TINY_MODEL)
    assert "unseen" not in base.semantic("fp")
    a = dataclasses.replace(base, held_out=("a",), evaluation=Evaluation(unseen="leave_one_out"))
    b = dataclasses.replace(base, held_out=("b",), evaluation=Evaluation(unseen="leave_one_out"))
    assert len({base.key("fp"), a.key("fp"), b.key("fp")}) == 3
    assert a.semantic("fp")["unseen"]["held_out"] == ["a"]
    assert "-out_a-" in a.key("fp")


def _suite(evaluation: dict) -> dict:
    return {
        "name": "u",
        "datasets": [
            {"name": "synthetic", "options": {"sites": 3, "size": 16, "images_per_site": [6, 6, 6]}}
        ],
        "methods": ["fedavg", "fedbn"],
        "seeds": [0, 1],
        "protocol": {"rounds": 1, "local_epochs": 1},
        "evaluation": evaluation,
    }


def test_leave_one_out_plans_one_cell_per_held_out_site_and_names_unknown_sites():
    suite = parse_suite(_suite({"unseen": "leave_one_out"}), "u.yaml")
    cells = plan(suite)
    assert len(cells) == 2 * 2 * 3
    assert sorted({c.held_out for c in cells}) == [
        (s,) for s in sorted({c.held_out[0] for c in cells})
    ]
    bad = parse_suite(_suite({"unseen": ["nowhere"]}), "u.yaml")
    with pytest.raises(SuiteError, match=r"\['nowhere'\] are not sites of dataset 'synthetic'"):
        plan(bad)
    with pytest.raises(SuiteError, match="few_shot_steps"):
        parse_suite(_suite({"unseen": "leave_one_out", "few_shot_steps": 0}), "u.yaml")


def test_unseen_table_gap_is_in_federation_minus_newcomer_over_the_blocks():
    from pflbench.report.data import Results
    from pflbench.report.tables import unseen_table

    idx = pd.MultiIndex.from_tuples([("d", f"s{i}") for i in range(4)], names=["dataset", "client"])
    blocks = pd.DataFrame(
        {
            ("fedavg", "in_federation"): [0.8, 0.7, 0.9, 0.6],
            ("fedavg", "zero_shot"): [0.5, 0.6, 0.4, 0.5],
            ("fedavg", "few_shot"): [0.7, 0.7, 0.8, 0.6],
        },
        index=idx,
    )
    res = Results(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), [])
    table, tests = unseen_table(blocks, ["fedavg"], res, practical=0.01, n_resamples=0)
    row = table.cells.loc["fedavg"]
    assert row["In federation"] == "0.750" and row["Zero-shot"] == "0.500"
    assert row["Gap (zero-shot)"].startswith("+0.250")  # mean of 0.3, 0.1, 0.5, 0.1
    assert row["Gap (few-shot)"].startswith("+0.050")
    assert len(tests) == 2 and bool(tests["too_few"].all())  # N = 4 blocks: descriptive only


def test_sweep_cells_carry_the_held_out_set():
    from pflbench.tuning import StudyRef

    suite = parse_suite(_suite({"unseen": ["site1"]}), "u.yaml")
    ref = StudyRef("r", "runs", suite.datasets[0], suite.methods[0], "fixed")
    cells = ref.cells(suite)
    assert [c["held_out"] for c in cells] == [["site1"], ["site1"]]
    assert all(c["cell"].endswith("/out_site1") for c in cells) and ref.total(suite) == 2
    plain = parse_suite({k: v for k, v in _suite({}).items() if k != "evaluation"}, "u.yaml")
    assert (
        "held_out"
        not in StudyRef("r", "runs", plain.datasets[0], plain.methods[0], "fixed").cells(plain)[0]
    )


def test_a_worker_sweep_runs_the_same_held_out_cells_as_the_plain_runner(tmp_path):
    from pflbench.results import iter_runs
    from pflbench.runner import DataCache
    from pflbench.storage import open_storage, resolve_storage
    from pflbench.worker import Worker

    raw = _suite({"unseen": "leave_one_out", "regimes": ["zero_shot"]})
    raw.update(methods=["fedavg"], seeds=[0])
    raw["protocol"].update(threads=1, device="cpu", surface_metrics=False)
    suite = parse_suite(raw, "u.yaml")
    out = tmp_path / "out"
    storage = open_storage(resolve_storage(None, out))
    done = Worker(suite, out, storage, index=0, threads=1).run()
    assert done.trials == 3
    cache = DataCache()
    want = {c.key(cache.get(c.dataset)[2]) for c in plan(suite, cache)}
    runs = {m["run_key"]: m for _, m in iter_runs(out)}
    assert set(runs) == want
    assert sorted(m["held_out"] for m in runs.values()) == [["site1"], ["site2"], ["site3"]]


def test_older_result_folders_without_unseen_columns_still_load(tmp_path):
    from pflbench.results import RunRecords, load_results, write_run

    def records(key: str, cases: pd.DataFrame, **manifest) -> RunRecords:
        empty = pd.DataFrame()
        base = {"run_key": key, "dataset": "d", "method": "fedavg", "label": "fixed", "seed": 0}
        return RunRecords(empty, empty, cases, {**base, **manifest})

    row = {"selection": "best", "round": 1, "client": "a", "split": "test", "case_id": "c",
           "structure": "s", "dice": 0.5, "iou": 0.3, "hd95": 1.0, "assd": 1.0}  # fmt: skip
    write_run(tmp_path, "old", records("old", pd.DataFrame([row])))
    new = pd.DataFrame([row, {**row, "split": "unseen", "client": "b", "regime": "zero_shot"}])
    write_run(tmp_path, "new", records("new", new, held_out=["b"]))
    cases = load_results(tmp_path, "cases")
    old = cases[cases["run_key"] == "old"]
    assert old["regime"].isna().all() and old["held_out"].isna().all()
    unseen = cases[cases["split"] == "unseen"]
    assert unseen[["client", "regime", "held_out"]].values.tolist() == [["b", "zero_shot", "b"]]


# the default newcomer rule, piece by piece ----------------------------------------------------------


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 1, 1)
    )


def test_server_view_broadcast_is_the_message_or_the_uniform_masked_average():

    one = Message(entries={"w": torch.tensor([1.0, 2.0])})
    assert ServerView(initial={}).broadcast() is None
    assert ServerView(initial={}, messages={"a": one, "b": one}).broadcast() is one
    # different messages: each element averaged over the messages that carry it (uniformly,
    # whatever the clients' sizes), a message's mask limiting what it carries
    a = Message(entries={"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([4.0])})
    b = Message(
        entries={"w": torch.tensor([3.0, 10.0]), "b": torch.tensor([8.0])},
        masks={"w": torch.tensor([True, False])},
    )
    c = Message(entries={"w": torch.tensor([5.0, 6.0]), "b": torch.tensor([0.0])})
    got = ServerView(initial={}, messages={"a": a, "b": b, "c": c}).broadcast()
    torch.testing.assert_close(
        got.entries["w"].double(), torch.tensor([3.0, 4.0], dtype=torch.float64)
    )
    torch.testing.assert_close(got.entries["b"].double(), torch.tensor([4.0], dtype=torch.float64))
    # the same two objects for some ids and another for the rest is not "one broadcast"
    mixed = ServerView(initial={}, messages={"a": a, "b": a, "c": c}).broadcast()
    torch.testing.assert_close(
        mixed.entries["b"].double(), torch.tensor([8 / 3], dtype=torch.float64)
    )


def test_missing_statistics_names_each_norm_layer_not_received_whole():

    net = _bn_net()
    assert missing_statistics(net, set()) == ["1"]
    assert missing_statistics(net, {"1.running_mean"}) == ["1"]
    assert missing_statistics(net, {"1.running_mean", "1.running_var"}) == []
    root = torch.nn.BatchNorm2d(2)  # a norm layer that is the model itself: keys without prefix
    assert missing_statistics(root, {"running_mean"}) == [""]
    assert missing_statistics(root, {"running_mean", "running_var"}) == []


def test_default_newcomer_starts_from_the_initial_model_and_recomputes_only_what_it_lacks():
    """Broadcast: the first conv and BN layer's statistics; personal average: the last conv.
    The newcomer takes both, keeps the initial model elsewhere (never the site object's own
    model), and recomputes no statistic it received."""

    initial = {k: v.clone() for k, v in _bn_net().state_dict().items()}
    other = _bn_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # the site object's own model is not the initial one
    sent = {
        "0.weight": torch.full_like(initial["0.weight"], 0.5),
        "1.running_mean": torch.tensor([0.3, -0.2]),
        "1.running_var": torch.tensor([2.0, 3.0]),
    }
    personal = {"2.weight": torch.full_like(initial["2.weight"], -0.25)}
    budget = Budget()
    site = make_client(other, budget=budget)
    site._train = dataclasses.replace(site.train_data, images=site.train_data.images[:, :1])
    view = ServerView(
        initial=initial, messages={"a": Message(entries=sent)}, personal=Message(entries=personal)
    )
    got = Method().newcomer_model(view, site).state_dict()
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        assert torch.equal(got[k], sent[k]), k
    assert torch.equal(got["2.weight"], personal["2.weight"])
    for k in ("0.bias", "1.weight", "1.bias", "2.bias"):
        assert torch.equal(got[k], initial[k]), k
    assert "newcomer_bn" not in budget.samples  # every statistic was received
    # the statistics only in the personal average: received too, nothing recomputed
    view = ServerView(
        initial=initial,
        messages={"a": Message(entries={"0.weight": sent["0.weight"]})},
        personal=Message(entries={k: sent[k] for k in ("1.running_mean", "1.running_var")}),
    )
    got = Method().newcomer_model(view, site).state_dict()
    assert torch.equal(got["1.running_var"], sent["1.running_var"])
    assert "newcomer_bn" not in budget.samples
    # none received: recomputed from the site's images (its own, one pass)
    view = ServerView(
        initial=initial, messages={"a": Message(entries={"0.weight": sent["0.weight"]})}
    )
    got = Method().newcomer_model(view, site).state_dict()
    assert budget.samples["newcomer_bn"] == len(site.train_data.images)
    assert not torch.equal(got["1.running_var"], initial["1.running_var"])


def test_default_newcomer_recomputes_only_the_norm_layers_it_did_not_receive():

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    )
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    sent = {"1.running_mean": torch.tensor([0.3, -0.2]), "1.running_var": torch.tensor([2.0, 3.0])}
    budget = Budget()
    site = make_client(net, budget=budget)
    site._train = dataclasses.replace(site.train_data, images=site.train_data.images[:, :1])
    view = ServerView(initial=initial, messages={"a": Message(entries=sent)})
    got = Method().newcomer_model(view, site).state_dict()
    for k, v in sent.items():  # received: kept as sent, not recomputed
        assert torch.equal(got[k], v), k
    assert not torch.equal(got["2.running_var"], initial["2.running_var"])  # recomputed
    assert budget.samples["newcomer_bn"] == len(site.train_data.images)
