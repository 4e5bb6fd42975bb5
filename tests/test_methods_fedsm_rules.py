"""FedSM's rules (issue 22: fedsm mutation survivors), each from the method's definition with the
expected value computed here: the selector's declared architecture (four conv3×3–ReLU–maxpool
blocks of widths w, 2w, 4w, 8w, global average pooling, a linear layer over the sites) against a
functional reference; the routing rule at the threshold (strictly greater) and its -1 for w;
SoftPull's weights for K = 4 and its float64 accumulation; which message part ``receive`` stores
where; the order, labels and optimizer keys of the three trainings against a replayed reference;
the selector's Adam at ``selector_lr`` with its moments kept; the refusal of a diverged selector;
and the routed evaluation model with a partial bank."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from method_helpers import exactly, make_client, state_of, tiny_unet

from pflbench.client import Budget
from pflbench.messages import Message, Upload
from pflbench.methods.fedsm import (
    PERSONAL,
    SELECTOR,
    SELECTOR_OPT,
    SelectorRouting,
    SiteSelector,
    soft_pull,
)
from pflbench.registry import get_method
from pflbench.training import Diverged

T = torch.tensor
CONVS = ("features.0", "features.3", "features.6", "features.9")


def _fedsm(**hp):
    return get_method("fedsm")(**hp)


def _reference_selector(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The declared selector, written out: 4 × (conv3×3 'same' → ReLU → 2×2 max-pool keeping a
    last odd row/column), mean over the pixels, linear layer."""
    h = x
    for name in CONVS:
        h = F.conv2d(h, params[f"{name}.weight"], params[f"{name}.bias"], padding=1)
        h = F.max_pool2d(F.relu(h), 2, ceil_mode=True)
    return F.linear(h.mean(dim=(2, 3)), params["classifier.weight"], params["classifier.bias"])


# SiteSelector ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [None, 3])
def test_site_selector_has_four_conv3x3_blocks_of_widths_w_2w_4w_8w(width):
    sel = SiteSelector(2, 5) if width is None else SiteSelector(2, 5, width)
    w = 16 if width is None else width  # 16: the documented default width
    shapes = {k: tuple(v.shape) for k, v in sel.state_dict().items()}
    expected = {}
    c = 2
    for k, name in enumerate(CONVS):
        expected[f"{name}.weight"] = (w * 2**k, c, 3, 3)
        expected[f"{name}.bias"] = (w * 2**k,)
        c = w * 2**k
    expected["classifier.weight"] = (5, 8 * w)
    expected["classifier.bias"] = (5,)
    assert shapes == expected


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (16, 16)])
def test_site_selector_forward_is_the_declared_network_on_odd_and_tiny_images(size):
    torch.manual_seed(3)
    sel = SiteSelector(1, 3, width=2)
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        out = sel(x)
        ref = _reference_selector(dict(sel.state_dict()), x)
    assert out.shape == (2, 3)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_fedsm_selector_width_and_classes_follow_the_hyperparameter_and_the_sites():
    client = make_client(tiny_unet())
    _fedsm(selector_width=3).receive_setup(client, {"label": 0, "sites": 4})
    shapes = {k: tuple(v.shape) for k, v in client.state[SELECTOR].items()}
    assert shapes["features.0.weight"] == (3, 1, 3, 3)  # width 3, one image channel
    assert shapes["features.9.weight"] == (24, 12, 3, 3)
    assert shapes["classifier.weight"] == (4, 24)  # one class per site


# SelectorRouting ---------------------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


class _Const(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 1, *x.shape[2:]), self.value)


def test_routing_needs_a_confidence_strictly_above_the_threshold_and_marks_w_by_minus_one():
    # softmax of equal logits is exactly 1/2 (two sites) and 1/4 (four sites)
    logits = T([[0.0, 0.0, -100.0, -100.0], [1e-3, 0.0, -100.0, -100.0], [0.0, 1e-3, -1e2, -1e2]])
    experts = [_Const(0.0), _Const(1.0), _Const(2.0), _Const(3.0)]
    router = SelectorRouting(_Fixed(logits), experts, _Const(-5.0), threshold=0.5)
    x = torch.zeros(3, 1, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the class dimension is named, not guessed
        choice = router.route(x)
        out = router(x)
    assert choice.tolist() == [-1, 0, 1]  # at the threshold: w (-1); just above: the site
    assert out[:, 0, 0, 0].tolist() == [-5.0, 0.0, 1.0]
    four = SelectorRouting(_Fixed(torch.zeros(2, 4)), experts, _Const(-5.0), threshold=0.25)
    assert four.route(torch.zeros(2, 1, 2, 2)).tolist() == [-1, -1]
    below = SelectorRouting(_Fixed(torch.zeros(2, 4)), experts, _Const(-5.0), threshold=0.2499)
    assert below.route(torch.zeros(2, 1, 2, 2)).tolist() == [0, 0]  # ties: the first site


# soft_pull ---------------------------------------------------------------------------------------


def test_soft_pull_weights_for_four_unequal_models_by_hand():
    g = torch.Generator().manual_seed(7)
    models = {f"c{i}": {"w": torch.randn(3, generator=g) * (i + 1)} for i in range(4)}
    lam = 0.4
    out = soft_pull(models, lam)
    for c in models:
        expected = lam * models[c]["w"].double()
        for o in models:
            if o != c:
                expected = expected + (1 - lam) / 3 * models[o]["w"].double()
        assert torch.allclose(out[c]["w"].double(), expected, rtol=1e-6, atol=1e-7), c
        assert out[c]["w"].dtype == torch.float32


def test_soft_pull_accumulates_the_sum_in_float64():
    # in float32 1 + 1e8 rounds to 1e8, so a float32 total of (1, 1e8, −1e8) would be 0, not 1
    models = {"a": {"w": T([1.0])}, "b": {"w": T([1e8])}, "c": {"w": T([-1e8])}}
    out = soft_pull(models, 0.7)
    # p_a = 0.7·1 + 0.15·(1e8 − 1e8) = 0.7
    assert out["a"]["w"].item() == pytest.approx(0.7, rel=1e-7)


def test_soft_pull_weighs_the_own_model_in_float64():
    # 0.7·3 − 0.15·14 is 0 up to float64 rounding; 0.7·3 rounded to float32 first is 9.5e-8 off
    models = {"a": {"w": T([3.0])}, "b": {"w": T([-7.0])}, "c": {"w": T([-7.0])}}
    out = soft_pull(models, 0.7)
    assert abs(out["a"]["w"].item() - (0.7 * 3.0 - 0.15 * 14.0)) < 1e-12


# aggregate ---------------------------------------------------------------------------------------


def _up(value: float, weight: float, mask: torch.Tensor | None = None) -> Upload:
    w = torch.full((4,), value)
    return Upload(
        entries={"w": w},
        weight=weight,
        masks={} if mask is None else {"w": mask},
        extras={
            "personal": {"w": w + 10},
            "selector": {"s": w + 20},
            "exp_avg": {"0": w + 30},
            "exp_avg_sq": {"0": w + 40},
        },
    )


def test_fedsm_aggregate_without_setup_answers_each_uploader_with_an_empty_bank():
    msgs = _fedsm().aggregate({"x": _up(1.0, 1.0), "y": _up(3.0, 1.0)}, 1)
    assert sorted(msgs) == ["x", "y"]
    assert msgs["x"].extras["bank"] == {}  # no site indices assigned: nothing to route to
    assert torch.equal(msgs["y"].entries["w"], torch.full((4,), 2.0))


def test_fedsm_aggregate_messages_every_site_and_keeps_the_partial_masks():
    m = _fedsm(lam=1.0)
    m.setup_server({"a": 1, "b": 1, "c": 1})
    ups = {
        "a": _up(1.0, 1.0, T([True, True, False, False])),
        "c": _up(4.0, 3.0, T([True, False, False, False])),
    }
    msgs = m.aggregate(ups, 1)
    assert sorted(msgs) == ["a", "b", "c"]  # b was not sampled: it still gets w and the rest
    assert "personal" not in msgs["b"].extras and "personal" in msgs["c"].extras
    for msg in msgs.values():
        assert msg.masks["w"].tolist() == [True, True, False, False]  # elements someone shared
        assert msg.entries["w"][:2].tolist() == [(1 + 12) / 4, 1.0]
        assert sorted(msg.extras["bank"]) == ["0", "2"]


# receive -----------------------------------------------------------------------------------------


def _client_with_selector(**kw):
    client = make_client(tiny_unet(), **kw)
    _fedsm().receive_setup(client, {"label": 1, "sites": 3})
    return client


def test_receive_without_a_kept_personal_model_takes_the_float_entries_and_w_s_buffers():
    client = _client_with_selector()
    with torch.no_grad():
        for v in client.model.state_dict().values():
            if not v.is_floating_point():
                v.fill_(9)
    other = {k: v for k, v in state_of(tiny_unet(4)).items() if v.is_floating_point()}
    sent = {k: v.clone() for k, v in other.items()}
    _fedsm().receive(client, Message(entries={}, extras={"personal": sent}))
    kept = client.state[PERSONAL]
    assert set(kept) == set(client.model.state_dict())
    for k, v in kept.items():
        if k in other:
            assert torch.equal(v, other[k]), k
            assert v.data_ptr() != sent[k].data_ptr(), k  # a copy, not the message's tensor
        else:
            assert int(v.max()) == 9 and int(v.min()) == 9, k  # non-float: w's value


def test_receive_keeps_the_personal_models_own_non_float_entries():
    client = _client_with_selector()
    own = state_of(tiny_unet(2))
    ints = [k for k, v in own.items() if not v.is_floating_point()]
    assert ints  # BatchNorm's num_batches_tracked
    for k in ints:
        own[k].fill_(5)
        client.model.state_dict()[k].fill_(9)
    client.state[PERSONAL] = own
    sent = {k: v for k, v in state_of(tiny_unet(4)).items() if v.is_floating_point()}
    _fedsm().receive(client, Message(entries={}, extras={"personal": sent}))
    for k in ints:
        assert int(client.state[PERSONAL][k]) == 5, k  # pᵢ's own, not w's 9


def test_receive_loads_the_averaged_adam_moments_into_the_kept_selector_optimizer():
    client = _client_with_selector()
    m = _fedsm()
    m.train_selector(client)
    opt = client.state[SELECTOR_OPT]["state"]
    ex_avg = {str(i): torch.full_like(s["exp_avg"], 0.25 + i) for i, s in opt.items()}
    ex_sq = {str(i): torch.full_like(s["exp_avg_sq"], 0.5 + i) for i, s in opt.items()}
    sent_avg = {k: v.clone() for k, v in ex_avg.items()}
    m.receive(client, Message(entries={}, extras={"exp_avg": sent_avg, "exp_avg_sq": ex_sq}))
    for i, s in client.state[SELECTOR_OPT]["state"].items():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(s["exp_avg"], ex_avg[str(i)]), i
        assert torch.equal(s["exp_avg_sq"], ex_sq[str(i)]), i
        assert s["exp_avg"].data_ptr() != sent_avg[str(i)].data_ptr()  # a copy


def test_receive_of_moments_before_the_selector_ever_trained_keeps_no_optimizer():
    # a client not sampled in round 1 gets the averaged moments with its first message
    client = _client_with_selector()
    moments = {"0": torch.ones(2)}
    _fedsm().receive(
        client, Message(entries={}, extras={"exp_avg": moments, "exp_avg_sq": moments})
    )
    assert SELECTOR_OPT not in client.state


# local_update and train_selector -----------------------------------------------------------------


def test_local_update_trains_w_then_p_i_from_the_kept_p_i_with_its_own_optimizer_key():
    work = {"epochs": 2, "persist_optimizer": True}
    budget = Budget()
    client = make_client(tiny_unet(0), budget=budget, **work)
    m = _fedsm(selector_epochs=3)
    m.receive_setup(client, {"label": 1, "sites": 3})
    p_start = state_of(tiny_unet(6))
    client.state[PERSONAL] = {k: v.clone() for k, v in p_start.items()}
    m.local_update(client)

    # the reference replays the definition with the client's own training calls, in order
    ref = make_client(tiny_unet(0), **work)
    ref.fit()  # (1) w, the suite's budget
    p = ref.new_model(p_start)
    ref.fit(p, label="personal", key="personal")  # (2) pᵢ from the kept pᵢ

    for k, v in state_of(ref.model).items():
        assert torch.equal(client.model.state_dict()[k], v), k
    for k, v in state_of(p).items():
        assert torch.equal(client.state[PERSONAL][k], v), k
    kept = sorted(k for k in client.state if k.startswith("_optimizer/"))
    assert kept == ["_optimizer/main", "_optimizer/personal"]
    for key in kept:
        mine, theirs = client.state[key]["state"], ref.state[key]["state"]
        for i in theirs:
            assert torch.equal(mine[i]["exp_avg"], theirs[i]["exp_avg"]), (key, i)
    assert budget.samples == {"local": 20, "personal": 20, "selector": 30}


def _reference_selector_training(start, x_batches, label, lr):
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    for x in x_batches:
        opt.zero_grad()
        target = torch.full((len(x),), label, dtype=torch.long)
        F.cross_entropy(_reference_selector(params, x), target).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def test_train_selector_is_adam_at_selector_lr_on_the_site_label_and_keeps_its_moments():
    budget = Budget()
    client = make_client(tiny_unet(), site=2, budget=budget)
    m = _fedsm(selector_lr=0.05, selector_epochs=2, selector_width=2)
    m.receive_setup(client, {"label": 2, "sites": 3})
    start = {k: v.clone() for k, v in client.state[SELECTOR].items()}
    m.train_selector(client)
    m.train_selector(client)  # the second call resumes the first call's Adam state

    ref = make_client(tiny_unet(), site=2)
    xs = [x for _ in range(2) for x, _ in ref.batches("selector", epochs=2)]
    expected = _reference_selector_training(start, xs, 2, 0.05)
    for k, v in expected.items():
        assert torch.allclose(client.state[SELECTOR][k], v, rtol=1e-4, atol=1e-6), k
    assert budget.samples == {"selector": 2 * 2 * 10}


def test_train_selector_refuses_a_non_finite_loss_naming_client_round_and_selector():
    client = make_client(tiny_unet(), site=1, round=3)
    m = _fedsm()
    m.receive_setup(client, {"label": 1, "sites": 2})
    client.state[SELECTOR]["classifier.bias"].fill_(float("nan"))
    with pytest.raises(
        Diverged, match=exactly("non-finite loss (nan) in client site1 round 3 (selector)")
    ):
        m.train_selector(client)


# eval_model --------------------------------------------------------------------------------------


def _routed(site_logits: list[float]):
    client = make_client(tiny_unet(0))
    m = _fedsm()
    m.receive_setup(client, {"label": 0, "sites": 3})
    sel = client.state[SELECTOR]
    sel["classifier.weight"].zero_()
    sel["classifier.bias"].copy_(T(site_logits))  # the selector names one site for any image
    expert = tiny_unet(5)
    floats = {k: v.clone() for k, v in state_of(expert).items() if v.is_floating_point()}
    client.state["fedsm/bank"] = {"1": floats}  # sites 0 and 2 have no pⱼ yet
    client.state[PERSONAL] = state_of(tiny_unet(7))
    return client, m.eval_model(client), expert


def test_eval_model_routes_a_confident_image_to_the_banked_p_j_of_that_site():
    client, model, expert = _routed([0.0, 30.0, 0.0])
    x = client.train_data.images[:3]
    with torch.no_grad():
        out = model.eval()(x)
        ref = expert.eval()(x)  # pⱼ's float entries: its BatchNorm statistics too
    assert isinstance(model, SelectorRouting)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logits", [[30.0, 0.0, 0.0], [0.0, 0.0, 30.0]])
def test_eval_model_sends_images_of_a_site_without_p_j_to_w(logits):
    client, model, _ = _routed(logits)
    x = client.train_data.images[:3]
    with torch.no_grad():
        out = model.eval()(x)
        ref = client.model.eval()(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


class _Counted(torch.nn.Module):
    """A segmentation model with a non-float buffer that is not BatchNorm's (BatchNorm fills a
    missing ``num_batches_tracked`` itself, so it cannot show what the bank lacks)."""

    def __init__(self, seed: int, calls: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("calls", torch.tensor(calls))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_eval_model_builds_p_j_from_the_banked_floats_and_w_s_other_entries():
    client = make_client(_Counted(0, calls=7))
    m = _fedsm()
    m.receive_setup(client, {"label": 0, "sites": 2})
    client.state[SELECTOR]["classifier.weight"].zero_()
    client.state[SELECTOR]["classifier.bias"].copy_(T([0.0, 30.0]))
    expert = _Counted(5, calls=3)
    client.state["fedsm/bank"] = {
        "1": {
            "conv.weight": expert.conv.weight.detach().clone(),
            "conv.bias": expert.conv.bias.detach().clone(),
        }
    }
    model = m.eval_model(client)
    x = client.train_data.images[:2]
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), expert(x), rtol=1e-5, atol=1e-6)
    assert int(model.experts[1].calls) == 7  # the bank sends float entries only: the rest is w's
