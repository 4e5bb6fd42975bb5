"""Methods with personal models or extra passes: FedProx, Ditto, APFL, FedALA, FedRoD, FedAvg-FT."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from method_helpers import (
    assert_untouched_copy,
    capturing,
    floating,
    make_client,
    run,
    state_of,
    tiny_federation,
    tiny_unet,
)
from torch import nn

import pflbench.methods.ditto as ditto_module
from pflbench.client import Budget, Client, LocalWork
from pflbench.messages import Message
from pflbench.methods._common import proximal_term
from pflbench.methods.apfl import ALPHA
from pflbench.methods.apfl import PERSONAL as APFL_PERSONAL
from pflbench.methods.ditto import PERSONAL as DITTO_PERSONAL
from pflbench.methods.fedala import STARTED, WEIGHTS, ala_tensors
from pflbench.methods.fedrod import PERSONAL_HEAD, balanced_loss, log_prior
from pflbench.registry import get_method
from pflbench.training import segmentation_loss

SGD = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt())


def _assert_same_run(a, b) -> None:
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.cases, b.cases)
    pd.testing.assert_frame_equal(a.comm, b.comm)


def _assert_same_models(x: dict, y: dict) -> None:
    assert set(x) == set(y)
    for cid in x:
        for k, v in x[cid].items():
            assert torch.equal(v, y[cid][k]), (cid, k)


# FedProx -----------------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_bitwise_fedavg():
    data = tiny_federation()
    prox, avg = capturing(get_method("fedprox")), capturing(get_method("fedavg"))
    _, a = run(data, prox(mu=0.0), seed=0, rounds=2)
    _, b = run(data, avg(), seed=0, rounds=2)
    assert a.rounds["value"].gt(0).any()
    _assert_same_run(a, b)
    _assert_same_models(prox.models, avg.models)
    # and μ > 0 really changes the computation
    prox2 = capturing(get_method("fedprox"))
    run(data, prox2(mu=1.0), seed=0, rounds=2)
    assert not torch.equal(prox2.models["site0"]["head.weight"], avg.models["site0"]["head.weight"])


def test_proximal_term_covers_parameters_only():
    model = tiny_unet()
    anchor = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    term = proximal_term(anchor, 0.5)
    n = sum(p.numel() for p in model.parameters())
    assert float(term(model).detach()) == pytest.approx(0.5 / 2 * n * 0.01, rel=1e-4)
    with torch.no_grad():  # buffers are not pulled
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(5.0)
    assert float(term(model).detach()) == pytest.approx(0.5 / 2 * n * 0.01, rel=1e-4)


def _proximal_sgd_by_hand(mu: float, lr: float, batches) -> dict[str, torch.Tensor]:
    """FedProx's local solver from its definition: SGD on f(θ) + μ/2‖θ − w‖², whose gradient is
    ∇f(θ) + μ(θ − w), with w the parameters at the start of the round."""
    model = tiny_unet()
    model.train()
    params = dict(model.named_parameters())
    w = {n: p.detach().clone() for n, p in params.items()}
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                p.sub_(lr * (g + mu * (p - w[n])))
    return _params(model)


def test_fedprox_local_update_is_the_hand_computed_proximal_step():
    mu, lr = 5.0, 0.1  # lr·μ = 0.5: the pull is a large part of every step after the first
    work = {"epochs": None, "steps": 3, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())  # the same stream the client gets
    client = make_client(tiny_unet(), **work)
    get_method("fedprox")(mu=mu).local_update(client)
    expected = _proximal_sgd_by_hand(mu, lr, batches)
    got = _params(client.model)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6, msg=n)
    # the tolerance is far below what μ changes: μ/2 and 2μ land elsewhere
    for other in (mu / 2, 2 * mu):
        assert _dist(_proximal_sgd_by_hand(other, lr, batches), expected) > 100 * 1e-6


def test_proximal_term_skips_frozen_parameters_and_refuses_a_model_with_none():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    anchor = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[0].weight.requires_grad_(False)  # frozen: not pulled (its 4 elements do not count)
    term = proximal_term(anchor, 3.0)
    assert float(term(model).detach()) == pytest.approx(3.0 / 2 * (2 + 2 + 1))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(
        ValueError, match="^proximal term over a model without trainable parameters$"
    ):
        term(model)


# Ditto -------------------------------------------------------------------------------------------


def _ditto_round(lam: float, lr: float = 1e-2):
    client = make_client(tiny_unet(), lr=lr, epochs=2, **SGD)
    start = _params(client.model)
    get_method("ditto")(lam=lam, personal_epochs=2).local_update(client)
    personal = {n: client.state[DITTO_PERSONAL][n] for n in start}
    return start, _params(client.model), personal


def test_ditto_anchor_is_the_round_start_global_parameters(monkeypatch):
    seen = {}
    real = ditto_module.proximal_term

    def spy(anchor, coef):
        seen["anchor"] = {k: v.clone() for k, v in anchor.items()}
        return real(anchor, coef)

    monkeypatch.setattr(ditto_module, "proximal_term", spy)
    client = make_client(tiny_unet())
    start = state_of(client.model)
    get_method("ditto")().local_update(client)
    params = {n for n, _ in client.model.named_parameters()}
    assert set(seen["anchor"]) == params  # parameters only, never buffers
    for n in params:
        assert torch.equal(seen["anchor"][n], start[n]), n
    assert not torch.equal(client.model.state_dict()["head.weight"], start["head.weight"])


def test_ditto_with_a_very_large_lambda_keeps_personal_at_the_global_model():
    # SGD with λ·lr = 1: every personal step lands one gradient step away from the anchor
    start, trained, v_big = _ditto_round(lam=100.0)
    _, _, v_small = _ditto_round(lam=1e-3)
    assert _dist(v_big, start) < 0.25 * _dist(v_small, start)
    assert _dist(v_big, start) < 0.25 * _dist(trained, start)
    assert _dist(v_big, start) < _dist(v_big, trained)  # anchored at the start, not the update


def test_ditto_evaluates_the_personal_model_and_counts_its_pass():
    cls = capturing(get_method("ditto"))
    _, out = run(tiny_federation(), cls(), rounds=2)
    for cid, evaluated in cls.evaluated.items():
        personal = cls.states[cid][DITTO_PERSONAL]
        for k, v in evaluated.state_dict().items():
            assert torch.equal(v, personal[k]), (cid, k)
        assert not torch.equal(personal["head.weight"], cls.models[cid]["head.weight"])
    budget = out.info["budget"]
    assert budget["personal"] == budget["local"] > 0  # vᵢ gets the suite's budget, as w does


# APFL --------------------------------------------------------------------------------------------


def test_apfl_with_alpha_fixed_at_zero_evaluates_fedavgs_global_model():
    data = tiny_federation()
    apfl, avg = capturing(get_method("apfl")), capturing(get_method("fedavg"))
    _, a = run(data, apfl(alpha=0.0, learn_alpha=False), seed=1, rounds=2)
    _, b = run(data, avg(), seed=1, rounds=2)
    _assert_same_run(a, b)
    _assert_same_models(apfl.models, avg.models)
    assert all(s[ALPHA] == 0.0 for s in apfl.states.values())


@pytest.mark.parametrize(
    "alpha, learn_alpha, optimizer",
    [(0.5, True, "adam"), (0.25, True, "sgd"), (1.0, False, "sgd")],
)
def test_apfl_w_trajectory_is_fedavgs_local_step_for_nonzero_alpha(alpha, learn_alpha, optimizer):
    # w takes exactly FedAvg's step on every batch, whatever α is: only v and α see the mixture
    work = {"epochs": 2, "optimizer": optimizer, "momentum": 0.0, "weight_decay": 0.0}
    apfl_client, avg_client = make_client(tiny_unet(), **work), make_client(tiny_unet(), **work)
    get_method("apfl")(alpha=alpha, learn_alpha=learn_alpha).local_update(apfl_client)
    avg_client.fit()
    w, fedavg = state_of(apfl_client.model), state_of(avg_client.model)
    for k in fedavg:
        assert torch.equal(w[k], fedavg[k]), k
    personal = apfl_client.state[APFL_PERSONAL]
    # v trains on the mixture; at α = 1 that is v alone, which then walks w's path exactly
    v_is_w = torch.equal(personal["head.weight"], w["head.weight"])
    assert v_is_w == (alpha == 1.0 and not learn_alpha)


def test_apfl_w_follows_fedavg_through_a_run_at_alpha_one_half():
    data = tiny_federation(sizes=(6, 10, 20))
    apfl, avg = capturing(get_method("apfl")), capturing(get_method("fedavg"))
    run(data, apfl(alpha=0.5), seed=1, rounds=2)
    run(data, avg(), seed=1, rounds=2)
    _assert_same_models(apfl.models, avg.models)  # the client model is w; v lives in state


def test_apfl_alpha_moves_and_stays_in_unit_interval():
    client = make_client(tiny_unet(), epochs=2)
    get_method("apfl")().local_update(client)
    assert client.state[ALPHA] != 0.25 and 0.0 <= client.state[ALPHA] <= 1.0
    fixed = make_client(tiny_unet(), epochs=2)
    get_method("apfl")(learn_alpha=False).local_update(fixed)
    assert fixed.state[ALPHA] == 0.25
    wild = make_client(tiny_unet(), epochs=2)
    get_method("apfl")(alpha_lr=1e4).local_update(wild)
    assert wild.state[ALPHA] in (0.0, 1.0)  # clipped, not beyond


def test_apfl_evaluates_the_output_mixture():
    client = make_client(tiny_unet(), epochs=1)
    method = get_method("apfl")()
    method.local_update(client)
    assert 0 < client.state[ALPHA] < 1
    # make v clearly different from w so that the mixture is distinguishable from either
    v = tiny_unet(seed=7)
    client.state[APFL_PERSONAL] = state_of(v)
    client.state[ALPHA] = alpha = 0.3
    mix = method.eval_model(client).eval()
    w = client.model.eval()
    x = client.train_data.images[:3]
    with torch.no_grad():
        expected = alpha * v.eval()(x) + (1 - alpha) * w(x)
        got = mix(x)
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, w(x), atol=1e-3)
        assert not torch.allclose(got, v(x), atol=1e-3)


# FedALA -----------------------------------------------------------------------------------------


def test_fedala_top_p_counts_parameter_tensors_from_the_end():
    model = tiny_unet()
    names = [n for n, _ in model.named_parameters()]
    assert ala_tensors(model, 2) == ["head.weight", "head.bias"]
    assert ala_tensors(model, 1) == ["head.bias"]
    assert ala_tensors(model, 0) == names
    assert ala_tensors(model, 10**6) == names


def _ala_setup(budget: Budget, eta: float = 1.0, p: int = 2, **hp):
    """A client whose model has drifted from the global model it is about to receive."""
    method = get_method("fedala")(eta=eta, p=p, **hp)
    client = make_client(tiny_unet(0), budget=budget, lr=3e-2)
    client.fit()  # local training: the local model now differs from the global one
    glob = state_of(tiny_unet(1))
    message = Message(entries=floating(glob))
    return method, client, glob, message


@pytest.mark.parametrize("p, eta", [(2, 10.0), (0, 100.0)])
def test_fedala_blends_only_the_chosen_tensors_with_weights_in_unit_interval(p, eta):
    budget = Budget()
    method, client, glob, message = _ala_setup(budget, eta=eta, p=p)
    local = state_of(client.model)
    method.receive(client, message)
    after = state_of(client.model)
    top = ala_tensors(client.model, p)
    params = {n for n, _ in client.model.named_parameters()}
    weights = client.state[WEIGHTS]
    assert set(weights) == set(top)
    for k, v in after.items():
        if k in top:
            w = weights[k]
            assert w.min() >= 0 and w.max() <= 1
            assert torch.equal(v, local[k] + (glob[k] - local[k]) * w), k
        elif k in params:
            assert torch.equal(v, glob[k]), k  # lower parameters ← global
        else:
            assert torch.equal(v, local[k]), k  # buffers (BN statistics) stay the client's
    all_w = torch.cat([w.flatten() for w in weights.values()])  # clipped at both ends, not only
    assert (all_w == 0).any() and (all_w == 1).any() and ((all_w > 0) & (all_w < 1)).any()
    assert not torch.equal(after["head.weight"], glob["head.weight"])


def test_fedala_first_time_runs_until_settled_then_one_epoch():
    budget = Budget()
    method, client, glob, message = _ala_setup(budget, window=3, max_first_epochs=6)
    subset = int(0.8 * client.num_train)
    method.receive(client, message)
    first = budget.samples["ala"]
    assert first % subset == 0 and 4 <= first // subset <= 6  # > window epochs, bounded
    assert client.state[STARTED] is True
    w1 = {k: v.clone() for k, v in client.state[WEIGHTS].items()}
    assert any(not torch.equal(w, torch.ones_like(w)) for w in w1.values())  # W learned
    client.fit()
    method.fresh().receive(client, message)
    assert budget.samples["ala"] - first == subset  # later rounds: one epoch


def test_fedala_skips_when_the_local_model_is_the_global_one():
    budget = Budget()
    method = get_method("fedala")()
    client = make_client(tiny_unet(0), budget=budget)
    glob = state_of(client.model)
    method.receive(client, Message(entries=floating(glob)))
    assert "ala" not in budget.samples and WEIGHTS not in client.state
    for k, v in client.model.state_dict().items():
        assert torch.equal(v, glob[k]), k


# FedRoD -----------------------------------------------------------------------------------------


def test_fedrod_predicts_generic_plus_personal_logits():
    client = make_client(tiny_unet(), epochs=2)
    method = get_method("fedrod")()
    before = state_of(client.model)
    method.local_update(client)
    ph_state = client.state[PERSONAL_HEAD]
    assert set(ph_state) == {"weight", "bias"} and ph_state["weight"].abs().sum() > 0
    model = client.model.eval()
    ph = nn.Conv2d(model.feature_channels, 1, 1)
    ph.load_state_dict(ph_state)
    x = client.train_data.images[:3]
    with torch.no_grad():
        f = model.feature_forward(x)
        expected = model.head(f) + ph(f)
        got = method.eval_model(client).eval()(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, model(x), atol=1e-4)
    assert not torch.equal(before["head.weight"], state_of(client.model)["head.weight"])
    # the personal head never leaves the client: the upload is the model's entries only
    up = method.upload(client)
    assert set(up.entries) == set(floating(state_of(client.model)))


def test_fedrod_balanced_loss_uses_pixel_class_frequencies():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # 4 foreground pixels of 32
    prior = log_prior(labels, 1)
    assert torch.allclose(prior.exp(), torch.tensor([29.0, 5.0], dtype=torch.float64) / 34)
    logits = torch.randn(2, 1, 4, 4)
    shifted = segmentation_loss(logits + float(prior[1] - prior[0]), labels)
    assert torch.allclose(balanced_loss(logits, labels, prior, segmentation_loss), shifted)
    uniform = torch.log(torch.tensor([0.5, 0.5]))
    assert torch.allclose(
        balanced_loss(logits, labels, uniform, segmentation_loss), segmentation_loss(logits, labels)
    )
    multi = log_prior(torch.tensor([[[0, 1], [2, 2]]]), 3)
    assert torch.allclose(multi.exp(), torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64) / 7)


def test_fedrod_balanced_loss_applies_the_given_loss():
    labels = (torch.rand(2, 4, 4) > 0.6).long()
    labels[1] = 0
    logits, prior = torch.randn(2, 1, 4, 4), log_prior(labels, 1)
    shift = float(prior[1] - prior[0])
    paper = balanced_loss(logits, labels, prior, lambda z, t: segmentation_loss(z, t, 1e-6))
    assert torch.allclose(paper, segmentation_loss(logits + shift, labels, 1e-6))
    assert not torch.allclose(paper, segmentation_loss(logits + shift, labels, 1.0))


def test_fedrod_trains_both_heads_on_the_clients_loss(monkeypatch):
    """Both of FedRoD's losses go through client.loss, so protocol.loss_smoothing reaches them."""
    import pflbench.client as client_module

    seen = []

    def recording(logits, labels, smooth=1.0):
        seen.append(smooth)
        return segmentation_loss(logits, labels, smooth)

    monkeypatch.setattr(client_module, "segmentation_loss", recording)
    client = make_client(tiny_unet(), loss_smoothing=1e-6)
    get_method("fedrod")().local_update(client)
    batches = -(-len(client.train_data) // 4)
    # the generic (balanced) and the personal head, per batch, both with the protocol's ε
    assert seen == [1e-6] * (2 * batches)


def test_fedrod_run_shares_body_and_generic_head_only():
    cls = capturing(get_method("fedrod"))
    run(tiny_federation(), cls(), rounds=2)
    m = cls.models
    for k, v in floating(m["site0"]).items():
        assert torch.equal(v, m["site1"][k]), k
    heads = [cls.states[c][PERSONAL_HEAD]["weight"] for c in ("site0", "site1")]
    assert not torch.equal(*heads)


# FedAvg-FT ---------------------------------------------------------------------------------------


def test_fedavg_ft_fine_tunes_a_copy_and_leaves_the_global_model_intact():
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget)
    before = state_of(client.model)
    tuned = get_method("fedavg-ft")(finetune_steps=4).eval_model(client)
    assert tuned is not client.model
    for k, v in client.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(tuned.state_dict()["head.weight"], before["head.weight"])
    assert budget.samples == {"finetune": 4 + 4 + 2 + 4}  # 10 images, batch 4, four steps


def test_fedavg_ft_with_zero_steps_evaluates_the_global_model_untouched():
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget, persist_optimizer=True)
    tuned = get_method("fedavg-ft")(finetune_steps=0).eval_model(client)
    assert_untouched_copy(tuned, client, budget)  # no pass, no optimizer made


def test_fedavg_ft_keeps_its_fine_tuning_optimizer_apart_from_training():
    """Under optimizer_state: persist the fine-tuning Adam state is its own (key "finetune"):
    evaluation never advances the training optimizer's moments."""
    client = make_client(tiny_unet(), persist_optimizer=True)
    client.fit()
    main = client.state["_optimizer/main"]
    get_method("fedavg-ft")(finetune_steps=2).eval_model(client)
    assert set(client.state) == {"_optimizer/main", "_optimizer/finetune"}
    assert client.state["_optimizer/main"] is main
    steps = {int(s["step"]) for s in client.state["_optimizer/finetune"]["state"].values()}
    assert steps == {2}


def test_fedavg_ft_trains_as_fedavg_and_counts_its_fine_tuning():
    data = tiny_federation()
    ft, avg = capturing(get_method("fedavg-ft")), capturing(get_method("fedavg"))
    _, a = run(data, ft(), rounds=2)
    _, b = run(data, avg(), rounds=2)
    _assert_same_models(ft.models, avg.models)  # the global models are FedAvg's
    _assert_same_models(ft.after, avg.models)  # and evaluation did not touch them
    assert not a.rounds["value"].equals(b.rounds["value"])  # the evaluated model differs
    # 7 training images, batch 4: 10 steps = 5 × (4 + 3); 2 evaluation rounds + the final
    # per-case evaluation of the last round, 3 clients
    assert a.info["budget"]["finetune"] == 3 * 3 * 35
    assert a.info["budget"]["local"] == b.info["budget"]["local"]


def test_fedavg_ft_with_one_step_fine_tunes_once_and_local_shares_nothing():
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget)
    before = state_of(client.model)
    tuned = get_method("fedavg-ft")(finetune_steps=1).eval_model(client)
    assert budget.samples == {"finetune": 4}  # one step of batch 4
    assert not torch.equal(tuned.state_dict()["head.weight"], before["head.weight"])
    assert torch.equal(client.model.state_dict()["head.weight"], before["head.weight"])
    part = get_method("local")().partition(client.model)
    assert set(part) == set(before) and not any(part.values())


# APFL, from its update rule (tests written from the surviving mutants of issue 22) ----------------


def _apfl_by_hand(w, v, alpha, batches, lr, alpha_lr, alpha_reg, loss):
    """APFL's local round from its definition, plain SGD: per batch w ← w − η∇f(w(x));
    v ← v − η∇ᵥ f(α·v(x) + (1 − α)·w(x)), w(x) the output before w's step; and
    α ← clip(α − η_α(∂f/∂α + c·α), 0, 1). Returns w, v, α and the unclipped α proposals."""
    w.train()
    v.train()
    proposals = []
    for x, y in batches:
        out_w = w(x)
        grads = torch.autograd.grad(loss(out_w, y), list(w.parameters()))
        with torch.no_grad():
            for p, g in zip(w.parameters(), grads, strict=True):
                p.sub_(lr * g)
        a = torch.tensor(alpha, requires_grad=True)
        f = loss(a * v(x) + (1 - a) * out_w.detach(), y)
        *g_v, g_a = torch.autograd.grad(f, [*v.parameters(), a])
        with torch.no_grad():
            for p, g in zip(v.parameters(), g_v, strict=True):
                p.sub_(lr * g)
        proposals.append(alpha - alpha_lr * (float(g_a) + alpha_reg * alpha))
        alpha = min(1.0, max(0.0, proposals[-1]))
    return state_of(w), state_of(v), alpha, proposals


def _trained_unet(seed: int) -> nn.Module:
    """A model fitted to site 0 (a personal model clearly better than a fresh global one)."""
    client = make_client(tiny_unet(seed), lr=5e-2, epochs=4)
    client.fit()
    return client.model


@pytest.mark.parametrize(
    "alpha, alpha_lr, alpha_reg, v_kind, bound",
    [
        (0.4, 0.5, 0.3, "random", None),  # inside (0, 1): every term of the α step counts
        (0.6, 1e4, 0.0, "trained", 1.0),  # v is better: ∂f/∂α < 0, the huge step clips at 1
        (0.3, 1e4, 50.0, "random", 0.0),  # c·α dominates: clipped at 0
    ],
)
def test_apfl_local_round_is_the_hand_computed_update_of_w_v_and_alpha(
    alpha, alpha_lr, alpha_reg, v_kind, bound
):
    lr = 0.05
    work = {"epochs": None, "steps": 3, "lr": lr, **SGD}
    v0 = tiny_unet(7) if v_kind == "random" else _trained_unet(7)
    reference = make_client(tiny_unet(), round=2, **work)
    batches = list(reference.batches())  # the stream the client below draws
    # the client resumes a personal v and an α of an earlier round (v is not the global model)
    state = {APFL_PERSONAL: state_of(v0), ALPHA: alpha}
    client = make_client(tiny_unet(), state=state, round=2, **work)
    get_method("apfl")(alpha_lr=alpha_lr, alpha_reg=alpha_reg).local_update(client)
    w, v, a, proposals = _apfl_by_hand(
        tiny_unet(), copy.deepcopy(v0), alpha, batches, lr, alpha_lr, alpha_reg, reference.loss
    )
    got_w, got_v = state_of(client.model), client.state[APFL_PERSONAL]
    for k in w:
        torch.testing.assert_close(got_w[k], w[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(got_v[k], v[k], rtol=1e-5, atol=1e-6, msg=k)
    assert client.state[ALPHA] == pytest.approx(a, abs=1e-6)
    if bound is None:  # never clipped, and the step is far from zero
        assert all(0 < p < 1 for p in proposals) and abs(a - alpha) > 1e-3
    else:  # the first step leaves [0, 1] through this bound and is clipped to it
        assert (proposals[0] > 1) if bound == 1.0 else (proposals[0] < 0)
        assert client.state[ALPHA] == pytest.approx(a, abs=1e-6) and 0.0 <= a <= 1.0
    # v starts from the state's v: from the global model it ends elsewhere
    _, v_from_w, _, _ = _apfl_by_hand(
        tiny_unet(), tiny_unet(), alpha, batches, lr, alpha_lr, alpha_reg, reference.loss
    )
    assert _dist(floating(v_from_w), floating(v)) > 1e-3


def _apfl_round_two(state: dict, w: nn.Module) -> tuple[dict, dict]:
    """One step of round 2 from a copy of ``state``: w's and v's states after it."""
    state, w = copy.deepcopy(state), copy.deepcopy(w)
    client = make_client(w, state=state, round=2, persist_optimizer=True, epochs=None, steps=1)
    get_method("apfl")().local_update(client)
    return state_of(w), state[APFL_PERSONAL]


def test_apfl_keeps_the_optimizer_states_of_w_and_v_apart():
    """Under optimizer_state: persist, w's Adam state is key "main" (FedAvg's: w's trajectory
    stays FedAvg's over rounds) and v's is its own, "personal"; each resumes its own state."""
    state, avg_state = {}, {}
    w, avg = tiny_unet(), tiny_unet()
    for rnd in (1, 2):
        client = make_client(w, state=state, round=rnd, persist_optimizer=True)
        get_method("apfl")().local_update(client)
        fedavg = make_client(avg, state=avg_state, round=rnd, persist_optimizer=True)
        fedavg.fit()
    assert set(state) == {"_optimizer/main", "_optimizer/personal", APFL_PERSONAL, ALPHA}
    batches = 2 * -(-len(fedavg.train_data) // 4)  # two rounds of one epoch, batch 4
    for key in ("main", "personal"):
        steps = {int(s["step"]) for s in state[f"_optimizer/{key}"]["state"].values()}
        assert steps == {batches}, key
    for k, v in state_of(avg).items():
        assert torch.equal(state_of(w)[k], v), k
    # one step of a next round: v's step reads only v's Adam moments, w's only w's (v's first
    # mixture uses w's output before w's step, so neither depends on the other's optimizer)
    w_base, v_base = _apfl_round_two(state, w)
    for key, same, moved in (("main", v_base, w_base), ("personal", w_base, v_base)):
        other = copy.deepcopy(state)
        for s in other[f"_optimizer/{key}"]["state"].values():
            s["exp_avg"].mul_(-5.0)
        got_w, got_v = _apfl_round_two(other, w)
        got_same, got_moved = (got_v, got_w) if key == "main" else (got_w, got_v)
        for k in same:
            assert torch.equal(got_same[k], same[k]), (key, k)
        assert not torch.equal(got_moved["head.weight"], moved["head.weight"]), key


def _nan_head_unet() -> nn.Module:
    """A tiny U-Net whose head bias is NaN: its first loss is not finite."""
    bad = tiny_unet()
    with torch.no_grad():
        bad.head.bias.fill_(float("nan"))
    return bad


def test_apfl_names_where_a_step_diverged():
    from pflbench.training import Diverged

    bad = _nan_head_unet()
    client = make_client(bad, round=3)
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 3 \(apfl\)$"
    ):
        get_method("apfl")().local_update(client)
    client = make_client(tiny_unet(), state={APFL_PERSONAL: state_of(bad), ALPHA: 0.5}, round=3)
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 3 \(apfl\) personal$"
    ):
        get_method("apfl")().local_update(client)


# Ditto, from its update rule (tests written from the surviving mutants of issue 22) ---------------


def _sgd_by_hand(model, batches, lr, loss, anchor=None, lam=0.0):
    """Plain SGD on f(θ) (+ λ/2‖θ − anchor‖² when an anchor is given), in train mode."""
    model.train()
    params = dict(model.named_parameters())
    for x, y in batches:
        grads = torch.autograd.grad(loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                pull = lam * (p - anchor[n]) if anchor is not None else 0.0
                p.sub_(lr * (g + pull))
    return state_of(model)


@pytest.mark.parametrize("personal_epochs", [None, 2])
def test_ditto_local_round_is_fedavgs_step_then_the_hand_computed_proximal_steps_of_v(
    personal_epochs,
):
    lam, lr = 4.0, 0.05  # λ·η = 0.2: the pull is a large part of every step of v
    work = {"epochs": 1, "lr": lr, **SGD}
    v0 = tiny_unet(7)  # a personal model of an earlier round, not the global model
    reference = make_client(tiny_unet(), round=2, **work)
    w_batches = list(reference.batches())
    v_batches = list(reference.batches(epochs=personal_epochs))
    client = make_client(tiny_unet(), state={DITTO_PERSONAL: state_of(v0)}, round=2, **work)
    get_method("ditto")(lam=lam, personal_epochs=personal_epochs).local_update(client)
    anchor = _params(tiny_unet())  # the round-start global model
    w = _sgd_by_hand(tiny_unet(), w_batches, lr, reference.loss)
    v = _sgd_by_hand(copy.deepcopy(v0), v_batches, lr, reference.loss, anchor, lam)
    got_w, got_v = state_of(client.model), client.state[DITTO_PERSONAL]
    for k in w:
        torch.testing.assert_close(got_w[k], w[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(got_v[k], v[k], rtol=1e-5, atol=1e-6, msg=k)
    # v's budget: the suite's (one epoch) or personal_epochs
    assert len(v_batches) == len(w_batches) * (personal_epochs or 1)
    # the tolerance is far below what the anchor, λ and v's start change
    v_at_w = _sgd_by_hand(tiny_unet(), v_batches, lr, reference.loss, anchor, lam)
    v_at_update = _sgd_by_hand(copy.deepcopy(v0), v_batches, lr, reference.loss, _params_of(w), lam)
    v_no_pull = _sgd_by_hand(copy.deepcopy(v0), v_batches, lr, reference.loss)
    for other in (v_at_w, v_at_update, v_no_pull):
        assert _dist(floating(other), floating(v)) > 1e-3


def _params_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {n for n, _ in tiny_unet().named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def test_ditto_keeps_the_optimizer_states_of_w_and_v_apart():
    """Under optimizer_state: persist, w's Adam state is FedAvg's ("main") and vᵢ's its own
    ("personal"); each resumes the next round."""
    state = {}
    w = tiny_unet()
    for rnd in (1, 2):
        client = make_client(w, state=state, round=rnd, persist_optimizer=True)
        get_method("ditto")().local_update(client)
    assert set(state) == {"_optimizer/main", "_optimizer/personal", DITTO_PERSONAL}
    batches = 2 * -(-len(client.train_data) // 4)  # two rounds of one epoch, batch 4
    for key in ("main", "personal"):
        steps = {int(s["step"]) for s in state[f"_optimizer/{key}"]["state"].values()}
        assert steps == {batches}, key


def test_ditto_records_personal_epochs_as_a_deviation_only_when_set():
    default = get_method("ditto")()
    assert default.active_deviations() == list(default.deviations)
    set_apart = get_method("ditto")(personal_epochs=3).active_deviations()
    assert set_apart[:-1] == list(default.deviations)
    assert set_apart[-1].startswith("personal_epochs = 3: vᵢ's budget is set apart from the ")
    assert set_apart[-1].endswith("(paper and official code: the same budget as w)")


# FedRoD, from its update rule (tests written from the surviving mutants of issue 22) --------------


def _fedrod_by_hand(model, personal, batches, lr, loss, labels):
    """FedRoD's local round from its definition, plain SGD: per batch f = body(x), g = head(f);
    body and generic head step on the balanced loss f(g + log(π₁/π₀)) (π: the add-one smoothed
    background/foreground pixel frequencies of the client's training labels); the personal head
    p steps on f(g.detach() + p(f.detach())), g and f from before the body's step."""
    fg = int((labels > 0).sum())
    shift = float(
        torch.log(torch.tensor((fg + 1) / (labels.numel() - fg + 1), dtype=torch.float64))
    )
    model.train()
    personal.train()
    body, heads = list(model.parameters()), list(personal.parameters())
    for x, y in batches:
        f = model.feature_forward(x)
        g = model.head(f)
        grads = torch.autograd.grad(loss(g + shift, y), body)
        p_grads = torch.autograd.grad(loss(g.detach() + personal(f.detach()), y), heads)
        with torch.no_grad():
            for p, gr in zip(body + heads, grads + p_grads, strict=True):
                p.sub_(lr * gr)
    return state_of(model), state_of(personal)


def _client_on_labels(model: nn.Module, label: int, state: dict, **work) -> Client:
    """A lone client over site 0 whose foreground is labelled ``label`` (a one-logit head
    treats every label > 0 as foreground)."""
    base = make_client(tiny_unet())
    site = dataclasses.replace(base.train_data, labels=base.train_data.labels * label)
    full = {**dataclasses.asdict(base.work), **work}
    return Client(
        "site0",
        model,
        state,
        site,
        LocalWork(**full),
        round=2,
        seed=0,
        device=torch.device("cpu"),
        budget=Budget(),
    )


@pytest.mark.parametrize("stored, label", [(False, 1), (True, 1), (True, 2)])
def test_fedrod_local_round_is_the_hand_computed_update_of_body_and_both_heads(stored, label):
    lr = 0.1
    work = {"epochs": 2, "lr": lr, **SGD}
    start = nn.Conv2d(tiny_unet().feature_channels, 1, 1)  # a personal head of an earlier round
    reference = _client_on_labels(tiny_unet(), label, {}, **work)
    batches = list(reference.batches())
    state = {PERSONAL_HEAD: state_of(start)} if stored else {}
    client = _client_on_labels(tiny_unet(), label, state, **work)
    get_method("fedrod")().local_update(client)
    personal = copy.deepcopy(start)
    if not stored:  # the first round's personal head is zero: its prediction is the generic one
        with torch.no_grad():
            for p in personal.parameters():
                p.zero_()
    model, head = _fedrod_by_hand(
        tiny_unet(), personal, batches, lr, reference.loss, reference.train_data.labels
    )
    got = state_of(client.model)
    for k in model:
        torch.testing.assert_close(got[k], model[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in head:
        torch.testing.assert_close(client.state[PERSONAL_HEAD][k], head[k], rtol=1e-5, atol=1e-6)
    # the tolerance is far below what the balanced loss changes: the plain loss lands elsewhere
    unbalanced = _client_on_labels(tiny_unet(), label, {}, **work)
    unbalanced.fit()
    assert _dist(floating(state_of(unbalanced.model)), floating(model)) > 1e-3


def test_fedrod_keeps_the_optimizer_states_of_model_and_personal_head_apart():
    state = {}
    model = tiny_unet()
    for rnd in (1, 2):
        client = make_client(model, state=state, round=rnd, persist_optimizer=True)
        get_method("fedrod")().local_update(client)
    assert set(state) == {"_optimizer/main", "_optimizer/personal", PERSONAL_HEAD}
    batches = 2 * -(-len(client.train_data) // 4)  # two rounds of one epoch, batch 4
    sizes = {"main": len(list(model.parameters())), "personal": 2}  # the head: weight, bias
    for key, n in sizes.items():
        saved = state[f"_optimizer/{key}"]["state"]
        assert len(saved) == n and {int(s["step"]) for s in saved.values()} == {batches}, key


class _NoFeatures(nn.Module):
    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 1, 1)


class _NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 1, 1)

    def feature_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fedrod_refuses_a_model_without_features_or_head_by_name():
    from pflbench.partition import PartitionError

    method = get_method("fedrod")()
    with pytest.raises(
        TypeError,
        match=r"^fedrod: model _NoFeatures has no feature_forward\(x\); FedRoD needs the body "
        r"features to attach its personal head$",
    ):
        method.setup(make_client(_NoFeatures()))
    with pytest.raises(
        PartitionError, match=r"^fedrod: model _NoHead declares no 'head_path'; fedrod "
    ):
        method.setup(make_client(_NoHead()))


def test_fedrod_names_where_a_step_diverged():
    from pflbench.training import Diverged

    bad = _nan_head_unet()
    client = make_client(bad, round=3)
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 3 \(fedrod\)$"
    ):
        get_method("fedrod")().local_update(client)
    head = nn.Conv2d(tiny_unet().feature_channels, 1, 1)
    with torch.no_grad():
        head.bias.fill_(float("nan"))
    client = make_client(tiny_unet(), state={PERSONAL_HEAD: state_of(head)}, round=3)
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 3 \(fedrod\) personal$"
    ):
        get_method("fedrod")().local_update(client)


# FedALA, from its update rule (tests written from the surviving mutants of issue 22) --------------


def _ala_by_hand(client, glob, top, weights, eta, s, epochs_rule):
    """FedALA's adaptive local aggregation from its definition, on ``client`` (a twin of the
    client under test, with the same generator streams): a random s % (at least 2) of the
    training images; a copy of the local model with every parameter ← w except the top ones,
    θ̂ = θ + (w − θ) ⊙ W there; per batch W ← clip(W − η ∇_θ̂ f ⊙ (w − θ), 0, 1); epochs until
    ``epochs_rule(epoch mean losses)`` says stop. Returns W, the blended top, the epoch count."""
    data = client.train_data
    n = len(data)
    m = min(n, max(2, int(s / 100 * n)))
    idx = torch.randperm(n, generator=client.generator("ala-sample"))[:m].sort().values
    subset = type(data)(
        name=data.name,
        images=data.images[idx],
        labels=data.labels[idx],
        case_ids=[data.case_ids[i] for i in idx.tolist()],
    )
    local = {k: v.clone() for k, v in client.model.state_dict().items()}
    tmp = copy.deepcopy(client.model)
    params = dict(tmp.named_parameters())
    weights = {k: w.clone() for k, w in weights.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(local[k] + (glob[k] - local[k]) * weights[k] if k in top else glob[k])
    tmp.train()
    losses = []
    while True:
        epoch = []
        for x, y in client.batches("ala", epochs=1, data=subset):
            loss = client.loss(tmp(x), y)
            grads = torch.autograd.grad(loss, [params[k] for k in top])
            with torch.no_grad():
                for k, g in zip(top, grads, strict=True):
                    diff = glob[k] - local[k]
                    weights[k] = (weights[k] - eta * g * diff).clamp(0, 1)
                    params[k].copy_(local[k] + diff * weights[k])
            epoch.append(float(loss.detach()))
        losses.append(sum(epoch) / len(epoch))
        if epochs_rule(losses):
            break
    blended = {k: local[k] + (glob[k] - local[k]) * weights[k] for k in top}
    return weights, blended, len(losses), m


def _settled(window: int, threshold: float, most: int):
    """The first ALA's stopping rule: more than ``window`` epochs and the std of the last
    ``window`` epoch losses below ``threshold``, or ``most`` epochs."""

    def rule(losses: list[float]) -> bool:
        last = torch.tensor(losses[-window:], dtype=torch.float64)
        settled = len(losses) > window and float(last.std(unbiased=False)) < threshold
        return settled or len(losses) >= most

    return rule


@pytest.mark.parametrize(
    "first, window, threshold, most, s, p",
    [
        (False, 10, 0.1, 20, 80.0, 2),  # a later round: one epoch, W resumed from the state
        (True, 3, 1e9, 20, 80.0, 2),  # settled at once: window + 1 epochs
        # never settles (the last 2 epoch losses differ by more than 1e-12): max_first_epochs;
        # all tensors; 5 % of 10 images is below the floor of 2
        (True, 2, 1e-12, 5, 5.0, 0),
    ],
)
def test_fedala_receive_is_the_hand_computed_adaptive_local_aggregation(
    first, window, threshold, most, s, p
):
    eta = 5.0
    hp = {"window": window, "threshold": threshold, "max_first_epochs": most, "s": s}
    budget = Budget()
    method = get_method("fedala")(eta=eta, p=p, **hp)
    # the suite trains 2 epochs: an ALA epoch is still one pass over the subset
    client, twin = (
        make_client(tiny_unet(0), budget=b, lr=3e-2, epochs=2) for b in (budget, Budget())
    )
    client.fit()  # local training: the local model now differs from the global one
    twin.fit()
    glob = state_of(tiny_unet(1))
    message = Message(entries=floating(glob))
    budget.samples.clear()
    top = ala_tensors(client.model, p)
    start = {k: torch.rand_like(glob[k]) for k in top}  # W of an earlier round
    if not first:
        client.state.update({WEIGHTS: {k: w.clone() for k, w in start.items()}, STARTED: True})
    local = state_of(client.model)
    method.receive(client, message)
    ones = {k: torch.ones_like(glob[k]) for k in top}
    rule = (lambda losses: True) if not first else _settled(window, threshold, most)
    weights, blended, epochs, m = _ala_by_hand(
        twin, glob, top, ones if first else start, eta, s, rule
    )
    assert epochs == (1 if not first else window + 1 if threshold > 1 else most)
    assert m == max(2, int(s / 100 * len(client.train_data)))
    assert budget.samples["ala"] == epochs * m
    after = state_of(client.model)
    params = {n for n, _ in client.model.named_parameters()}
    for k in after:
        if k in top:
            torch.testing.assert_close(client.state[WEIGHTS][k], weights[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(after[k], blended[k], rtol=1e-5, atol=1e-6, msg=k)
        elif k in params:
            assert torch.equal(after[k], glob[k]), k
        else:
            assert torch.equal(after[k], local[k]), k  # BN statistics: never blended
    assert client.state[STARTED] is True
    # the weights moved away from where they started, and not to the clipping bounds only
    moved = torch.cat([(weights[k] - (ones if first else start)[k]).flatten() for k in top])
    assert moved.abs().max() > 1e-3


def test_fedrod_prior_counts_every_class_and_any_label_above_zero_as_foreground():
    # one logit: labels 2 are foreground too; two classes even when a class never occurs
    labels = torch.zeros(2, 3, 5, dtype=torch.long)
    labels[0, 0, :4] = 2
    prior = log_prior(labels, 1)
    assert torch.allclose(prior.exp(), torch.tensor([26.0 + 1, 4 + 1], dtype=torch.float64) / 32)
    empty = log_prior(torch.zeros(1, 2, 2, dtype=torch.long), 1)
    assert torch.allclose(empty.exp(), torch.tensor([5.0, 1.0], dtype=torch.float64) / 6)
    absent = log_prior(torch.tensor([[[0, 1], [1, 1]]]), 3)  # class 2 absent: add-one count 1
    assert torch.allclose(absent.exp(), torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64) / 7)


def test_fedrod_balanced_loss_shifts_each_class_logit_by_its_log_prior():
    """Balanced softmax for C classes: logit c + log π_c, on the channel axis only (shape
    N×C×H×W with H, W ≠ C, so a shift on another axis cannot pass)."""
    labels = torch.tensor([[[0, 1, 2, 2, 0], [1, 1, 0, 2, 2], [0, 0, 0, 1, 2], [2, 2, 1, 0, 0]]])
    labels = labels.expand(2, 4, 5).clone()
    prior = log_prior(labels, 3)
    logits = torch.randn(2, 3, 4, 5)
    by_hand = logits.clone()
    for c in range(3):
        by_hand[:, c] += float(prior[c])
    expected = segmentation_loss(by_hand, labels)
    assert torch.allclose(balanced_loss(logits, labels, prior, segmentation_loss), expected)
    assert not torch.allclose(expected, segmentation_loss(logits, labels))


def test_fedala_names_where_its_weight_learning_diverged():
    from pflbench.training import Diverged

    method, client, glob, _ = _ala_setup(Budget())
    glob["head.bias"] = torch.full_like(glob["head.bias"], float("nan"))
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 1 \(ala\)$"
    ):
        method.receive(client, Message(entries=floating(glob)))
