"""Protocol options that reproduce FL-MedSegBench (paper-protocol.md): persistent optimizers, the
step schedule, aggregation weights, loss smoothing, augmentations, selection start, per-dataset
overrides, and an independent re-implementation of the benchmark's FedAvg loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, blob_site, fast_protocol

from pflbench.aggregation import aggregation_weights, client_weight
from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation
from pflbench.method import Method
from pflbench.registry import get_method
from pflbench.runner import RunSpec, plan
from pflbench.suite import (
    KEYED_WHEN_SET,
    DatasetSpec,
    MethodSpec,
    ModelSpec,
    Protocol,
    SuiteError,
    parse_suite,
)
from pflbench.training import batch_stream, segmentation_loss


def federation(data: FederatedData, method: str | Method = "fedavg", seed: int = 0, **proto):
    m = get_method(method)() if isinstance(method, str) else method
    return Federation(data, make_splits(data), m, TINY_MODEL, fast_protocol(**proto), seed)


def uneven() -> FederatedData:
    """Two sites whose sample and batch shares differ (7 and 11 training images, batch 4)."""
    return FederatedData(
        name="uneven",
        sites=[blob_site("a", 10, seed=0), blob_site("b", 16, seed=1, brightness=0.1)],
        classes=["background", "blob"],
        structures={"blob": [1]},
    )


# ---------------------------------------------------------------------------------------------
# Run keys
# ---------------------------------------------------------------------------------------------


def _spec(**proto) -> RunSpec:
    return RunSpec(
        dataset=DatasetSpec(name="synthetic", options={"sites": 2}),
        method=MethodSpec(name="fedavg"),
        seed=1,
        protocol=Protocol(**proto),
        model=ModelSpec(),
    )


def test_default_run_keys_are_those_before_the_options_existed():
    # keys computed with main at 6c3f2f0 (before these options), from the same specs
    assert _spec(rounds=3).key("abc") == "synthetic-fedavg-s1-cc217ac92ec4"
    old = dict(rounds=200, local_epochs=2, augment=True, optimizer={"lr": 1e-4}, selection="best")
    assert _spec(**old).key("abc") == "synthetic-fedavg-s1-834c48f34e10"
    defaults = {k: Protocol.model_fields[k].default for k in KEYED_WHEN_SET}
    assert _spec(rounds=3, **defaults).key("abc") == "synthetic-fedavg-s1-cc217ac92ec4"


@pytest.mark.parametrize(
    "option",
    [
        {"optimizer_state": "persist"},
        {"lr_schedule": {"every": 0.25}},
        {"aggregation_weights": "batches"},
        {"aggregation_weights": "uniform"},
        {"loss_smoothing": 1e-6},
        {"selection_start": "benchmark"},
        {"augment": ["flips", "rot90"]},
    ],
)
def test_each_option_set_changes_the_run_key(option):
    base = _spec(rounds=3).key("abc")
    changed = _spec(rounds=3, **option)
    assert changed.key("abc") != base
    assert changed.semantic("abc")["protocol"][next(iter(option))] is not None


# ---------------------------------------------------------------------------------------------
# Optimizer state
# ---------------------------------------------------------------------------------------------


def _adam_steps(fed: Federation, cid: str) -> int | None:
    saved = fed.store.get(cid)["state"].get("_optimizer/main")
    if saved is None:
        return None
    return int(saved["state"][0]["step"])


def test_persist_keeps_adams_step_count_growing_across_rounds(tiny):
    fed = federation(tiny, optimizer_state="persist", local_epochs=1)
    fed._setup()
    per_round = math.ceil(fed.by_id["site0"].train.images.shape[0] / 4)  # 7 images, batch 4
    for r in (1, 2, 3):
        fed._round(r)
        assert _adam_steps(fed, "site0") == r * per_round
    reset = federation(tiny, local_epochs=1)
    reset._setup()
    reset._round(1)
    reset._round(2)
    assert _adam_steps(reset, "site0") is None  # nothing kept: a fresh Adam every round


def test_a_method_may_force_its_own_optimizer_state(tiny):
    class Resetting(get_method("fedavg")):
        optimizer_state = "reset"

    fed = federation(tiny, Resetting(), optimizer_state="persist")
    assert not fed.persist_optimizer
    assert federation(tiny, optimizer_state="persist").persist_optimizer
    out = federation(tiny, optimizer_state="persist", rounds=1).run()
    assert out.info["optimizer_state"] == "persist"


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def test_step_schedule_halves_the_rate_at_the_benchmarks_rounds():
    p = Protocol(rounds=8, lr_schedule={"every": 0.25, "gamma": 0.5})
    assert [p.lr_factor(r) for r in range(1, 9)] == [1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625]
    # T = 200: FL-MedSegBench halves before 0-based rounds 49, 99, 149, 199 (1-based 50, 100, ...)
    p = Protocol(rounds=200, lr_schedule={"every": 0.25})
    halvings = [r for r in range(2, 201) if p.lr_factor(r) < p.lr_factor(r - 1)]
    assert halvings == [50, 100, 150, 200]
    assert Protocol(rounds=10, lr_schedule={"every": 3, "gamma": 0.1}).lr_factor(
        7
    ) == pytest.approx(0.01)
    assert Protocol(rounds=10).lr_factor(9) == 1.0


def test_schedule_reaches_the_optimizer_even_when_its_state_persists(tiny):
    fed = federation(
        tiny, rounds=8, optimizer_state="persist", lr_schedule={"every": 2}, local_epochs=1
    )
    fed._setup()
    seen = []
    for r in (1, 2, 3, 4):
        fed._round(r)
        seen.append(fed.store.get("site0")["state"]["_optimizer/main"]["param_groups"][0]["lr"])
    assert seen == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3])


@pytest.mark.parametrize("bad", [{"every": 1.5}, {"every": 0}, {"every": 2, "gamma": 1.5}])
def test_bad_schedule_is_refused(bad):
    with pytest.raises(SuiteError, match=r"protocol\.lr_schedule\.(every|gamma)"):
        parse_suite(_suite_raw(protocol={"rounds": 4, "lr_schedule": bad}), "s.yaml")


# ---------------------------------------------------------------------------------------------
# Aggregation weights
# ---------------------------------------------------------------------------------------------


def _weights(fed: Federation) -> dict[str, float]:
    m = fed.method.fresh()
    uploads = {}
    for cid in fed.ids:
        client = fed._open(cid, 1)
        uploads[cid] = m.upload(client)
    return aggregation_weights(uploads)


def test_batch_weights_are_batch_counts_over_their_sum():
    data = uneven()
    fed = federation(data, aggregation_weights="batches", batch_size=4)
    fed._setup()
    n = {cid: fed.by_id[cid].train.images.shape[0] for cid in fed.ids}
    batches = {cid: math.ceil(k / 4) for cid, k in n.items()}
    expected = {cid: b / sum(batches.values()) for cid, b in batches.items()}
    assert _weights(fed) == pytest.approx(expected)
    samples = {cid: k / sum(n.values()) for cid, k in n.items()}
    assert expected != pytest.approx(samples)  # the data make the two rules differ
    plain = federation(data, batch_size=4)
    plain._setup()
    assert _weights(plain) == pytest.approx(samples)
    uni = federation(data, aggregation_weights="uniform")
    uni._setup()
    assert _weights(uni) == pytest.approx({"a": 0.5, "b": 0.5})


def test_client_weight_rules():
    assert client_weight(9, 4, "batches") == 3.0  # a last batch of one still counts
    assert client_weight(8, 4, "batches") == 2.0
    assert client_weight(9, 4, "samples") == 9.0
    assert client_weight(9, 4, "uniform") == 1.0
    assert client_weight(9, 4) == 9.0  # the default is FedAvg's sample count
    with pytest.raises(
        ValueError,
        match=r"^unknown aggregation weights 'size'; expected samples, batches or uniform$",
    ):
        client_weight(9, 4, "size")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Loss smoothing
# ---------------------------------------------------------------------------------------------


def test_loss_smoothing_is_the_dice_epsilon():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    labels = (torch.rand(2, 8, 8) > 0.7).long()
    labels[1] = 0  # an empty mask: where ε matters most
    p = torch.sigmoid(logits)[:, 0]
    t = labels.float()
    for eps in (1.0, 1e-6):
        dice = (2 * (p * t).sum((1, 2)) + eps) / (p.sum((1, 2)) + t.sum((1, 2)) + eps)
        want = 0.5 * F.binary_cross_entropy_with_logits(logits[:, 0], t) + 0.5 * (1 - dice.mean())
        assert segmentation_loss(logits, labels, eps).item() == pytest.approx(want.item(), 1e-6)
    assert segmentation_loss(logits, labels, 1e-6) != pytest.approx(
        segmentation_loss(logits, labels).item()
    )


def test_client_loss_uses_the_protocols_smoothing(tiny):
    fed = federation(tiny, loss_smoothing=1e-6)
    fed._setup()
    client = fed._open("site0", 1)
    x, y = tiny.sites[0].images[:2], tiny.sites[0].labels[:2]
    logits = client.model(x)
    assert client.loss(logits, y).item() == pytest.approx(segmentation_loss(logits, y, 1e-6).item())


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _stream(data: SiteData, augmentations, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return list(
        batch_stream(
            data,
            4,
            epochs=1,
            steps=None,
            order=torch.Generator().manual_seed(0),
            augment=g,
            shuffle=False,
            augmentations=augmentations,
        )
    )


def test_rot90_rotates_image_and_mask_together_and_flips_stay_as_before():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 6, 6)
    site = SiteData(
        name="s", images=x, labels=(x[:, 0] > 0.5).long(), case_ids=list("abcdefghijklmnop")
    )
    rotated = _stream(site, ("rot90",))
    moved = 0
    for i, (bx, by) in enumerate(rotated):
        for j in range(len(bx)):
            src = x[4 * i + j]
            ks = [k for k in range(4) if torch.equal(bx[j], src.rot90(k, (-2, -1)))]
            assert ks, "each image is a rotation of its source"
            assert torch.equal(by[j], (src[0] > 0.5).long().rot90(ks[0], (-2, -1)))
            moved += ks[0] != 0
    assert 0 < moved < 16
    # the flips path draws the same random numbers as before rot90 existed
    flips = _stream(site, ("flips",))
    g = torch.Generator().manual_seed(3)
    for i, (bx, _) in enumerate(flips):
        flip = torch.rand(len(bx), 2, generator=g) < 0.5
        for j in range(len(bx)):
            want = x[4 * i + j]
            want = want.flip(-1) if flip[j, 0] else want
            want = want.flip(-2) if flip[j, 1] else want
            assert torch.equal(bx[j], want)


def test_rot90_refuses_non_square_images():
    site = SiteData(
        name="wide",
        images=torch.rand(4, 3, 4, 8),
        labels=torch.zeros(4, 4, 8).long(),
        case_ids=list("abcd"),
    )
    with pytest.raises(
        ValueError, match=r"site 'wide': rot90 augmentation needs square images, got 4×8"
    ):
        _stream(site, ("flips", "rot90"))
    assert len(_stream(site, ("flips",))) == 1


def test_augment_true_is_flips():
    assert Protocol(rounds=2, augment=True).augmentations == ("flips",)
    assert Protocol(rounds=2, augment=["rot90", "flips"]).augmentations == ("flips", "rot90")
    assert Protocol(rounds=2).augmentations == ()
    with pytest.raises(SuiteError, match=r"protocol\.augment"):
        parse_suite(_suite_raw(protocol={"rounds": 2, "augment": ["flip"]}), "s.yaml")


# ---------------------------------------------------------------------------------------------
# Selection start
# ---------------------------------------------------------------------------------------------


def test_selection_start_benchmark_is_one_round_later(tiny):
    assert Protocol(rounds=200).first_selectable() == 101
    assert Protocol(rounds=200, selection_start="benchmark").first_selectable() == 102  # i > 100
    assert Protocol(rounds=5, selection_start="benchmark").first_selectable() == 4  # i > 2
    out = federation(tiny, rounds=4, selection_start="benchmark").run()
    assert set(out.info["selected_rounds"].values()) == {4}
    best = out.cases[out.cases["selection"] == "best"]
    assert set(best["round"]) == {4}


# ---------------------------------------------------------------------------------------------
# Per-dataset overrides
# ---------------------------------------------------------------------------------------------


def _suite_raw(**over):
    raw = {
        "name": "s",
        "datasets": [
            {"name": "synthetic", "label": "a", "options": {"sites": 2}},
            {"name": "synthetic", "label": "b", "options": {"sites": 2}},
        ],
        "methods": ["fedavg"],
        "seeds": [0, 1],
        "protocol": {"rounds": 4, "optimizer": {"lr": 1e-3, "weight_decay": 0.0}},
    }
    raw.update(over)
    return raw


def test_dataset_protocol_overrides_reach_their_runs_and_keys():
    raw = _suite_raw()
    raw["datasets"][1]["protocol"] = {
        "optimizer": {"lr": 1e-4},
        "lr_schedule": {"every": 0.25},
        "augment": ["flips", "rot90"],
    }
    suite = parse_suite(raw, "s.yaml")
    cells = plan(suite)
    a = [c for c in cells if c.dataset.key == "a"]
    b = [c for c in cells if c.dataset.key == "b"]
    assert len(a) == len(b) == 2
    assert all(c.protocol == suite.protocol for c in a)
    for c in b:
        assert c.protocol.optimizer.lr == 1e-4
        assert c.protocol.optimizer.weight_decay == 0.0  # merged key by key, not replaced
        assert c.protocol.lr_schedule is not None and c.protocol.lr_schedule.every == 0.25
        assert c.protocol.rounds == 4
    plain = parse_suite(_suite_raw(), "s.yaml")
    before = {(c.dataset.key, c.seed): c.key("fp") for c in plan(plain)}
    after = {(c.dataset.key, c.seed): c.key("fp") for c in cells}
    assert all(after[k] == before[k] for k in before if k[0] == "a")
    assert all(after[k] != before[k] for k in before if k[0] == "b")


def test_dataset_override_of_the_budget_replaces_the_other():
    raw = _suite_raw()
    raw["datasets"][0]["protocol"] = {"local_steps": 5}
    suite = parse_suite(raw, "s.yaml")
    p = suite.protocol_for(suite.datasets[0])
    assert (p.local_steps, p.local_epochs) == (5, None)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": 1e-4}, r"datasets\[1\]\.protocol\.lr: unknown key"),
        (
            {"optimizer": {"lr": -1}},
            r"datasets\[1\]\.protocol\.optimizer\.lr: Input should be greater than 0",
        ),
        ({"threads": 2}, r"datasets\[1\]\.protocol: threads is set for the whole suite only"),
        ({"aggregation_weights": "images"}, r"datasets\[1\]\.protocol\.aggregation_weights"),
    ],
)
def test_bad_dataset_override_names_the_dataset_and_key(override, message):
    raw = _suite_raw()
    raw["datasets"][1]["protocol"] = override
    with pytest.raises(SuiteError, match=message):
        parse_suite(raw, "s.yaml")


# ---------------------------------------------------------------------------------------------
# Independent re-implementation of the benchmark's FedAvg (paper-protocol.md)
# ---------------------------------------------------------------------------------------------


def _benchmark_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5·BCE + 0.5·(1 − soft Dice), smoothing 1e-6, Dice per image over the foreground."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], t)
    p = torch.sigmoid(logits[:, 0])
    inter = (p * t).sum(dim=(1, 2))
    union = p.sum(dim=(1, 2)) + t.sum(dim=(1, 2))
    return 0.5 * bce + 0.5 * (1 - ((2 * inter + 1e-6) / (union + 1e-6)).mean())


def _hand_fedavg(init: dict[str, torch.Tensor], model: torch.nn.Module, sites, rounds: int):
    """FedAvg as the benchmark runs it: one Adam per client for the whole run, the global model
    broadcast at the start of each round, E = 1 epoch over unshuffled batches of 4, then the
    average weighted by each client's number of batches (len of a DataLoader)."""
    import copy

    models = [copy.deepcopy(model) for _ in sites]
    for m in models:
        m.load_state_dict(init)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=5e-4) for m in models]
    n_batches = [math.ceil(len(x) / 4) for x, _ in sites]
    share = [b / sum(n_batches) for b in n_batches]
    glob = {k: v.clone() for k, v in init.items()}
    for _ in range(rounds):
        for m, opt, (x, y) in zip(models, opts, sites, strict=True):
            with torch.no_grad():
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        v.copy_(glob[k])
            m.train()
            for i in range(0, len(x), 4):
                opt.zero_grad()
                _benchmark_loss(m(x[i : i + 4]), y[i : i + 4]).backward()
                opt.step()
        states = [m.state_dict() for m in models]
        glob = {
            k: sum(w * s[k].double() for w, s in zip(share, states, strict=True)).float()
            for k, v in init.items()
            if v.is_floating_point()
        }
    return glob


def _engine_global(data: FederatedData, rounds: int, **proto) -> tuple[dict, dict, list]:
    """(initial state, the global model after ``rounds``) of the engine's FedAvg, as the
    benchmark trains: E = 1, batch 4, no shuffle, Adam lr 1e-3 with weight decay 5e-4."""
    fed = federation(
        data,
        rounds=rounds,
        local_epochs=1,
        batch_size=4,
        shuffle=False,
        optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 5e-4},
        **proto,
    )
    init = {k: v.clone() for k, v in fed.model.state_dict().items()}
    fed._setup()
    for r in range(1, rounds + 1):
        fed._round(r)
    sites = [(fed.by_id[c].train.images, fed.by_id[c].train.labels) for c in fed.ids]
    return init, fed.store.get(fed.ids[0])["model"], sites


def test_engine_matches_a_hand_written_benchmark_fedavg():
    from pflbench.models import UNet

    data = uneven()  # 7 and 11 training images: batches 4+3 and 4+4+3 (no batch of one)
    paper = {"optimizer_state": "persist", "aggregation_weights": "batches", "loss_smoothing": 1e-6}
    init, engine, sites = _engine_global(data, 2, **paper)
    hand = _hand_fedavg(init, UNet(1, 1, **TINY_MODEL.options), sites, rounds=2)
    worst = max((engine[k] - v).abs().max().item() for k, v in hand.items())
    assert worst <= 1e-6
    moved = max((init[k] - v).abs().max().item() for k, v in hand.items())
    assert moved > 1e-3  # the two rounds trained: the match is not of two untouched models
    # without persistent Adam and batch weights the engine is measurably elsewhere
    _, plain, _ = _engine_global(data, 2, loss_smoothing=1e-6)
    assert max((plain[k] - v).abs().max().item() for k, v in hand.items()) > 1e-5
