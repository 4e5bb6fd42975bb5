"""The generic-FL baselines' rules and refusals, each written out from its paper (issue 22).

These tests kill the mutants that survived ``tests/test_methods_generic.py``: every expected
value is computed here from the method's definition (a loop, a formula), never read back from
the code; the refusals are matched by their exact text, since the message is what names the
method and the client to whoever reads a failed run.
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import exactly, make_client, tiny_unet
from test_methods_generic import scaffold_round_from_random_variates
from torch import nn

from pflbench.messages import Upload
from pflbench.methods import feddyn as feddyn_module
from pflbench.methods import fednova as fednova_module
from pflbench.methods import scaffold as scaffold_module
from pflbench.registry import get_method
from pflbench.training import segmentation_loss

SGD = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# SCAFFOLD ----------------------------------------------------------------------------------------


def test_scaffold_refuses_to_aggregate_without_a_started_server_by_name():
    message = exactly("scaffold: aggregate before start_server (the server has no c)")
    with pytest.raises(RuntimeError, match=message):
        get_method("scaffold")().aggregate({}, 1)
    m = get_method("scaffold")()
    m.start_server(nn.Linear(2, 1), [])  # c exists, but N = 0 clients: c + Σ Δc / 0
    with pytest.raises(RuntimeError, match=message):
        m.aggregate({}, 1)


def test_scaffold_refuses_a_round_without_local_steps_and_takes_a_single_step():
    client = make_client(tiny_unet(), epochs=0, **SGD)
    with pytest.raises(
        RuntimeError, match=exactly("scaffold: client site0 took no local step this round")
    ):
        get_method("scaffold")().local_update(client)
    # K = 1 is a round: option II is then the one raw gradient g(x), since c = cᵢ = 0
    lr = 0.05
    work = {"epochs": None, "steps": 1, "lr": lr, **SGD}
    ((x, y),) = list(make_client(tiny_unet(), **work).batches())
    one = make_client(tiny_unet(), **work)
    get_method("scaffold")().local_update(one)
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
    for n, g in zip(params, grads, strict=True):
        torch.testing.assert_close(
            one.state[scaffold_module.CLIENT_C][n], g, rtol=1e-4, atol=1e-5, msg=n
        )


def test_scaffold_auto_under_sgd_with_momentum_is_literal_option_two():
    """``auto`` means option II for every SGD, momentum included; with heavy-ball momentum the
    mean raw gradient is *not* (x − y)/(Kη) − c + cᵢ, so the two rules part here."""
    lr, rho, steps = 0.05, 0.9, 3
    work = {
        "epochs": None,
        "steps": steps,
        "lr": lr,
        "optimizer": "sgd",
        "momentum": rho,
        "weight_decay": 0.0,
    }
    batches, c, c_i, client = scaffold_round_from_random_variates(work, seed=11)
    shapes = _params(tiny_unet())
    # by hand: heavy-ball SGD on g + c − cᵢ (buf ← ρ·buf + d, y ← y − η·buf), then option II
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    start = _params(model)
    buf: dict[str, torch.Tensor] = {}
    raw = {n: torch.zeros_like(t) for n, t in shapes.items()}
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                raw[n] += g
                d = g + c[n] - c_i[n]
                buf[n] = d.clone() if n not in buf else rho * buf[n] + d
                p.sub_(lr * buf[n])
    got = _params(client.model)
    new_c_i = client.state[scaffold_module.CLIENT_C]
    parted = 0.0
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
        option_two = c_i[n] - c[n] + (start[n] - p.detach()) / (steps * lr)
        torch.testing.assert_close(new_c_i[n], option_two, rtol=1e-4, atol=1e-5, msg=n)
        parted = max(parted, float((option_two - raw[n] / steps).abs().max()))
    assert parted > 1e-2  # the mean-gradient rule would land elsewhere


def test_scaffold_variate_rule_names_the_rule_for_each_optimizer():
    """The documented answer of ``variate_rule``: ``auto`` is option II under SGD (any momentum),
    the mean raw gradient under Adam; an explicit ``variate`` is taken as given."""
    sgd = make_client(tiny_unet(), optimizer="sgd", momentum=0.9)
    adam = make_client(tiny_unet())
    auto = get_method("scaffold")()
    assert (auto.variate_rule(sgd), auto.variate_rule(adam)) == ("option_ii", "mean_gradient")
    for rule in ("option_ii", "mean_gradient"):
        forced = get_method("scaffold")(variate=rule)
        assert forced.variate_rule(sgd) == forced.variate_rule(adam) == rule


# FedDyn ------------------------------------------------------------------------------------------


def test_feddyn_refuses_to_aggregate_without_a_started_server_by_name():
    with pytest.raises(
        RuntimeError,
        match=exactly("feddyn: aggregate before start_server (the server has no θ⁰)"),
    ):
        get_method("feddyn")().aggregate({}, 1)


def test_feddyn_term_is_the_linear_and_quadratic_penalty_over_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(5.0)
        model[0].bias.fill_(1.0)
        model[1].weight.fill_(2.0)
        model[1].bias.fill_(-1.0)
    model[0].weight.requires_grad_(False)  # frozen: no term, and the later ones still count
    grad = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    anchor = {n: torch.full_like(p, 1.0) for n, p in model.named_parameters()}
    alpha = 3.0
    term = feddyn_module.dynamic_term(grad, anchor, alpha)(model)
    # −⟨g, θ⟩ + α/2‖θ − θᵗ⁻¹‖² over 0.bias = 1, 1.weight = 2, 1.bias = −1 (0.weight skipped)
    linear = -(0.5 * 1 + 0.5 * 2 + 0.5 * -1)
    quadratic = 0.5 * alpha * ((1 - 1) ** 2 + (2 - 1) ** 2 + (-1 - 1) ** 2)
    assert float(term.detach()) == pytest.approx(linear + quadratic)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=exactly("feddyn: the model has no trainable parameters")):
        feddyn_module.dynamic_term(grad, anchor, alpha)(model)


def test_feddyn_local_step_at_alpha_one_keeps_both_terms_and_updates_the_gradient_state():
    """α = 1 is an ordinary α (only α = 0 is FedAvg): θ ← θ − η(∇L(θ) − gᵢ + α(θ − θᵗ⁻¹)), then
    gᵢ ← gᵢ − α(θ − θᵗ⁻¹), from a stored gᵢ."""
    alpha, lr = 1.0, 0.05
    work = {"epochs": None, "steps": 2, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    torch.manual_seed(5)
    g = {n: 0.2 * torch.randn_like(t) for n, t in _params(tiny_unet()).items()}
    client = make_client(tiny_unet(), state={feddyn_module.GRAD: dict(g)}, **work)
    get_method("feddyn")(alpha=alpha).local_update(client)
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    anchor = _params(model)
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for (n, p), gr in zip(params.items(), grads, strict=True):
                p.sub_(lr * (gr - g[n] + alpha * (p - anchor[n])))
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
        want = g[n] - alpha * (p.detach() - anchor[n])
        torch.testing.assert_close(
            client.state[feddyn_module.GRAD][n], want, rtol=1e-5, atol=1e-6, msg=n
        )


# FedNova -----------------------------------------------------------------------------------------


def test_fednova_refuses_a_missing_server_model_and_a_round_without_steps_by_name():
    with pytest.raises(
        RuntimeError,
        match=exactly("fednova: aggregate before start_server (the server has no x)"),
    ):
        get_method("fednova")().aggregate({}, 1)
    client = make_client(tiny_unet(), epochs=0)
    with pytest.raises(
        RuntimeError, match=exactly("fednova: client site0 took no local step this round")
    ):
        get_method("fednova")().local_update(client)
    one = make_client(tiny_unet(), epochs=None, steps=1)  # a single step is a round: ‖a‖ = 1
    m = get_method("fednova")()
    m.local_update(one)
    assert m.upload(one).extras[fednova_module.NORM] == 1.0


def test_fednova_counts_steps_only_under_adam_whatever_its_momentum_setting():
    """Momentum enters ‖aᵢ‖₁ for SGD only: Adam's β₁ is not heavy-ball momentum."""
    from pflbench.client import Budget

    m = get_method("fednova")()
    budget = Budget()
    adam = make_client(tiny_unet(), epochs=None, steps=3, momentum=0.9, budget=budget)
    m.local_update(adam)
    assert m.upload(adam).extras[fednova_module.NORM] == 3.0
    # the counted steps are the suite's local budget: 10 images in batches of 4 + 4 + 2
    assert budget.samples == {"local": 10}


# MOON --------------------------------------------------------------------------------------------


def test_moon_refuses_an_unknown_representation_by_name():
    from pflbench.methods.moon import captured_representation

    message = "moon: unknown representation 'pixels'; expected bottleneck or features"
    with pytest.raises(ValueError, match=exactly(message)):
        with captured_representation(tiny_unet(), "pixels"):
            pass


def test_moon_contrastive_loss_is_computed_where_its_inputs_live():
    """The labels of the two-logit cross-entropy are made on the representations' device (the
    meta device stands in for a GPU: a CPU tensor beside it is refused)."""
    from pflbench.methods.moon import contrastive_loss

    z = torch.rand(3, 4, device="meta")
    loss = contrastive_loss(
        z, torch.rand(3, 4, device="meta"), torch.rand(3, 4, device="meta"), 0.5
    )
    assert loss.device.type == "meta" and loss.shape == ()


def test_moon_names_itself_when_a_model_declares_no_encoder():
    from pflbench.methods.moon import representation_module
    from pflbench.partition import PartitionError

    with pytest.raises(PartitionError, match=r"^moon: model .* declares no 'encoder_path'; moon "):
        representation_module(nn.Sequential(nn.Linear(2, 2)))


class _ListEncoder(nn.Module):
    """An encoder that returns its feature maps as a list (as a timm ``features_only`` one),
    the last one a volume (N×C×D×H×W)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, self.scale * x.unsqueeze(2).repeat(1, 1, 3, 1, 1)]


class _ListModel(nn.Module):
    encoder_path = "encoder"

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ListEncoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].sum()


def test_moon_representation_of_a_list_returning_encoder_is_its_last_map_pooled():
    from pflbench.methods.moon import rep_of, representation_module

    model = _ListModel()
    assert representation_module(model) is model.encoder  # not a sequence: the module itself
    x = torch.rand(2, 3, 4, 5)
    # the last map is 2·x repeated over a depth of 3: its mean over D, H, W is 2·mean_HW(x)
    torch.testing.assert_close(rep_of(model, x), 2 * x.mean(dim=(2, 3)))


def _moon_step_by_hand(batches, lr, mu, temperature, previous, representation):
    """MOON's local loop from its definition: ℓ_sup + μ·ℓ_con with z from the model being trained
    and z_glob, z_prev from frozen copies (eval mode) of the received and the previous model;
    ℓ_con = −log(e^{cos(z, z_glob)/τ} / (e^{cos(z, z_glob)/τ} + e^{cos(z, z_prev)/τ}))."""
    model = tiny_unet().train()
    glob = tiny_unet().eval()
    previous.eval()
    params = dict(model.named_parameters())

    def features_of(net, x):
        if representation == "features":  # the head's input, flattened
            return None, net.feature_forward(x).flatten(1)
        maps = []
        h = x
        for stage in net.encoder:
            h = stage(h)
            maps.append(h)
        return maps, maps[-1].mean(dim=(2, 3))

    for x, y in batches:
        with torch.no_grad():
            zg, zp = features_of(glob, x)[1], features_of(previous, x)[1]
        if representation == "features":
            feats = model.feature_forward(x)
            logits, z = model.head(feats), feats.flatten(1)
        else:
            logits = model(x)
            z = features_of(model, x)[1]
        pos = torch.nn.functional.cosine_similarity(z, zg, dim=-1) / temperature
        neg = torch.nn.functional.cosine_similarity(z, zp, dim=-1) / temperature
        con = -torch.log_softmax(torch.stack([pos, neg], dim=1), dim=1)[:, 0].mean()
        loss = segmentation_loss(logits, y) + mu * con
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(lr * g)
    return _params(model)


@pytest.mark.parametrize("representation", ["features", "bottleneck"])
def test_moon_local_steps_follow_the_contrastive_rule_with_a_set_temperature(representation):
    from pflbench.client import Budget
    from pflbench.methods.moon import PREVIOUS

    mu, lr, temperature = 2.0, 0.05, 0.2
    work = {"epochs": None, "steps": 2, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    previous = tiny_unet(5)
    budget = Budget()
    client = make_client(
        tiny_unet(),
        state={PREVIOUS: {k: v.clone() for k, v in previous.state_dict().items()}},
        budget=budget,
        **work,
    )
    method = get_method("moon")(mu=mu, temperature=temperature, representation=representation)
    method.local_update(client)
    expected = _moon_step_by_hand(batches, lr, mu, temperature, previous, representation)
    got = _params(client.model)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6, msg=n)
    # two frozen forward passes per training image, under ``moon``
    images = sum(len(x) for x, _ in batches)
    assert budget.samples == {"local": images, "moon": 2 * images}


def test_moon_with_mu_zero_ignores_a_previous_model_and_counts_no_extra_pass():
    from pflbench.client import Budget
    from pflbench.methods.moon import PREVIOUS

    lr = 0.05
    work = {"epochs": None, "steps": 2, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    budget = Budget()
    client = make_client(
        tiny_unet(),
        state={PREVIOUS: {k: v.clone() for k, v in tiny_unet(5).state_dict().items()}},
        budget=budget,
        **work,
    )
    get_method("moon")(mu=0.0).local_update(client)
    model = tiny_unet().train()  # plain SGD on ℓ_sup
    params = dict(model.named_parameters())
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(lr * g)
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    assert budget.samples == {"local": sum(len(x) for x, _ in batches)}
    # the state now holds this round's end point, the next round's negative
    assert all(
        torch.equal(client.state[PREVIOUS][k], v) for k, v in client.model.state_dict().items()
    )


# FedLWS ------------------------------------------------------------------------------------------


def test_fedlws_refuses_crossed_tau_bounds_and_an_unstarted_server_by_name():
    from pflbench.params import ParamError

    message = "method fedlws: min_tau (0.5) must not exceed max_tau (0.1)"
    with pytest.raises(ParamError, match=exactly(message)):
        get_method("fedlws")(min_tau=0.5, max_tau=0.1)
    fixed = get_method("fedlws")(min_tau=0.1, max_tau=0.1)  # equal bounds: a fixed τ
    assert (fixed.min_tau, fixed.max_tau) == (0.1, 0.1)
    with pytest.raises(
        RuntimeError, match=exactly("fedlws: aggregate before start_server (the server has no w)")
    ):
        get_method("fedlws")().aggregate({}, 1)


def test_fedlws_clips_tau_from_above_and_shrinks_from_the_last_shrunk_model():
    import math

    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(4.0)  # w = [3, 4], ‖w‖ = 5
    m = get_method("fedlws")(beta=10.0)  # β·spread far above τ_max = 0.2
    m.start_server(model, ["a", "b"])

    def up(w: float, b: float, weight: float) -> Upload:
        return Upload(
            entries={"weight": torch.tensor([[w]]), "bias": torch.tensor([b])}, weight=weight
        )

    # round 1: w̄ = [3, 5], ‖w̄ − w‖ = 1, τ = clip(10·√2) = 0.2: γ = 5 / (5 + 0.2)
    msg = m.aggregate({"a": up(4.0, 4.0, 1.0), "b": up(2.0, 6.0, 1.0)}, 1)
    g1 = 5 / 5.2
    assert m.last_gammas == [pytest.approx(g1)]
    w1 = [3.0 * g1, 5.0 * g1]
    torch.testing.assert_close(msg.entries["weight"], torch.tensor([[w1[0]]]))
    # round 2 measures from w1 (the shrunk model), with weights 1 and 3: w̄ = [2.5, 2.5]; Δ̄ is
    # the plain mean of Δ_a = [1, 1] − w1 and Δ_b = [3, 3] − w1, so the spread is √2 again
    msg = m.aggregate({"a": up(1.0, 1.0, 1.0), "b": up(3.0, 3.0, 3.0)}, 2)
    norm = math.hypot(*w1)
    g2 = norm / (norm + 0.2 * math.hypot(2.5 - w1[0], 2.5 - w1[1]))
    assert m.last_gammas == [pytest.approx(g2)]
    torch.testing.assert_close(msg.entries["bias"], torch.tensor([2.5 * g2]))


def test_fedlws_spread_is_the_mean_distance_of_each_update_from_the_mean_update():
    """τ = clip(β · mean_i ‖Δᵢ − Δ̄‖₂), Δ̄ the per-coordinate mean of the Δᵢ = wᵢ − w, on three
    clients whose mean update is not the same in every coordinate."""
    import math

    from pflbench.methods.fedlws import shrinking_factor

    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    clients = [torch.tensor(c, dtype=torch.float64) for c in ([2.0, 1.0], [1.0, 3.0], [1.0, 1.0])]
    average = torch.tensor([4 / 3, 2.0], dtype=torch.float64)
    # Δ = [1, 0], [0, 2], [0, 0]; Δ̄ = [1/3, 2/3]
    spread = (
        math.hypot(2 / 3, -2 / 3) + math.hypot(-1 / 3, 4 / 3) + math.hypot(-1 / 3, -2 / 3)
    ) / 3
    tau = 0.1 * spread  # inside [0.01, 0.2]
    want = math.sqrt(2) / (math.sqrt(2) + tau * math.hypot(1 / 3, 1.0))
    assert shrinking_factor(w, average, clients, 0.1, (0.01, 0.2)) == pytest.approx(want)


def test_fedlws_shrinking_factor_is_one_for_a_zero_layer_that_stays_zero():
    from pflbench.methods.fedlws import shrinking_factor

    zero = torch.zeros(3, dtype=torch.float64)
    assert shrinking_factor(zero, zero, [zero, zero], 0.1, (0.01, 0.2)) == 1.0
    # a layer at the origin that moves is shrunk to nothing: ‖w‖ = 0 in the numerator
    moved = torch.ones(3, dtype=torch.float64)
    assert shrinking_factor(zero, moved, [moved, moved], 0.1, (0.01, 0.2)) == 0.0
    # a denominator of exactly 1 is an ordinary one: ‖w‖ = 0.5, τ = 0.25, ‖w̄ − w‖ = 2
    w = torch.tensor([0.5, 0.0], dtype=torch.float64)
    average = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert shrinking_factor(w, average, [average, average], 0.1, (0.25, 0.25)) == 0.5


# FedAWA ------------------------------------------------------------------------------------------


def _awa_loss_by_hand(t, w, clients, distance):
    """The official ``fedawa`` objective written out: p = softmax(T); reg = Σ pᵢ d(w, wᵢ);
    sim = Σ pᵢ ‖Δᵢ − Σⱼ pⱼΔⱼ‖₂ with Δᵢ = wᵢ − w."""
    p = torch.exp(t) / torch.exp(t).sum()
    deltas = [c - w for c in clients]
    mean = sum(p[i] * deltas[i] for i in range(len(clients)))
    sim = sum(p[i] * torch.sqrt(((deltas[i] - mean) ** 2).sum()) for i in range(len(clients)))
    if distance == "cos":
        costs = [1 - (w * c).sum() / (w.norm() * c.norm()) for c in clients]
    else:
        costs = [((c - w) ** 2).mean() for c in clients]
    return sim + sum(p[i] * costs[i] for i in range(len(clients))), p


@pytest.mark.parametrize("distance", ["cos", "euc"])
def test_fedawa_loss_is_sim_plus_reg_for_either_distance(distance):
    from pflbench.methods.fedawa import awa_loss

    w = torch.tensor([1.0, 0.0, 2.0])
    clients = torch.tensor([[1.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.0, -1.0, 3.0]])
    t = torch.tensor([0.2, 0.5, 0.3])
    for scale in (1.0, 0.1):  # 0.1: norms below 1, where a wrong eps in the cosine would show
        loss, p = awa_loss(t, scale * w, scale * clients, distance)
        want, want_p = _awa_loss_by_hand(t, scale * w, list(scale * clients), distance)
        torch.testing.assert_close(p, want_p)
        torch.testing.assert_close(loss, want)
    message = "fedawa: unknown reg_distance 'l1'; expected cos or euc"
    with pytest.raises(ValueError, match=exactly(message)):
        awa_loss(t, w, clients, "l1")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_fedawa_round_with_two_server_steps_and_a_gamma_by_hand(gamma):
    """Two Adam steps (lr η, betas (0.5, 0.999), written out) on the logits T, starting from
    T = w/Σw; the aggregate uses p = softmax(T) of the *last* step, before its update, times γ."""
    lr = 0.01
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(0.0)
    m = get_method("fedawa")(server_lr=lr, server_epochs=2, gamma=gamma, reg_distance="euc")
    m.start_server(model, ["a", "b"])
    names = ["0.weight", "1.weight", "1.bias"]

    def up(v, bn, stat, weight):
        entries = {
            "0.weight": torch.tensor([v]),
            "1.weight": torch.tensor([bn]),
            "1.bias": torch.tensor([0.0]),
            "1.running_mean": torch.tensor([stat]),
            "1.running_var": torch.tensor([1.0]),
        }
        return Upload(entries=entries, weight=weight)

    uploads = {"a": up([1.0, 1.0], 2.0, 2.0, 1.0), "b": up([3.0, 0.0], 1.0, 4.0, 3.0)}
    msg = m.aggregate(uploads, 1)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])  # flattened parameters, in named order
    clients = [torch.cat([uploads[c].entries[n].reshape(-1).float() for n in names]) for c in "ab"]
    t = torch.tensor([0.25, 0.75], dtype=torch.float32)
    m1, v1 = torch.zeros(2), torch.zeros(2)
    for k in (1, 2):
        tt = t.clone().requires_grad_(True)
        loss, p = _awa_loss_by_hand(tt, w, clients, "euc")
        (g,) = torch.autograd.grad(loss, [tt])
        m1 = 0.5 * m1 + 0.5 * g
        v1 = 0.999 * v1 + 0.001 * g * g
        step = lr * (m1 / (1 - 0.5**k)) / ((v1 / (1 - 0.999**k)).sqrt() + 1e-8)
        t = t - step
        p_used = p.detach()
    assert [m.logits["a"], m.logits["b"]] == pytest.approx(t.tolist(), abs=1e-6)
    assert [m.last_weights["a"], m.last_weights["b"]] == pytest.approx(p_used.tolist(), abs=1e-6)
    pa, pb = (float(x) for x in p_used)
    want = gamma * (pa * torch.tensor([[1.0, 1.0]]) + pb * torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(msg.entries["0.weight"], want)
    torch.testing.assert_close(msg.entries["1.weight"], torch.tensor([gamma * (2 * pa + pb)]))
    # BN running statistics: averaged with the same p, never scaled by γ
    torch.testing.assert_close(msg.entries["1.running_mean"], torch.tensor([2 * pa + 4 * pb]))
    # the next round measures from the γ-scaled global model
    assert torch.equal(m.previous["0.weight"], msg.entries["0.weight"])


def test_fedawa_refuses_an_unstarted_server_by_name():
    with pytest.raises(
        RuntimeError, match=exactly("fedawa: aggregate before start_server (the server has no w)")
    ):
        get_method("fedawa")().aggregate({}, 1)


# FedRDN ------------------------------------------------------------------------------------------


def test_fedrdn_statistics_are_per_image_channel_moments_averaged_over_images():
    from pflbench.methods.fedrdn import channel_statistics

    # two images, two channels, four pixels each: per image and channel mean and unbiased std
    images = torch.tensor(
        [
            [[[0.0, 2.0], [4.0, 6.0]], [[1.0, 1.0], [1.0, 3.0]]],
            [[[2.0, 2.0], [2.0, 6.0]], [[0.0, 0.0], [4.0, 4.0]]],
        ]
    )
    stats = channel_statistics(images, "s")

    def std(values):  # unbiased, n − 1
        m = sum(values) / len(values)
        return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    mean = [(3.0 + 3.0) / 2, (1.5 + 2.0) / 2]
    stds = [
        (std([0, 2, 4, 6]) + std([2, 2, 2, 6])) / 2,
        (std([1, 1, 1, 3]) + std([0, 0, 4, 4])) / 2,
    ]
    torch.testing.assert_close(stats["mean"], torch.tensor(mean))
    torch.testing.assert_close(stats["std"], torch.tensor(stds))
    assert stats["mean"].dtype == stats["std"].dtype == torch.float32
    one = channel_statistics(images[:1], "one")  # a single image is enough
    torch.testing.assert_close(one["mean"], torch.tensor([3.0, 1.5]))
    message = "fedrdn: site 'none' has no training images to take statistics of"
    with pytest.raises(ValueError, match=exactly(message)):
        channel_statistics(images[:0], "none")
    message = (
        "fedrdn: site 'flat' has a channel whose images are all constant (std 0); "
        "its inputs cannot be normalized"
    )
    flat = images.clone()
    flat[:, 1] = 5.0  # channel 1 constant, channel 0 not: one constant channel is refused
    with pytest.raises(ValueError, match=exactly(message)):
        channel_statistics(flat, "flat")


def test_fedrdn_setup_names_its_client_and_local_training_is_the_suites_budget():
    import dataclasses

    from pflbench.client import Budget

    m = get_method("fedrdn")()
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget, epochs=2)
    own = m.setup(client)
    m.receive_setup(client, m.setup_server({client.id: own})[client.id])
    m.local_update(client)
    assert budget.samples == {"local": 2 * len(client.train_data.images)}
    flat = make_client(tiny_unet(), site=1)
    flat._train = dataclasses.replace(
        flat.train_data, images=torch.full_like(flat.train_data.images, 0.5)
    )
    with pytest.raises(ValueError, match="^fedrdn: site 'site1' has a channel"):
        m.setup(flat)
    # a newcomer's statistics are taken first, from its own images: the same refusal by name
    with pytest.raises(ValueError, match="^fedrdn: site 'site1' has a channel"):
        m.newcomer_model(None, flat)


def test_fedrdn_normalizes_each_channel_of_images_and_volumes():
    from pflbench.methods.fedrdn import Normalized, normalize

    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 4.0])
    for shape in [(3, 2, 4, 5), (3, 2, 2, 4, 5)]:
        x = torch.rand(shape)
        want = torch.stack([(x[:, 0] - 1.0) / 2.0, (x[:, 1] + 2.0) / 4.0], dim=1)
        torch.testing.assert_close(normalize(x, mean, std), want)
    net = Normalized(nn.Identity(), mean, std)
    x = torch.rand(3, 2, 4, 5)
    torch.testing.assert_close(net(x), normalize(x, mean, std))
    mean.add_(1.0)  # the wrapper keeps its own copy
    torch.testing.assert_close(net.mean, torch.tensor([1.0, -2.0]))


def test_fedrdn_bank_goes_to_every_client_and_each_batch_draws_mean_and_std_apart():
    from pflbench.methods.fedrdn import BANK, OWN, normalize

    stats = {
        f"site{k}": {"mean": torch.tensor([0.1 * k]), "std": torch.tensor([0.2 + 0.1 * k])}
        for k in range(3)
    }
    m = get_method("fedrdn")()
    messages = m.setup_server({c: stats[c] for c in ["site2", "site0", "site1"]})
    assert set(messages) == {"site0", "site1", "site2"}
    for msg in messages.values():
        assert list(msg) == ["site0", "site1", "site2"]
        assert all(torch.equal(msg[c]["mean"], stats[c]["mean"]) for c in stats)
    client = make_client(tiny_unet(), epochs=None, steps=6, lr=0.05, **SGD)
    m.receive_setup(client, messages["site0"])
    assert list(client.state[BANK]) == ["site0", "site1", "site2"]
    with pytest.raises(
        RuntimeError,
        match=exactly("fedrdn: client site1 has no statistics bank (setup not run)"),
    ):
        m.local_update(make_client(tiny_unet(), site=1, state={OWN: stats["site1"]}))
    # by hand: the batch stream's order is drawn first, then one "fedrdn" generator; per batch
    # i then j, each uniform over the three clients, so means and stds are mixed across clients
    twin = make_client(tiny_unet(), epochs=None, steps=6, lr=0.05, **SGD)
    batches = list(twin.batches())  # the twin's first generator call: the data order
    g = twin.generator("fedrdn")
    draws = [
        (int(torch.randint(3, (1,), generator=g)), int(torch.randint(3, (1,), generator=g)))
        for _ in batches
    ]
    assert any(i != j for i, j in draws)  # the seed mixes at least once
    m.local_update(client)
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    for (x, y), (i, j) in zip(batches, draws, strict=True):
        xn = normalize(x, stats[f"site{i}"]["mean"], stats[f"site{j}"]["std"])
        grads = torch.autograd.grad(segmentation_loss(model(xn), y), list(params.values()))
        with torch.no_grad():
            for p, gr in zip(params.values(), grads, strict=True):
                p.sub_(0.05 * gr)
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)


# the shared helpers (_generic) and where a divergence is named -----------------------------------


def _nan_head_unet() -> nn.Module:
    """A tiny U-Net whose head bias is NaN: its first loss is not finite."""
    bad = tiny_unet()
    with torch.no_grad():
        bad.head.bias.fill_(float("nan"))
    return bad


@pytest.mark.parametrize("method", ["scaffold", "fednova", "moon"])
def test_a_diverged_local_step_names_the_client_and_round(method):
    from pflbench.methods.moon import PREVIOUS
    from pflbench.training import Diverged

    state = {PREVIOUS: {k: v.clone() for k, v in tiny_unet().state_dict().items()}}
    client = make_client(_nan_head_unet(), round=3, state=state if method == "moon" else None)
    message = r"^non-finite loss \(nan\) in client site0 round 3 \(local\)$"
    with pytest.raises(Diverged, match=message):
        get_method(method)().local_update(client)


def test_fit_counting_steps_trains_on_the_suites_loss_plus_the_extra_term():
    """SGD on the client's loss (its ``loss_smoothing``, here not the default 1) plus the extra
    loss, written out; the return value is the number of optimizer steps."""
    from pflbench.methods._generic import fit_counting_steps

    lr, smooth = 0.05, 1e-3
    work = {"epochs": None, "steps": 2, "lr": lr, "loss_smoothing": smooth, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    client = make_client(tiny_unet(), **work)

    def extra(model: nn.Module) -> torch.Tensor:
        return 0.5 * model.head.weight.pow(2).sum()  # gradient: head.weight itself

    assert fit_counting_steps(client, extra_loss=extra) == 2
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    for x, y in batches:
        loss = segmentation_loss(model(x), y, smooth) + extra(model)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(lr * g)
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_gradient_offsets_shift_trainable_gradients_sum_raw_ones_and_leave_no_hook():
    from pflbench.methods._generic import gradient_offsets

    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    model.bias.requires_grad_(False)
    x = torch.tensor([[3.0, -1.0]])
    offsets = {"weight": torch.tensor([[10.0, 20.0]]), "bias": torch.tensor([7.0])}
    raw = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    with gradient_offsets(model, offsets, raw_sum=raw):
        for _ in range(2):  # d(w·x + b)/dw = x on each of two backward passes
            model(x).sum().backward()
    assert torch.equal(model.weight.grad, 2 * (x + offsets["weight"]))
    assert torch.equal(raw["weight"], 2 * x)
    assert model.bias.grad is None and torch.equal(raw["bias"], torch.zeros(1))
    model.weight.grad = None
    with gradient_offsets(model, {"weight": offsets["weight"]}):  # no raw_sum: offsets only
        model(x).sum().backward()
    assert torch.equal(model.weight.grad, x + offsets["weight"])
    model.weight.grad = None
    model(x).sum().backward()  # the hooks are gone
    assert torch.equal(model.weight.grad, x)


def test_generic_state_helpers_take_parameters_or_floating_entries_as_copies():
    from pflbench.methods._generic import floating_state, parameter_values, zeros_like_parameters

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    values = parameter_values(model)
    assert list(values) == ["0.weight", "0.bias", "1.weight", "1.bias"]  # no buffers
    values["0.bias"].add_(1.0)
    assert not torch.equal(values["0.bias"], model[0].bias)  # a copy
    assert values["0.bias"].requires_grad is False
    zeros = zeros_like_parameters(model)
    assert list(zeros) == list(values)
    assert all(not z.any() and z.shape == values[n].shape for n, z in zeros.items())
    state = floating_state(model)
    assert list(state) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    ]  # num_batches_tracked (int64) left out
    state["1.running_var"].add_(1.0)
    assert torch.equal(model[1].running_var, torch.ones(2))
