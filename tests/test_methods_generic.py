"""Generic-FL baselines (issue 17): SCAFFOLD, FedDyn, FedNova, MOON.

Each method gets a defining-property test that a near-miss would fail (FedAvg equality where the
extra machinery is switched off, with a check that switching it on changes the computation) and
a hand-computed example of the step that makes it different.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from method_helpers import capturing, make_client, run, state_of, tiny_federation, tiny_unet
from torch import nn

from pflbench.messages import Upload
from pflbench.methods import scaffold as scaffold_module
from pflbench.registry import get_method
from pflbench.training import segmentation_loss

SGD = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _assert_same_models(x: dict, y: dict) -> None:
    assert set(x) == set(y)
    for cid in x:
        for k, v in x[cid].items():
            assert torch.equal(v, y[cid][k]), (cid, k)


def _assert_same_results(a, b) -> None:
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.cases, b.cases)


def _uploads_by_round(out) -> pd.DataFrame:
    return out.comm[out.comm["round"] > 0].groupby("round")[["bytes_up", "bytes_down"]].sum()


# SCAFFOLD ----------------------------------------------------------------------------------------


def test_scaffold_first_round_with_zero_variates_is_bitwise_fedavg():
    data = tiny_federation(sizes=[6, 10, 14])
    sc, avg = capturing(get_method("scaffold")), capturing(get_method("fedavg"))
    _, a = run(data, sc(), rounds=1)
    _, b = run(data, avg(), rounds=1)
    assert a.rounds["value"].gt(0).any()
    _assert_same_results(a, b)
    _assert_same_models(sc.models, avg.models)
    # after one round the variates are not zero, and round 2 really differs from FedAvg
    assert any(
        bool(v.abs().sum() > 0) for v in sc.states["site0"][scaffold_module.SERVER_C].values()
    )
    sc2, avg2 = capturing(get_method("scaffold")), capturing(get_method("fedavg"))
    run(data, sc2(), rounds=2)
    run(data, avg2(), rounds=2)
    assert not torch.equal(sc2.models["site0"]["head.weight"], avg2.models["site0"]["head.weight"])


def scaffold_round_from_random_variates(work: dict, seed: int):
    """One SCAFFOLD local round of a fresh client that holds random server and client variates
    (c, cᵢ), with the suite's ``work``: (its batches, c, cᵢ, the client after the round)."""
    batches = list(make_client(tiny_unet(), **work).batches())
    shapes = _params(tiny_unet())
    torch.manual_seed(seed)
    c = {n: 0.1 * torch.randn_like(t) for n, t in shapes.items()}
    c_i = {n: 0.1 * torch.randn_like(t) for n, t in shapes.items()}
    client = make_client(
        tiny_unet(),
        state={scaffold_module.SERVER_C: dict(c), scaffold_module.CLIENT_C: dict(c_i)},
        **work,
    )
    get_method("scaffold")().local_update(client)
    return batches, c, c_i, client


def _corrected_sgd_by_hand(batches, lr, offset):
    """SCAFFOLD's local solver from its definition: y ← y − η(g(y) + c − cᵢ); returns the end
    point and the raw gradients g(y_k) along the way."""
    model = tiny_unet()
    model.train()
    params = dict(model.named_parameters())
    grads_seen = []
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        grads_seen.append({n: g.detach().clone() for n, g in zip(params, grads, strict=True)})
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads, strict=True):
                p.sub_(lr * (g + offset[n]))
    return _params(model), grads_seen


def test_scaffold_local_step_and_option_two_variate_on_a_hand_computed_example():
    lr, steps = 0.05, 3
    work = {"epochs": None, "steps": steps, "lr": lr, **SGD}
    batches, c, c_i, client = scaffold_round_from_random_variates(work, seed=7)
    offset = {n: c[n] - c_i[n] for n in c}
    end, grads = _corrected_sgd_by_hand(batches, lr, offset)
    got = _params(client.model)
    for n in end:
        torch.testing.assert_close(got[n], end[n], rtol=1e-5, atol=1e-6, msg=n)
    # option II: cᵢ⁺ = cᵢ − c + (x − y)/(Kη); with SGD that is the mean raw gradient on the path
    new_c_i = client.state[scaffold_module.CLIENT_C]
    delta = client.state[scaffold_module.DELTA_C]
    for n in new_c_i:
        mean_grad = sum(g[n] for g in grads) / steps
        torch.testing.assert_close(new_c_i[n], mean_grad, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(delta[n], new_c_i[n] - c_i[n], rtol=0, atol=1e-7, msg=n)
    # a near miss (option I's sign, or no correction) lands elsewhere
    plain, _ = _corrected_sgd_by_hand(batches, lr, {n: torch.zeros_like(t) for n, t in c.items()})
    assert max(float((plain[n] - got[n]).abs().max()) for n in got) > 1e-3


def _scaffold_client(work, c, c_i):
    return make_client(
        tiny_unet(),
        state={scaffold_module.SERVER_C: dict(c), scaffold_module.CLIENT_C: dict(c_i)},
        **work,
    )


def test_scaffold_under_adam_uses_the_mean_raw_gradient_which_is_option_two_under_sgd():
    lr, steps = 0.01, 3
    shapes = _params(tiny_unet())
    torch.manual_seed(7)
    c = {n: 0.01 * torch.randn_like(t) for n, t in shapes.items()}
    c_i = {n: 0.01 * torch.randn_like(t) for n, t in shapes.items()}
    # under SGD the two rules are one: option II's (x − y)/(Kη) − c + cᵢ is the mean raw gradient
    sgd = {"epochs": None, "steps": steps, "lr": 0.05, **SGD}
    a, b = _scaffold_client(sgd, c, c_i), _scaffold_client(sgd, c, c_i)
    get_method("scaffold")(variate="option_ii").local_update(a)
    get_method("scaffold")(variate="mean_gradient").local_update(b)
    for n in shapes:
        torch.testing.assert_close(
            a.state[scaffold_module.CLIENT_C][n],
            b.state[scaffold_module.CLIENT_C][n],
            rtol=1e-3,
            atol=1e-5,
        )
    # under Adam (auto): Adam steps on g + c − cᵢ, and cᵢ⁺ = the mean of the raw g, by hand
    adam = {"epochs": None, "steps": steps, "lr": lr}
    batches = list(make_client(tiny_unet(), **adam).batches())
    client = _scaffold_client(adam, c, c_i)
    get_method("scaffold")().local_update(client)
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=lr)
    raw = {n: torch.zeros_like(t) for n, t in shapes.items()}
    for x, y in batches:
        opt.zero_grad()
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        for (n, p), g in zip(params.items(), grads, strict=True):
            raw[n] += g
            p.grad = g + c[n] - c_i[n]
        opt.step()
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
        expected = raw[n] / steps
        torch.testing.assert_close(client.state[scaffold_module.CLIENT_C][n], expected)
    # literal option II under Adam is another quantity: about one per coordinate, not a gradient
    literal = _scaffold_client(adam, c, c_i)
    get_method("scaffold")(variate="option_ii").local_update(literal)
    big = literal.state[scaffold_module.CLIENT_C]["encoder.0.conv1.weight"].abs().mean()
    small = client.state[scaffold_module.CLIENT_C]["encoder.0.conv1.weight"].abs().mean()
    assert big > 10 * small


def test_scaffold_server_variate_is_the_sum_of_updates_over_all_clients():
    model = nn.Linear(2, 1)
    m = get_method("scaffold")()
    m.start_server(model, ["a", "b", "c", "d"])  # N = 4, two of them upload
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def up(value: float, dc: float, weight: float) -> Upload:
        entries = {k: torch.full_like(v, value) for k, v in state.items()}
        delta = {k: torch.full_like(v, dc) for k, v in state.items()}
        return Upload(entries=entries, weight=weight, extras={scaffold_module.DELTA_C: delta})

    msg = m.aggregate({"a": up(1.0, 1.0, 1.0), "b": up(4.0, 3.0, 3.0)}, 1)
    # x: the weighted average (1·1 + 3·4)/4 = 3.25; c: 0 + (1 + 3)/4 = 1
    assert torch.equal(msg.entries["weight"], torch.full((1, 2), 3.25))
    assert torch.equal(msg.extras["c"]["bias"], torch.full((1,), 1.0))
    msg = m.aggregate({"c": up(0.0, 2.0, 1.0)}, 2)  # c ← 1 + 2/4
    assert torch.equal(msg.extras["c"]["weight"], torch.full((1, 2), 1.5))


# FedDyn ------------------------------------------------------------------------------------------


def test_feddyn_with_alpha_zero_is_bitwise_fedavg():
    data = tiny_federation(sizes=[6, 10, 14])
    dyn, avg = capturing(get_method("feddyn")), capturing(get_method("fedavg"))
    _, a = run(data, dyn(alpha=0.0), rounds=2)
    _, b = run(data, avg(), rounds=2)
    assert a.rounds["value"].gt(0).any()
    _assert_same_results(a, b)
    pd.testing.assert_frame_equal(a.comm, b.comm)
    _assert_same_models(dyn.models, avg.models)
    dyn2 = capturing(get_method("feddyn"))
    run(data, dyn2(alpha=0.5), rounds=2)
    assert not torch.equal(dyn2.models["site0"]["head.weight"], avg.models["site0"]["head.weight"])


def test_feddyn_local_step_and_gradient_state_on_a_hand_computed_example():
    from pflbench.methods.feddyn import GRAD

    alpha, lr = 2.0, 0.05
    work = {"epochs": None, "steps": 3, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    torch.manual_seed(3)
    g = {n: 0.1 * torch.randn_like(t) for n, t in _params(tiny_unet()).items()}
    client = make_client(tiny_unet(), state={GRAD: dict(g)}, **work)
    get_method("feddyn")(alpha=alpha).local_update(client)
    # by hand: θ ← θ − η(∇L(θ) − gᵢ + α(θ − θᵗ⁻¹)); then gᵢ ← gᵢ − α(θ − θᵗ⁻¹)
    model = tiny_unet().train()
    params = dict(model.named_parameters())
    anchor = _params(model)
    for x, y in batches:
        grads = torch.autograd.grad(segmentation_loss(model(x), y), list(params.values()))
        with torch.no_grad():
            for (n, p), gr in zip(params.items(), grads, strict=True):
                p.sub_(lr * (gr - g[n] + alpha * (p - anchor[n])))
    got = _params(client.model)
    for n in params:
        torch.testing.assert_close(got[n], params[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
        expected_g = g[n] - alpha * (params[n].detach() - anchor[n])
        torch.testing.assert_close(client.state[GRAD][n], expected_g, rtol=1e-5, atol=1e-6)


def test_feddyn_server_correction_on_a_hand_computed_example():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    m = get_method("feddyn")(alpha=0.5)
    m.start_server(model, ["a", "b", "c", "d"])  # θ⁰ = 0, N = 4

    def up(value: float) -> Upload:
        return Upload(
            entries={k: torch.full_like(v, value) for k, v in model.state_dict().items()},
            weight=1.0,
        )

    # round 1: avg = 2, h = −α/N·(1 + 3) = −0.5, θ¹ = 2 − h/α = 3 (official: avg + mean drift
    # over all 4 clients = 2 + (1 + 3)/4 = 3)
    msg = m.aggregate({"a": up(1.0), "b": up(3.0)}, 1)
    assert torch.allclose(msg.entries["weight"], torch.full((1, 2), 3.0))
    # round 2: drift 5 − 3 = 2, h = −0.5 − 0.5/4·2 = −0.75, θ² = 5 + 1.5 = 6.5 (official:
    # 5 + (1 + 3 + 2)/4)
    msg = m.aggregate({"c": up(5.0)}, 2)
    assert torch.allclose(msg.entries["bias"], torch.full((1,), 6.5))


# FedNova -----------------------------------------------------------------------------------------


def test_fednova_with_equal_local_step_counts_is_bitwise_fedavg():
    data = tiny_federation(sizes=[6, 10, 14])  # unequal weights, equal steps
    nova, avg = capturing(get_method("fednova")), capturing(get_method("fedavg"))
    _, a = run(data, nova(), rounds=2, local_epochs=None, local_steps=3)
    _, b = run(data, avg(), rounds=2, local_epochs=None, local_steps=3)
    assert a.rounds["value"].gt(0).any()
    _assert_same_results(a, b)
    _assert_same_models(nova.models, avg.models)
    # with epochs the larger sites take more steps, and the average is no longer FedAvg's
    nova2, avg2 = capturing(get_method("fednova")), capturing(get_method("fedavg"))
    run(data, nova2(), rounds=1, local_epochs=1)
    run(data, avg2(), rounds=1, local_epochs=1)
    assert not torch.equal(
        nova2.models["site0"]["head.weight"], avg2.models["site0"]["head.weight"]
    )


def test_fednova_server_step_on_a_hand_computed_example():
    from pflbench.methods.fednova import NORM

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    m = get_method("fednova")()
    m.start_server(model, ["a", "b"])  # x = 0
    floating = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    def up(value: float, weight: float, norm: float) -> Upload:
        entries = {k: torch.full_like(v, value) for k, v in floating.items()}
        return Upload(entries=entries, weight=weight, extras={NORM: norm})

    msg = m.aggregate({"a": up(1.0, 1.0, 2.0), "b": up(4.0, 3.0, 6.0)}, 1)
    # τ_eff = (1·2 + 3·6)/4 = 5; x⁺ = 0 + 5·(¼·1/2 + ¾·4/6) = 3.125 (FedAvg: 3.25)
    assert torch.allclose(msg.entries["0.weight"], torch.full((2, 2), 3.125))
    assert torch.allclose(msg.entries["1.bias"], torch.full((2,), 3.125))
    # BN running statistics have no steps: averaged as FedAvg
    assert torch.allclose(msg.entries["1.running_mean"], torch.full((2,), 3.25))
    # round 2 starts from the x just sent: one client, ‖a‖ = 4, y = 5: x⁺ = 3.125 + 4·(5 − 3.125)/4
    msg = m.aggregate({"a": up(5.0, 1.0, 4.0)}, 2)
    assert torch.allclose(msg.entries["0.bias"], torch.full((2,), 5.0))


def test_fednova_normalizer_counts_steps_and_momentum():
    from pflbench.methods.fednova import NORM, normalizing_norm

    rho, tau = 0.9, 3
    closed = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)  # the paper's ‖a‖₁
    assert normalizing_norm(tau, rho) == pytest.approx(closed) == pytest.approx(5.61)
    assert normalizing_norm(tau, 0.0) == 3.0
    m = get_method("fednova")()
    sgd = make_client(tiny_unet(), epochs=None, steps=3, optimizer="sgd", momentum=rho)
    m.local_update(sgd)
    assert m.upload(sgd).extras[NORM] == pytest.approx(5.61)
    adam = make_client(tiny_unet(), epochs=2)  # 10 images, batches 4 + 4 + 2: 3 steps an epoch
    m.local_update(adam)
    assert m.upload(adam).extras[NORM] == 6.0


# MOON --------------------------------------------------------------------------------------------


def test_moon_with_mu_zero_is_bitwise_fedavg():
    data = tiny_federation(sizes=[6, 10, 14])
    moon, avg = capturing(get_method("moon")), capturing(get_method("fedavg"))
    _, a = run(data, moon(mu=0.0), rounds=3)
    _, b = run(data, avg(), rounds=3)
    assert a.rounds["value"].gt(0).any()
    _assert_same_results(a, b)
    pd.testing.assert_frame_equal(a.comm, b.comm)
    _assert_same_models(moon.models, avg.models)
    # μ > 0: round 1 has no negative yet (ℓ_con = 0), from round 2 the term changes the run
    moon2 = capturing(get_method("moon"))
    _, c = run(data, moon2(mu=1.0), rounds=3)
    assert not torch.equal(moon2.models["site0"]["head.weight"], avg.models["site0"]["head.weight"])
    assert c.info["budget"]["moon"] == 2 * 2 * c.info["budget"]["local"] // 3  # rounds 2, 3


def test_moon_representation_is_the_pooled_bottleneck():
    from pflbench.methods.moon import rep_of, representation_module

    model = tiny_unet()  # depth 2: encoder.2 is the bottleneck, 4·2² = 16 channels
    assert representation_module(model) is model.encoder[2]
    x = torch.rand(3, 1, 16, 16)
    skips = []
    h = x
    for stage in model.encoder:
        h = stage(h)
        skips.append(h)
    torch.testing.assert_close(rep_of(model, x), skips[-1].mean(dim=(2, 3)))
    assert rep_of(model, x).shape == (3, 16)
    # FL-MedSegBench's reading: the head's input, flattened
    features = model.feature_forward(x)
    torch.testing.assert_close(rep_of(model, x, "features"), features.flatten(1))
    assert rep_of(model, x, "features").shape == (3, 4 * 16 * 16)


def test_moon_contrastive_loss_on_a_hand_computed_example():
    from pflbench.methods.moon import contrastive_loss

    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z_glob = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # cosines 1, 1/√2
    z_prev = torch.tensor([[0.0, 3.0], [-1.0, -1.0]])  # cosines 0, −1
    t = 0.5
    pos, neg = torch.tensor([1.0, 2**-0.5]), torch.tensor([0.0, -1.0])
    expected = -torch.log(torch.exp(pos / t) / (torch.exp(pos / t) + torch.exp(neg / t))).mean()
    torch.testing.assert_close(contrastive_loss(z, z_glob, z_prev, t), expected)
    # a swapped positive/negative is a near miss that lands elsewhere
    assert float(contrastive_loss(z, z_prev, z_glob, t)) > float(expected) + 1.0


def test_moon_local_step_adds_mu_times_the_contrastive_gradient():
    from pflbench.methods.moon import PREVIOUS, contrastive_loss, rep_of

    mu, lr = 3.0, 0.05
    work = {"epochs": None, "steps": 1, "lr": lr, **SGD}
    ((x, y),) = list(make_client(tiny_unet(), **work).batches())
    previous = tiny_unet(5)
    client = make_client(tiny_unet(), state={PREVIOUS: state_of(previous)}, **work)
    get_method("moon")(mu=mu).local_update(client)
    model, glob = tiny_unet().train(), tiny_unet().eval()
    previous.eval()
    with torch.no_grad():
        zg, zp = rep_of(glob, x), rep_of(previous, x)
    logits = model(x)
    loss = segmentation_loss(logits, y) + mu * contrastive_loss(rep_of(model, x), zg, zp, 0.5)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    got = _params(client.model)
    for (n, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(got[n], p.detach() - lr * g, rtol=1e-5, atol=1e-6, msg=n)
    assert client.state[PREVIOUS]["head.weight"].equal(got["head.weight"])


# bytes -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fedavg_bytes_run():
    torch.set_num_threads(1)
    return run(tiny_federation(), "fedavg", rounds=2, local_epochs=1)[1]


@pytest.mark.parametrize(
    "method, up_extra, down_extra",
    [
        ("scaffold", "params", "params"),  # Δcᵢ up, c down: one float per parameter each
        ("feddyn", 0, 0),  # h stays on the server, gᵢ on the client
        ("fednova", 8, 0),  # ‖aᵢ‖₁, one number
        ("moon", 0, 0),  # the previous local model never leaves the client
        ("fedlws", 0, 0),  # the shrinking is server computation
        ("fedawa", 0, 0),  # the weights are learned on the server from the uploads
    ],
)
def test_bytes_per_round_against_fedavg(method, up_extra, down_extra, fedavg_bytes_run):
    data = tiny_federation()
    _, m = run(data, method, rounds=2, local_epochs=1)
    f = fedavg_bytes_run
    params = _param_bytes(tiny_unet())
    per_client = {"params": params}
    diff = _uploads_by_round(m) - _uploads_by_round(f)
    n = len(data.sites)
    assert (diff["bytes_up"] == n * per_client.get(up_extra, up_extra)).all()
    assert (diff["bytes_down"] == n * per_client.get(down_extra, down_extra)).all()
    setup = m.comm[m.comm["round"] == 0]
    assert setup["bytes_up"].sum() == setup["bytes_down"].sum() == 0


# FedRDN ------------------------------------------------------------------------------------------


def test_fedrdn_sends_only_channel_statistics_and_counts_their_bytes():
    from pflbench.methods.fedrdn import channel_statistics

    data = tiny_federation(sizes=[6, 10, 14])
    _, out = run(data, "fedrdn", rounds=1, local_epochs=1)
    setup = out.comm[out.comm["round"] == 0].groupby("client")[["bytes_up", "bytes_down"]].sum()
    channels, n = data.sites[0].images.shape[1], len(data.sites)
    assert (setup["bytes_up"] == 2 * channels * 4).all()  # mean and std, float32
    assert (setup["bytes_down"] == n * 2 * channels * 4).all()  # everybody's statistics
    _, avg = run(data, "fedavg", rounds=1, local_epochs=1)
    assert _uploads_by_round(out).equals(_uploads_by_round(avg))  # rounds cost as FedAvg
    # what a client sends is its statistics, not its images: one number per channel each
    payload = get_method("fedrdn")().setup(make_client(tiny_unet(), site=1))
    assert set(payload) == {"mean", "std"}
    assert all(t.shape == (channels,) for t in payload.values())
    images = data.sites[1].images
    expected_std = images.flatten(2).std(2).mean(0)
    torch.testing.assert_close(payload["std"], expected_std)
    with pytest.raises(ValueError, match="site 'flat'.*std 0"):
        channel_statistics(torch.ones(2, 1, 4, 4), "flat")


def test_fedrdn_trains_on_normalized_inputs_and_evaluates_with_its_own_statistics():
    from pflbench.methods.fedrdn import BANK, OWN

    lr = 0.05
    work = {"epochs": None, "steps": 2, "lr": lr, **SGD}
    batches = list(make_client(tiny_unet(), **work).batches())
    stats = {"mean": torch.tensor([0.3]), "std": torch.tensor([0.2])}
    client = make_client(tiny_unet(), state={BANK: {"site9": stats}, OWN: stats}, **work)
    get_method("fedrdn")().local_update(client)
    model = tiny_unet().train()  # by hand: SGD on (x − μ)/σ
    params = dict(model.named_parameters())
    for x, y in batches:
        grads = torch.autograd.grad(
            segmentation_loss(model((x - 0.3) / 0.2), y), list(params.values())
        )
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(lr * g)
    got = _params(client.model)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    x = torch.rand(2, 1, 16, 16)
    evaluated = get_method("fedrdn")().eval_model(client).eval()
    client.model.eval()
    torch.testing.assert_close(evaluated(x), client.model((x - 0.3) / 0.2))
    assert not torch.allclose(evaluated(x), client.model(x))


# FedLWS ------------------------------------------------------------------------------------------


def test_fedlws_shrinks_each_layer_by_the_hand_computed_factor():
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[0].bias.fill_(4.0)  # layer 0: w = [3, 4], ‖w‖ = 5
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(0.0)
    m = get_method("fedlws")(beta=0.1)
    m.start_server(model, ["a", "b"])
    assert m.groups == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]

    def up(w: float, b: float, bn: float, stat: float) -> Upload:
        entries = {
            "0.weight": torch.tensor([[w]]),
            "0.bias": torch.tensor([b]),
            "1.weight": torch.tensor([bn]),
            "1.bias": torch.tensor([0.0]),
            "1.running_mean": torch.tensor([stat]),
            "1.running_var": torch.tensor([1.0]),
        }
        return Upload(entries=entries, weight=1.0)

    # layer 0: clients [4, 4] and [2, 6]: w̄ = [3, 5], ‖w̄ − w‖ = 1; Δ = [1, 0], [−1, 2],
    # Δ̄ = [0, 1], spread = √2, τ = 0.1·√2 (inside [0.01, 0.2]); γ = 5 / (5 + 0.1·√2)
    msg = m.aggregate({"a": up(4.0, 4.0, 1.0, 2.0), "b": up(2.0, 6.0, 1.0, 4.0)}, 1)
    gamma = 5 / (5 + 0.1 * 2**0.5)
    assert m.last_gammas[0] == pytest.approx(gamma)
    assert torch.allclose(msg.entries["0.weight"], torch.tensor([[3.0 * gamma]]))
    assert torch.allclose(msg.entries["0.bias"], torch.tensor([5.0 * gamma]))
    # layer 1 did not move (w̄ = w): γ = 1; BN statistics are FedAvg's, never shrunk
    assert m.last_gammas[1] == 1.0
    assert torch.equal(msg.entries["1.running_mean"], torch.tensor([3.0]))
    # τ is clipped: a tiny β gives τ_min = 0.01
    m2 = get_method("fedlws")(beta=1e-6)
    m2.start_server(model, ["a", "b"])
    m2.aggregate({"a": up(4.0, 4.0, 1.0, 2.0), "b": up(2.0, 6.0, 1.0, 4.0)}, 1)
    assert m2.last_gammas[0] == pytest.approx(5 / (5 + 0.01))
    with pytest.raises(ValueError, match="min_tau"):
        get_method("fedlws")(min_tau=0.5, max_tau=0.1)


def test_fedlws_round_is_fedavg_times_layer_factors():
    data = tiny_federation(sizes=[6, 10, 14])
    lws, avg = capturing(get_method("fedlws")), capturing(get_method("fedavg"))
    fed, out = run(data, lws(), rounds=1, local_epochs=1)
    run(data, avg(), rounds=1, local_epochs=1)
    gammas = fed.method.last_gammas
    assert all(0 < g < 1 for g in gammas)  # every layer moved, so every layer shrinks
    for names, g in zip(fed.method.groups, gammas, strict=True):
        for n in names:
            torch.testing.assert_close(lws.models["site0"][n], avg.models["site0"][n] * g)
    stat = "encoder.0.norm1.running_mean"
    assert torch.equal(lws.models["site0"][stat], avg.models["site0"][stat])


# FedAWA ------------------------------------------------------------------------------------------


def test_fedawa_weights_on_a_hand_computed_example():
    import math

    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))  # w = [1, 0]
    m = get_method("fedawa")()
    m.start_server(model, ["a", "b"])

    def up(v, weight):
        return Upload(entries={"weight": torch.tensor([v])}, weight=weight)

    uploads = {"a": up([1.0, 1.0], 1.0), "b": up([2.0, 0.0], 3.0)}
    msg = m.aggregate(uploads, 1)
    # round 1 aggregates with softmax(T) for T = w/Σw = [¼, ¾] (logits, as the official code)
    pa = math.exp(0.25) / (math.exp(0.25) + math.exp(0.75))
    assert m.last_weights["a"] == pytest.approx(pa)
    expected = torch.tensor([[pa * 1 + (1 - pa) * 2, pa * 1]])
    torch.testing.assert_close(msg.entries["weight"], expected)
    # the loss in s = p_a: Δ_a = [0, 1], Δ_b = [1, 0], so sim = 2√2·s(1 − s) and
    # reg = s·(1 − 1/√2); dL/ds = 2√2(1 − 2s) + 1 − 1/√2 > 0 at s = 0.3775, so one fresh Adam
    # step (|step| = lr) lowers T_a and raises T_b by 0.001
    assert 2 * 2**0.5 * (1 - 2 * pa) + 1 - 2**-0.5 > 0
    assert m.logits["a"] == pytest.approx(0.25 - 0.001, abs=1e-7)
    assert m.logits["b"] == pytest.approx(0.75 + 0.001, abs=1e-7)
    # round 2 uses the updated logits and the new global model
    m.aggregate(uploads, 2)
    pa2 = math.exp(0.249) / (math.exp(0.249) + math.exp(0.751))
    assert m.last_weights["a"] == pytest.approx(pa2, abs=1e-6)


def test_fedawa_round_is_a_weighted_average_with_the_learned_weights():
    data = tiny_federation(sizes=[6, 10, 14])
    fed, _ = run(data, "fedawa", rounds=2, local_epochs=1)
    w = fed.method.last_weights
    assert sum(w.values()) == pytest.approx(1.0)
    assert all(v > 0 for v in w.values())
    # FedAvg's weights would be 6/30, 10/30, 14/30; the learned ones are near-uniform softmaxes
    assert w["site0"] != pytest.approx(6 / 30, abs=0.05)


# state stores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scaffold", "feddyn", "fednova", "fedrdn", "fedlws", "fedawa"])
def test_server_state_methods_give_the_same_run_with_uploads_on_disk(method):
    data = tiny_federation(sizes=[6, 10, 14])
    _, mem = run(data, method, rounds=2, local_epochs=1)
    _, disk = run(data, method, rounds=2, local_epochs=1, store="disk")
    _assert_same_results(mem, disk)
    pd.testing.assert_frame_equal(mem.comm, disk.comm)
