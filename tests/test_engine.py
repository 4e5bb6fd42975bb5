"""The engine's contract: determinism, invariances, privacy boundary, accounting, selection."""

from __future__ import annotations

import gc
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation
from method_helpers import make_client, run

from pflbench.aggregation import aggregation_weights, masked_average, merge_into
from pflbench.client import Budget
from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation, build_model, predict
from pflbench.federation import build_clients
from pflbench.messages import Upload
from pflbench.method import Method
from pflbench.metrics import evaluate_cases
from pflbench.registry import get_method
from pflbench.suite import parse_suite
from pflbench.training import scaler_of
from pflbench.tuning import StudyRef

UNEQUAL = (6, 10, 20)  # images per site: 4, 7 and 14 training images after the 70/10/20 split


def test_same_seed_same_threads_is_bitwise_identical(tiny):
    _, a = run(tiny, "fedavg", seed=0)
    _, b = run(tiny, "fedavg", seed=0)
    assert a.rounds["value"].gt(0).any()  # it learned something, so equality is informative
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.cases, b.cases)
    _, c = run(tiny, "fedavg", seed=1)
    assert not a.rounds["value"].equals(c.rounds["value"])


class _Capture(Method):
    """FedAvg that keeps each client's final model in a class-level dict (test only)."""

    name = "capture"
    models: dict = {}

    def eval_model(self, client):
        type(self).models[client.id] = {k: v.clone() for k, v in client.model.state_dict().items()}
        return client.model


def _capture(base: type[Method]) -> type[Method]:
    return type(
        f"Capture{base.__name__}", (base,), {"models": {}, "eval_model": _Capture.eval_model}
    )


def test_one_client_federation_equals_local_training():
    data = tiny_federation(n_sites=1)
    fed_cls, loc_cls = _capture(get_method("fedavg")), _capture(get_method("local"))
    _, a = run(data, fed_cls(), rounds=3)
    _, b = run(data, loc_cls(), rounds=3)
    for k, v in fed_cls.models["site0"].items():
        assert torch.equal(v, loc_cls.models["site0"][k]), k
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    assert a.info["bytes_up"] > 0 and b.info["bytes_up"] == 0 and b.info["bytes_down"] == 0


def test_two_identical_clients_under_fedavg_equal_local_training_on_one():
    two = tiny_federation(n_sites=2, identical=True)
    two.sites[1].case_ids = list(two.sites[0].case_ids)  # same cases, same split
    split = make_splits(two)["site0"]
    two.predefined_splits = {"site0": split, "site1": split}
    one = FederatedData(
        name="one",
        sites=[two.sites[0]],
        classes=two.classes,
        structures=two.structures,
        predefined_splits={"site0": split},
    )
    fed_cls, loc_cls = _capture(get_method("fedavg")), _capture(get_method("local"))
    # identical clients need identical data order: no shuffling (site names differ, so streams do)
    run(two, fed_cls(), rounds=2, shuffle=False)
    run(one, loc_cls(), rounds=2, shuffle=False)
    for k, v in loc_cls.models["site0"].items():
        assert torch.equal(fed_cls.models["site0"][k], v), k
        assert torch.equal(fed_cls.models["site1"][k], v), k


def test_fedavg_changes_models_versus_local(tiny):
    fed_cls, loc_cls = _capture(get_method("fedavg")), _capture(get_method("local"))
    run(tiny, fed_cls())
    run(tiny, loc_cls())
    w = fed_cls.models
    # FedAvg: every client holds the same global model, BN running stats included
    for k in w["site0"]:
        if w["site0"][k].is_floating_point():
            assert torch.equal(w["site0"][k], w["site1"][k]), k
    # Local: clients differ
    assert not torch.equal(
        loc_cls.models["site0"]["head.weight"], loc_cls.models["site1"]["head.weight"]
    )


def test_fedavg_averages_bn_running_stats_but_not_num_batches_tracked():
    data = tiny_federation(sizes=UNEQUAL)
    n_train = {cid: len(s["train"]) for cid, s in make_splits(data).items()}
    cls = _recorder()
    run(data, cls(), rounds=1)
    ups, msg = cls.uploads[1], cls.messages[1]
    stats = [k for k in msg if k.endswith(("running_mean", "running_var"))]
    assert stats and not any(k.endswith("num_batches_tracked") for k in msg)
    total = sum(n_train.values())
    for k in stats:  # the sample-weighted mean of the clients' running statistics
        by_hand = sum(n_train[c] * ups[c][0][k].double() for c in ups) / total
        torch.testing.assert_close(msg[k].double(), by_hand, rtol=1e-6, atol=1e-7, msg=k)
        assert not torch.equal(ups["site0"][0][k], ups["site2"][0][k]), k  # they did differ
        for cid in n_train:
            assert torch.equal(cls.evaluated[(cid, 1)][k], msg[k]), (cid, k)
    # the batch counter stays each client's own: 2 epochs of 1, 2 and 4 batches (batch 4)
    key = next(k for k in cls.evaluated[("site0", 1)] if k.endswith("num_batches_tracked"))
    counts = [int(cls.evaluated[(cid, 1)][key]) for cid in ("site0", "site1", "site2")]
    assert counts == [2, 4, 8]


def _upload(value: float, weight: float, mask=None) -> Upload:
    t = torch.full((4,), value)
    return Upload(entries={"w": t}, weight=weight, masks={} if mask is None else {"w": mask})


def test_aggregation_weights_sum_to_one():
    ups = {str(i): _upload(0.0, w) for i, w in enumerate([3, 1, 7.5, 0.25])}
    w = aggregation_weights(ups)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert w["2"] == pytest.approx(7.5 / 11.75)


def test_masked_average_and_merge_keep_personal_entries_bit_identical():
    m0 = torch.tensor([True, True, False, False])
    m1 = torch.tensor([True, False, True, False])
    ups = {"a": _upload(1.0, 1.0, m0), "b": _upload(3.0, 3.0, m1)}
    msg = masked_average(ups)
    assert torch.allclose(msg.entries["w"][:3], torch.tensor([2.5, 1.0, 3.0]))
    assert msg.masks["w"].tolist() == [True, True, True, False]  # nobody shares element 3
    state = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    merge_into(state, msg, {"w": m0})
    assert state["w"].tolist() == [2.5, 1.0, 30.0, 40.0]


def test_single_contributor_average_is_exact():
    t = torch.randn(1000)
    msg = masked_average({"a": Upload(entries={"w": t}, weight=7.0)})
    assert torch.equal(msg.entries["w"], t)


def _reachable_foreign_data(cid: str, roots: list) -> tuple[list[str], int]:
    """Everything reachable from ``roots`` by references (instance and class attributes,
    closures, module globals of pflbench), and among it what belongs to another client or to
    the engine: another site's data, the federation, its client splits."""
    from pflbench.federation import ClientSplits

    def ours(name: str | None) -> bool:
        return bool(name) and name.split(".")[0] in ("pflbench", "conftest", "test_engine")

    # the rest of the interpreter (torch, numpy, the standard library) holds no client data
    foreign_dicts = {id(vars(m)) for n, m in list(sys.modules.items()) if not ours(n)}
    seen: set[int] = set()
    stack, found = list(roots), []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in foreign_dicts:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.ModuleType) and not ours(obj.__name__):
            continue
        if isinstance(obj, (type, types.FunctionType)) and not ours(obj.__module__):
            continue
        if type(obj).__module__.split(".")[0] in ("_pytest", "pytest", "pluggy"):
            continue  # pytest's fixture cache holds the test's own federation, not the engine
        if isinstance(obj, SiteData) and obj.name != cid:
            found.append(f"site data of {obj.name}")
        if isinstance(obj, (Federation, FederatedData, ClientSplits)):
            found.append(type(obj).__name__)
        stack.extend(gc.get_referents(obj))
    return found, len(seen)


class _Snoop(Method):
    """A method that looks, from its client hook, for any path to other clients' data."""

    name = "snoop"
    results: list = []  # (client, foreign objects found, objects walked, instance reused)

    def local_update(self, client):
        pflbench_modules = [m for n, m in sys.modules.items() if n.split(".")[0] == "pflbench"]
        found, walked = _reachable_foreign_data(client.id, [client, self, *pflbench_modules])
        type(self).results.append((client.id, found, walked, hasattr(self, "stash")))
        self.stash = True  # an instance that survived into another client's hook would show it
        client.fit()


def test_client_hooks_cannot_reach_other_clients(tiny, monkeypatch):
    # the other sites' data are alive in the engine while each hook runs
    monkeypatch.setattr(_Snoop, "results", [])  # this run's hooks only, however often it runs
    run(tiny, _Snoop(), rounds=1)
    assert [r[0] for r in _Snoop.results] == ["site0", "site1", "site2"]
    for cid, found, walked, reused in _Snoop.results:
        assert found == [], (cid, found)
        assert not reused, cid
        assert walked > 1000, walked  # the walk did cover the model, the data and the modules
    # and the walk finds data where a path exists, e.g. a module global holding the federation
    import pflbench.state

    monkeypatch.setattr(pflbench.state, "_leak", tiny, raising=False)
    found, _ = _reachable_foreign_data("site0", [pflbench.state])
    assert {"site data of site1", "site data of site2", "FederatedData"} <= set(found)


def test_planning_unseen_sites_leaves_no_dataset_in_a_module():
    """A sweep asks for the site names of every dataset before its runs (held-out sets); what
    it keeps for that must not be the data itself, or every client hook of every later run in
    the process reaches all sites through the module (the hook test above walks module
    globals, so it would fail after such a sweep, in any test order)."""
    raw = {
        "name": "u",
        "datasets": [{"name": "synthetic", "options": {"sites": 3, "size": 16}}],
        "methods": ["fedavg"],
        "seeds": [0],
        "protocol": {"rounds": 1},
        "evaluation": {"unseen": "leave_one_out"},
    }
    suite = parse_suite(raw, "u.yaml")
    ref = StudyRef("r", "runs", suite.datasets[0], suite.methods[0], "fixed")
    assert [c["held_out"] for c in ref.cells(suite)] == [["site1"], ["site2"], ["site3"]]
    modules = [m for n, m in list(sys.modules.items()) if n.split(".")[0] == "pflbench"]
    found, walked = _reachable_foreign_data("nobody", modules)
    assert found == [] and walked > 1000, found


def test_communication_is_counted(tiny):
    fed, out = run(tiny, "fedavg", rounds=2)
    n_params = sum(
        v.numel() * v.element_size()
        for v in fed.model.state_dict().values()
        if v.is_floating_point()
    )
    per_round = out.comm[out.comm["round"] == 1]
    assert (per_round["bytes_up"].sum()) == 3 * n_params
    assert (per_round["bytes_down"].sum()) == 3 * n_params


def test_selection_uses_validation_after_half(tiny):
    _, out = run(tiny, "fedavg", rounds=4)
    best = out.cases[out.cases["selection"] == "best"]
    val = out.rounds[
        (out.rounds["split"] == "val")
        & (out.rounds["structure"] == "mean")
        & (out.rounds["metric"] == "dice")
    ]
    assert sorted(val["client"].unique()) == ["site0", "site1", "site2"]  # the loop is not empty
    for cid, g in val.groupby("client"):
        after = g[g["round"] > 2]
        chosen = int(best[best["client"] == cid]["round"].iloc[0])
        assert chosen in (3, 4)
        assert after.set_index("round")["value"][chosen] == after["value"].max()
    assert set(out.cases["selection"]) == {"best", "last"}
    assert set(out.cases["split"]) == {"val", "test"}
    assert set(out.rounds["split"]) == {"val"}  # test is scored per round only with track_test
    _, tracked = run(tiny, "fedavg", rounds=2, track_test=True)
    assert set(tracked.rounds["split"]) == {"val", "test"}


def test_evaluation_covers_all_clients_under_partial_participation(tiny):
    _, out = run(tiny, "fedavg", rounds=2, client_fraction=0.34)
    sampled = out.comm[out.comm["sampled"]]
    assert sampled.groupby("round")["client"].nunique().tolist() == [1, 1]
    val = out.rounds[out.rounds["split"] == "val"]
    assert val.groupby("round")["client"].nunique().tolist() == [3, 3]


def test_tuning_mode_never_builds_the_test_split(tiny):
    from pflbench.federation import TestSplitAccessError, build_clients

    m = get_method("fedavg")()
    fed = Federation(tiny, make_splits(tiny), m, TINY_MODEL, fast_protocol(), 0, mode="tune")
    out = fed.run()
    assert set(out.cases["split"]) == {"val"} and set(out.rounds["split"]) == {"val"}
    with pytest.raises(TestSplitAccessError, match="not available while tuning"):
        _ = build_clients(tiny, make_splits(tiny), mode="tune")[0].test
    # nor do the federation's own clients, held-out sites included, hold one
    held = Federation(
        tiny, make_splits(tiny), m, TINY_MODEL, fast_protocol(), 0, mode="tune", held_out=["site2"]
    )
    assert len(held.clients) == 2 and len(held.newcomers) == 1
    for client in fed.clients + held.clients + held.newcomers:
        with pytest.raises(TestSplitAccessError, match="not available while tuning"):
            _ = client.test


def test_diverging_run_is_recorded_not_raised(tiny):
    from pflbench.suite import OptimizerSpec

    _, out = run(tiny, "fedavg", rounds=3, optimizer=OptimizerSpec(name="sgd", lr=1e12, momentum=0))
    assert out.info["status"] == "diverged"
    assert "non-finite" in out.info["error"]


@pytest.mark.parametrize("method", ["fedavg", "ditto"])
def test_disk_store_gives_the_same_result_as_memory(tiny, method):
    # ditto keeps a personal model and optimizer-free extras in client.state; the two stores
    # must hand hooks the same values and select the same snapshots
    _, a = run(tiny, method, store="memory")
    _, b = run(tiny, method, store="disk")
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.cases, b.cases)


def test_new_model_is_an_independent_copy_of_the_clients_architecture():
    """``Client.new_model``: loading a state into it, or training it, leaves the client's own
    model untouched (Ditto's and APFL's personal models are built this way)."""
    c = make_client(build_model(TINY_MODEL, tiny_federation(), 0))
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in before.items()}
    m = c.new_model(zeros)
    assert all(int(v.count_nonzero()) == 0 for v in m.state_dict().values())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert all(torch.equal(c.model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(c.new_model().state_dict()[k], v) for k, v in before.items())


def test_fit_trains_only_the_parameters_it_is_given():
    """``Client.fit(params=…)`` (FedRep's head and body phases, FedBABU's frozen head): the
    parameters left out keep their values; those given move."""
    c = make_client(build_model(TINY_MODEL, tiny_federation(), 0))
    named = dict(c.model.named_parameters())
    chosen = list(named)[-2:]  # the output layer's weight and bias
    before = {k: v.detach().clone() for k, v in named.items()}
    c.fit(params=[named[k] for k in chosen])
    for k, v in c.model.named_parameters():
        assert torch.equal(v, before[k]) == (k not in chosen), k


def test_each_generator_is_its_own_stream_of_run_seed_client_round_and_call():
    """``Client.generator``: reproducible from (run seed, stream, client, round, call number),
    and different when any one of them changes, a second call on the same stream included."""
    model = build_model(TINY_MODEL, tiny_federation(), 0)

    def first_draws(**kw) -> list[int]:
        c = make_client(model, **kw)
        return [int(torch.randint(2**62, (1,), generator=c.generator(s))) for s in ("a", "a", "b")]

    base = first_draws()
    assert base == first_draws()  # a fresh view of the same client draws the same
    assert len(set(base)) == 3  # the second call on "a" and the stream "b" draw anew
    c = make_client(model)
    other_stream = int(torch.randint(2**62, (1,), generator=c.generator("b")))
    assert other_stream != base[0]  # another stream at the same call number
    for other in (first_draws(seed=1), first_draws(site=1), first_draws(round=2)):
        assert not set(other) & set(base), other


def test_client_batches_apply_the_suites_augmentation_and_order():
    """``augment: true`` (flips): in an unshuffled epoch every image is its own, flipped or not,
    and some are flipped; without augmentation and shuffling the epoch is the data as stored."""
    model = build_model(TINY_MODEL, tiny_federation(), 0)
    plain = make_client(model, shuffle=False)
    images = plain.train_data.images
    assert torch.equal(torch.cat([x for x, _ in plain.batches()]), images)
    flipped = torch.cat([x for x, _ in make_client(model, augment=True, shuffle=False).batches()])
    views = [
        lambda v: v,
        lambda v: v.flip(-1),
        lambda v: v.flip(-2),
        lambda v: v.flip(-1).flip(-2),
    ]
    kind = [
        next(k for k, f in enumerate(views) if torch.equal(x, f(o)))
        for x, o in zip(flipped, images, strict=True)
    ]
    assert any(k > 0 for k in kind)  # flips were drawn
    shuffled = torch.cat([x for x, _ in make_client(model).batches()])
    assert not torch.equal(shuffled, images)  # shuffle: true (the default) reorders


def test_client_batches_apply_the_augmentations_listed_and_count_under_local():
    """``augment: [rot90]``: every image of an unshuffled epoch is its own turned by a multiple
    of 90°, some by an odd one (no flip gives that); the suite's batches count as "local"."""
    model = build_model(TINY_MODEL, tiny_federation(), 0)
    budget = Budget()
    c = make_client(model, augment=("rot90",), shuffle=False, budget=budget)
    images = c.train_data.images
    turned = torch.cat([x for x, _ in c.batches()])
    quarter_turns = [
        next(k for k in range(4) if torch.equal(x, torch.rot90(o, k, dims=(-2, -1))))
        for x, o in zip(turned, images, strict=True)
    ]
    assert any(k % 2 for k in quarter_turns)
    assert budget.samples == {"local": len(images)}


def test_fp16_optimizers_carry_a_gradient_scaler_whose_scale_outlives_the_round():
    """``amp: fp16``: every optimizer a client hands out steps through a gradient scaler, and the
    scale it reached is kept in the client's state and restored next time (not 2¹⁶ again)."""
    model = build_model(TINY_MODEL, tiny_federation(), 0)
    assert scaler_of(make_client(model).optimizer(model.parameters())) is None  # amp off
    c = make_client(model, amp="fp16")
    opt = c.optimizer(model.parameters())
    scaler = scaler_of(opt)
    assert scaler is not None and scaler.get_scale() == 2.0**16
    scaler.scale(torch.ones(()))  # a first scaled loss, as a training step makes
    scaler.update(new_scale=1024.0)
    c.keep_optimizer(opt)
    assert float(c.state["_grad_scaler/main"]["scale"]) == 1024.0
    assert scaler_of(c.optimizer(model.parameters())).get_scale() == 1024.0


def test_extra_work_counts_zero_and_refuses_a_negative_count():
    """``Client.count``: zero samples is a valid record (a pass over an empty transfer), a
    negative one is a bug in the calling method and says so with the number."""
    budget = Budget()
    c = make_client(build_model(TINY_MODEL, tiny_federation(), 0), budget=budget)
    c.count("fisher", 5)
    c.count("fisher", 0)
    c.count("empty", 0)
    assert budget.samples == {"fisher": 5, "empty": 0}
    with pytest.raises(ValueError, match=r"^cannot count a negative number of samples \(-2\)$"):
        c.count("fisher", -2)
    assert budget.samples == {"fisher": 5, "empty": 0}


def test_local_steps_budget_is_counted(tiny):
    _, out = run(tiny, "fedavg", rounds=2, local_epochs=None, local_steps=3)
    # 7 training images, batch 4: steps of 4, 3 (epoch end), 4 images
    assert out.info["budget"]["local"] == 2 * 3 * (4 + 3 + 4)  # rounds × clients × images


# weighting, selection and storage, written from the definitions --------------------------------
#
# Every other engine test uses equal site sizes, where a plain mean *is* the weighted mean; these
# use unequal ones, and compute the expected numbers by hand.


def test_masked_average_weights_whole_tensor_entries_by_sample_count():
    ups = {"a": _upload(1.0, 1.0), "b": _upload(4.0, 3.0), "c": _upload(-2.0, 0.5)}
    msg = masked_average(ups)
    expected = (1.0 * 1.0 + 4.0 * 3.0 + -2.0 * 0.5) / (1.0 + 3.0 + 0.5)  # = 2.6667, mean = 1.0
    assert torch.allclose(msg.entries["w"], torch.full((4,), expected))
    assert msg.masks == {}  # every element has a sharer: no mask is sent
    assert msg.entries["w"].dtype == torch.float32  # accumulated in float64, sent as uploaded


def test_masked_average_mixes_masked_and_whole_tensor_uploads_by_weight():
    some = torch.tensor([True, False, True, False])
    ups = {"a": _upload(2.0, 2.0), "b": _upload(8.0, 6.0, some)}
    msg = masked_average(ups)
    # elements 0 and 2: (2·2 + 6·8) / 8 = 6.5; elements 1 and 3: only a shares them
    assert msg.entries["w"].tolist() == [6.5, 2.0, 6.5, 2.0]
    assert "w" not in msg.masks


class _RecordUploads(Method):
    """FedAvg that keeps, per round, a copy of every upload and of the server's message."""

    name = "record-uploads"
    uploads: dict = {}
    messages: dict = {}
    evaluated: dict = {}

    def aggregate(self, uploads, round):
        cls = type(self)
        cls.uploads[round] = {
            cid: ({k: v.clone() for k, v in u.entries.items()}, u.weight)
            for cid, u in uploads.items()
        }
        msg = super().aggregate(uploads, round)
        cls.messages[round] = {k: v.clone() for k, v in msg.entries.items()}
        return msg

    def eval_model(self, client):
        type(self).evaluated[(client.id, client.round)] = {
            k: v.clone() for k, v in client.model.state_dict().items()
        }
        return client.model


def _recorder(base: type[Method] = _RecordUploads) -> type[Method]:
    return type(f"Fresh{base.__name__}", (base,), {"uploads": {}, "messages": {}, "evaluated": {}})


def test_fedavg_global_model_is_the_sample_weighted_average_of_unequal_sites():
    data = tiny_federation(sizes=UNEQUAL)
    splits = make_splits(data)
    n_train = {cid: len(s["train"]) for cid, s in splits.items()}
    assert len(set(n_train.values())) == 3, n_train  # unequal, or the test cannot tell
    cls = _recorder()
    run(data, cls(), rounds=1)
    ups = cls.uploads[1]
    assert {cid: w for cid, (_, w) in ups.items()} == {k: float(v) for k, v in n_train.items()}
    total = sum(n_train.values())
    some_key_differs_from_the_plain_mean = False
    for k, got in cls.messages[1].items():
        by_hand = sum(n_train[cid] * ups[cid][0][k].double() for cid in ups) / total
        torch.testing.assert_close(got.double(), by_hand, rtol=1e-6, atol=1e-7, msg=k)
        plain = sum(ups[cid][0][k].double() for cid in ups) / len(ups)
        if not torch.allclose(plain, by_hand, rtol=1e-4, atol=1e-5):
            some_key_differs_from_the_plain_mean = True
        for cid in n_train:  # and every client evaluates exactly that global model
            assert torch.equal(cls.evaluated[(cid, 1)][k], got), (cid, k)
    assert some_key_differs_from_the_plain_mean


class _BreakLastRound(_RecordUploads):
    """FedAvg whose last round ends in an all-background model (head bias −50), so the best
    round is an earlier one and its metrics differ from the last round's."""

    name = "break-last-round"
    last = 3

    def local_update(self, client):
        client.fit()
        if client.round == self.last:
            with torch.no_grad():
                client.model.head.bias.fill_(-50.0)


def _fresh_cases(data, splits, state, cid, split) -> pd.DataFrame:
    """Score a model rebuilt from ``state`` on one split, outside the engine's bookkeeping."""
    model = build_model(TINY_MODEL, data, 0)
    model.load_state_dict(state)
    part = getattr(next(c for c in build_clients(data, splits) if c.name == cid), split)
    pred = predict(model, part, torch.device("cpu"))
    return evaluate_cases(
        pred, part.labels, part.case_ids, part.slice_index, data.structures, surface=False
    )


def test_best_rows_are_a_fresh_evaluation_of_the_best_round_snapshot():
    data = tiny_federation(sizes=UNEQUAL)
    splits = make_splits(data)
    cls = _recorder(_BreakLastRound)
    _, out = run(data, cls(), rounds=3, selection="best")
    cases = out.cases
    for cid in splits:
        best_round = out.info["selected_rounds"][cid]
        assert best_round < 3  # the last round was broken on purpose
        for selection, r in (("best", best_round), ("last", 3)):
            for split in ("val", "test"):
                rows = cases[
                    (cases["client"] == cid)
                    & (cases["selection"] == selection)
                    & (cases["split"] == split)
                ]
                assert set(rows["round"]) == {r}
                fresh = _fresh_cases(data, splits, cls.evaluated[(cid, r)], cid, split)
                got = rows.set_index(["case_id", "structure"]).sort_index()
                want = fresh.set_index(["case_id", "structure"]).sort_index()
                assert list(got.index) == list(want.index)
                np.testing.assert_array_equal(got["dice"], want["dice"], err_msg=f"{cid} {split}")
                np.testing.assert_array_equal(got["iou"], want["iou"], err_msg=f"{cid} {split}")
    best, last = cases[cases["selection"] == "best"], cases[cases["selection"] == "last"]
    assert best["dice"].mean() > last["dice"].mean()  # so best ≠ last is visible in the numbers


def test_disk_store_keeps_client_records_on_disk_during_a_default_run(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = tiny_federation(sizes=UNEQUAL)
    seen: list[dict[str, list[str]]] = []

    def look(r: int, total: int) -> None:
        seen.append({d.name: sorted(f.name for f in d.iterdir()) for d in tmp_path.iterdir()})

    m = get_method("fedavg")()
    fed = Federation(
        data,
        make_splits(data),
        m,
        TINY_MODEL,
        fast_protocol(store="disk", selection="best"),
        0,
        on_round=look,
    )
    fed.run()
    assert len(seen) == 2
    for snapshot in seen:
        (folder, files), *others = snapshot.items()
        assert others == [] and folder.startswith("pflbench-state-")
        for cid in ("site0", "site1", "site2"):  # model + state, the round's upload, best snapshot
            assert {f"{cid}.pt", f"{cid}__upload.pt", f"{cid}__snapshot.pt"} <= set(files)
    assert list(tmp_path.iterdir()) == []  # removed when the run ends
