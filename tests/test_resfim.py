"""pFL-ResFIM (resfim.md §8): Fisher estimators, masks, style simulation, aggregation, bytes."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import exactly
from torch import nn

import pflbench.client as client_module
import pflbench.methods.resfim as resfim_module
from pflbench.client import Budget, Client, LocalWork
from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation
from pflbench.fisher import (
    batch_fisher,
    diagonal_fisher,
    normalize_scores,
    per_sample_fisher,
    per_sample_fisher_sets,
    random_mask,
    residual_scores,
    tensor_level_mask,
    top_rho_mask,
)
from pflbench.messages import Message
from pflbench.method import Method
from pflbench.models import UNet
from pflbench.params import ParamError
from pflbench.partition import BATCHNORM_STATS, keys_of_types
from pflbench.registry import get_method
from pflbench.spectral import amplitude_phase, low_freq_window
from pflbench.training import segmentation_loss

ResFIM = resfim_module.ResFIM


# ---- helpers --------------------------------------------------------------------------------


def smooth_images(n: int, c: int = 1, size: int = 16, seed: int = 0, level: float = 0.0):
    """Smooth images well inside (0, 1), so that transfers between them do not clip."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g)
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return 0.3 + level + 0.3 * x


def site(name: str, n: int = 8, seed: int = 0, level: float = 0.0, c: int = 1) -> SiteData:
    x = smooth_images(n, c, seed=seed, level=level)
    y = (x.mean(1) > 0.45 + level).long()
    return SiteData(name=name, images=x, labels=y, case_ids=[f"{name}-{i}" for i in range(n)])


WORK = LocalWork(
    epochs=1,
    steps=None,
    batch_size=4,
    optimizer="adam",
    lr=1e-2,
    weight_decay=0.0,
    momentum=0.9,
    augment=False,
    shuffle=True,
)


def client(
    cid: str,
    data: SiteData,
    model: nn.Module | None = None,
    state=None,
    round: int = 1,
    work: LocalWork = WORK,
) -> Client:
    torch.manual_seed(0)
    model = model if model is not None else UNet(data.images.shape[1], 1, base=4, depth=1)
    return Client(
        cid,
        model,
        {} if state is None else state,
        data,
        work,
        round=round,
        seed=0,
        device=torch.device("cpu"),
        budget=Budget(),
    )


def exchange_bank(method: ResFIM, clients: list[Client]) -> dict[str, torch.Tensor]:
    """The setup hooks as the engine calls them: upload, server forward, receive."""
    payloads = {c.id: method.fresh().setup(c) for c in clients}
    messages = method.setup_server(payloads)
    for c in clients:
        method.fresh().receive_setup(c, messages[c.id])
    return payloads


def tiny_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1)
    )
    net.train()
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        net(torch.rand(6, 1, 8, 8) * 3)
    return net


def loop_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one autograd backward per sample, squared, averaged (eval mode)."""
    model.eval()
    acc = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        segmentation_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad.square()
    model.zero_grad(set_to_none=True)
    return {k: v / len(x) for k, v in acc.items()}


def run(data: FederatedData, method: Method, seed: int = 0, **proto):
    fed = Federation(data, make_splits(data), method, TINY_MODEL, fast_protocol(**proto), seed)
    return fed, fed.run()


def capturing(base: type[Method]) -> type[Method]:
    """``base`` that keeps every client's final model (evaluation sees the final state)."""

    def eval_model(self, c):
        type(self).models[c.id] = {k: v.clone() for k, v in c.model.state_dict().items()}
        return c.model

    return type(f"Capture{base.__name__}", (base,), {"models": {}, "eval_model": eval_model})


def bn_affine_keys(model: nn.Module) -> set[str]:
    keys = keys_of_types(model, (nn.modules.batchnorm._BatchNorm,))
    return {k for k in keys if k.rsplit(".", 1)[-1] not in BATCHNORM_STATS}


def bn_stat_keys(model: nn.Module) -> set[str]:
    keys = keys_of_types(model, (nn.modules.batchnorm._BatchNorm,))
    return {k for k in keys if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")}


# ---- Fisher estimators ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_per_sample_fisher_equals_an_autograd_loop(chunk: int) -> None:
    net = tiny_net()
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = (torch.rand(7, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).long()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = per_sample_fisher(net, x, y, chunk_size=chunk)
    # the model is left exactly as it was: train mode, state, no gradients
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    want = loop_fisher(net, x, y)
    assert set(got) == {k for k, _ in net.named_parameters()}
    assert all(float(v.abs().max()) > 0 for v in want.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)


def test_per_sample_fisher_on_a_multiclass_unet() -> None:
    torch.manual_seed(0)
    net = UNet(1, 3, base=2, depth=1)
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 3, (5, 8, 8))
    got = per_sample_fisher(net, x, y, chunk_size=2)
    want = loop_fisher(net, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)


def test_fisher_of_several_sets_in_one_pass_equals_each_set_alone() -> None:
    net = tiny_net()
    g = torch.Generator().manual_seed(6)
    sets = [
        (torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n, 8, 8), generator=g))
        for n in (3, 5, 2)
    ]
    together = per_sample_fisher_sets(net, sets, chunk_size=4)  # chunks cross set borders
    for (x, y), got in zip(sets, together, strict=True):
        want = loop_fisher(net, x, y)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)


def test_batch_fisher_is_squared_minibatch_gradients() -> None:
    net = tiny_net()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = (torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(5)) > 0.5).long()
    # batch size 1 is the per-sample estimator
    one = batch_fisher(net, x, y, batch_size=1)
    per = per_sample_fisher(net, x, y)
    for k in per:
        torch.testing.assert_close(one[k], per[k], rtol=1e-4, atol=1e-10)
    # batch size 3: the mean of the two squared mini-batch gradients
    got = batch_fisher(net, x, y, batch_size=3)
    net.eval()
    want = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for s in (0, 3):
        net.zero_grad()
        segmentation_loss(net(x[s : s + 3]), y[s : s + 3]).backward()
        for k, p in net.named_parameters():
            want[k] += p.grad.square() / 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)
    assert diagonal_fisher(net, x, y, "batch", chunk_size=3).keys() == got.keys()
    with pytest.raises(ValueError, match="unknown Fisher estimator"):
        diagonal_fisher(net, x, y, "exact")


# ---- residual, normalization, masks ---------------------------------------------------------


def test_residual_scores_average_absolute_differences() -> None:
    f = {"w": torch.tensor([1.0, 2.0, 3.0])}
    others = [{"w": torch.tensor([2.0, 2.0, 0.0])}, {"w": torch.tensor([1.0, 4.0, 3.0])}]
    r = residual_scores(f, others)
    assert r["w"].tolist() == [0.5, 1.0, 1.5]
    assert residual_scores(f, [])["w"].tolist() == [0.0, 0.0, 0.0]


def test_normalize_per_tensor_and_global() -> None:
    s = {"a": torch.tensor([1.0, 3.0, 2.0]), "b": torch.tensor([10.0, 30.0]), "c": torch.ones(4)}
    t = normalize_scores(s, "tensor")
    assert t["a"].tolist() == [0.0, 1.0, 0.5] and t["b"].tolist() == [0.0, 1.0]
    assert t["c"].tolist() == [0.0] * 4  # a constant tensor has no ranking
    g = normalize_scores(s, "global")
    torch.testing.assert_close(g["a"], (s["a"] - 1) / 29)
    torch.testing.assert_close(g["b"], (s["b"] - 1) / 29)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
    st.floats(0.0, 1.0),
    st.integers(0, 10_000),
)
def test_top_rho_per_tensor_picks_the_largest(sizes: list[int], rho: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = {f"t{i}": torch.randint(0, 5, (n,), generator=g).float() for i, n in enumerate(sizes)}
    mask = top_rho_mask(scores, rho)
    for k, s in scores.items():
        m = mask[k]
        assert m.dtype == torch.bool and m.shape == s.shape
        assert int(m.sum()) == min(s.numel(), math.floor(rho * s.numel() + 0.5))
        if m.any() and (~m).any():
            assert float(s[m].min()) >= float(s[~m].max())
    assert top_rho_mask(scores, rho)["t0"].equal(mask["t0"])  # ties break deterministically


def test_top_rho_extremes_ties_and_model_scope() -> None:
    s = {"a": torch.tensor([0.0, 5.0, 5.0, 1.0]), "b": torch.tensor([9.0, 8.0])}
    assert not any(m.any() for m in top_rho_mask(s, 0.0).values())
    assert all(m.all() for m in top_rho_mask(s, 1.0).values())
    assert top_rho_mask(s, 0.25)["a"].tolist() == [False, True, False, False]  # lower index wins
    m = top_rho_mask(s, 0.5, scope="model")  # 3 of 6 entries over the whole model
    assert m["b"].tolist() == [True, True] and m["a"].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="rho"):
        top_rho_mask(s, 1.5)


def test_random_mask_has_exact_counts_and_follows_the_generator() -> None:
    shapes = {"a": (4, 5), "b": (7,), "c": (1,)}
    a = random_mask(shapes, 0.3, torch.Generator().manual_seed(0))
    b = random_mask(shapes, 0.3, torch.Generator().manual_seed(0))
    c = random_mask(shapes, 0.3, torch.Generator().manual_seed(1))
    assert [int(a[k].sum()) for k in shapes] == [6, 2, 0]
    assert all(a[k].shape == shapes[k] and a[k].equal(b[k]) for k in shapes)
    assert not a["a"].equal(c["a"])


def test_tensor_level_mask_takes_whole_tensors_by_mean() -> None:
    s = {"a": torch.full((10,), 0.9), "b": torch.full((30,), 0.1), "c": torch.full((60,), 0.5)}
    m = tensor_level_mask(s, 0.1)
    assert {k for k, v in m.items() if v.all()} == {"a"}
    assert all(v.all() or not v.any() for v in m.values())
    assert {k for k, v in tensor_level_mask(s, 0.7).items() if v.all()} == {"a", "c"}
    assert all(v.all() for v in tensor_level_mask(s, 1.0).values())
    assert not any(v.any() for v in tensor_level_mask(s, 0.0).values())


# ---- style simulation and the bank ----------------------------------------------------------


def test_intensity_stats_from_the_spectrum_and_intensity_transfer() -> None:
    x = smooth_images(3, c=2, seed=7)
    mean, std = resfim_module.intensity_stats(amplitude_phase(x)[0])
    torch.testing.assert_close(mean, x.mean((-2, -1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, x.std((-2, -1), correction=0), rtol=1e-3, atol=1e-5)
    target = smooth_images(3, c=2, seed=8, level=0.2)
    amp_t = amplitude_phase(target)[0]
    same = resfim_module.intensity_transfer(x, amp_t, torch.zeros(3))
    assert torch.equal(same, x)
    out = resfim_module.intensity_transfer(x, amp_t, torch.ones(3))
    torch.testing.assert_close(out.mean((-2, -1)), target.mean((-2, -1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 6, 10), (2, 3, 2, 6, 10)])
def test_intensity_stats_hold_for_any_leading_dims_and_non_square_images(shape) -> None:
    """``…×H×W``: one mean and std per leading index, H ≠ W, the population (1/HW) std."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[0, ..., :3, :] *= 0.2  # the leading slices differ in mean and spread
    mean, std = resfim_module.intensity_stats(amplitude_phase(x)[0])
    assert mean.shape == std.shape == shape[:-2]
    torch.testing.assert_close(mean, x.mean((-2, -1)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(std, x.std((-2, -1), correction=0), rtol=1e-9, atol=1e-12)


def test_intensity_transfer_is_the_per_channel_formula_blended_by_each_images_lambda() -> None:
    """x' = clip((1−λ)·x + λ·((x − μ_x)/σ_x·σ_t + μ_t), 0, 1) per image and channel, with
    μ, σ over H×W only (population σ), each image its own λ, and x's dtype kept."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(3, 2, 6, 10, generator=g)
    x[:, 1] = 0.4 + 0.1 * x[:, 1]  # channel 1 narrow: σ_x differs per channel and image
    x[2, 0] *= 0.3
    target = torch.rand(3, 2, 6, 10, generator=g) * 1.6 - 0.3  # σ_t large: the clip bites
    target[1] = 0.2 + 0.05 * target[1]
    amp_t = amplitude_phase(target.double())[0]
    lam = torch.tensor([0.25, 0.6, 1.0], dtype=torch.float64)
    out = resfim_module.intensity_transfer(x, amp_t.float(), lam)
    assert out.dtype == x.dtype and out.shape == x.shape

    xd = x.double()
    mu_t, sd_t = target.mean((-2, -1)), target.std((-2, -1), correction=0)
    mu_x, sd_x = xd.mean((-2, -1)), xd.std((-2, -1), correction=0)
    matched = (xd - mu_x[..., None, None]) / sd_x[..., None, None] * sd_t[..., None, None]
    matched = matched + mu_t[..., None, None]
    blend = (1 - lam.view(-1, 1, 1, 1)) * xd + lam.view(-1, 1, 1, 1) * matched
    assert bool((blend < 0).any()) and bool((blend > 1).any())  # both clip ends are exercised
    torch.testing.assert_close(out.double(), blend.clamp(0, 1), rtol=0, atol=1e-5)


def test_intensity_transfer_of_a_flat_channel_is_the_targets_mean() -> None:
    """σ_x = 0 is guarded (by a tiny floor), not divided by: the flat channel moves to μ_t."""
    x = torch.full((1, 1, 4, 4), 0.5)  # exact in binary: μ_x = x, no rounding residue
    target = torch.linspace(0.2, 0.6, 16).view(1, 1, 4, 4)
    out = resfim_module.intensity_transfer(x, amplitude_phase(target)[0], torch.ones(1))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, torch.full_like(x, float(target.mean())), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["spectral", "intensity"])
def test_simulate_style_draws_a_bank_row_and_a_lambda_in_its_range_per_image(
    how: str, monkeypatch
) -> None:
    """Each image: one row of the other client's bank, uniformly, and λ = λ_min + (1 − λ_min)·u
    with u ~ U(0, 1), both from the caller's generator, in that order."""
    got = {}

    def capture(x, target, *rest):
        got["target"], got["lam"] = target, rest[-1]
        return x

    monkeypatch.setattr(resfim_module, f"{how}_transfer", capture)
    x = smooth_images(6)
    bank = torch.rand(4, 1, 16, 16)
    out = resfim_module.simulate_style(x, bank, how, 0.1, 0.4, torch.Generator().manual_seed(5))
    assert out is x
    g = torch.Generator().manual_seed(5)
    pick = torch.randint(4, (6,), generator=g)
    u = torch.rand(6, generator=g)
    assert torch.equal(got["target"], bank[pick])
    torch.testing.assert_close(got["lam"], 0.4 + 0.6 * u, rtol=0, atol=1e-7)
    assert bool(((got["lam"] >= 0.4) & (got["lam"] <= 1.0)).all())


def test_simulate_style_names_an_unknown_transfer() -> None:
    with pytest.raises(ValueError, match=r"^unknown transfer 'fourier'; expected spectral or "):
        resfim_module.simulate_style(
            smooth_images(2), torch.rand(1, 1, 16, 16), "fourier", 0.1, 0.5, torch.Generator()
        )


def test_bank_holds_only_other_clients_amplitudes() -> None:
    m = ResFIM(bank_size=3)
    sites = [site("a", seed=0), site("b", seed=1, level=0.1), site("c", seed=2, level=0.2)]
    cs = [client(s.name, s) for s in sites]
    payloads = exchange_bank(m, cs)
    for s in sites:
        p = payloads[s.name]
        assert p.dtype == torch.float32 and p.shape == (3, 1, 16, 16)
        amps = amplitude_phase(s.images)[0]
        for row in p:  # each row is the amplitude of one of the site's own images, not an image
            assert any(torch.equal(row, a) for a in amps)
            assert not any(torch.allclose(row, img) for img in s.images)
    for c in cs:
        bank = c.state["resfim/bank"]
        assert sorted(bank) == sorted({"a", "b", "c"} - {c.id})
        assert all(torch.equal(bank[j], payloads[j]) for j in bank)


def test_fisher_batch_keeps_labels_and_uses_other_clients_amplitudes_only() -> None:
    m = ResFIM(bank_size=4, fisher_samples=5, lambda_min=1.0, beta=0.15)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15), site("c", seed=2, level=-0.1)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    a = cs[0]
    x, y, moved = m.fresh().fisher_data(a)
    assert len(x) == 5 and sorted(moved) == ["b", "c"]
    # D_k is five of a's own (image, label) pairs
    for xi, yi in zip(x, y, strict=True):
        i = next(i for i, img in enumerate(sites[0].images) if torch.equal(img, xi))
        assert torch.equal(sites[0].labels[i], yi)
    win = low_freq_window(16, 16, 0.15)
    amp_x, ph_x = amplitude_phase(x)
    own = amplitude_phase(sites[0].images)[0]
    for j, xj in moved.items():
        assert xj.shape == x.shape and not torch.equal(xj, x)
        amp_j, ph_j = amplitude_phase(xj)
        bank = a.state["resfim/bank"][j]
        for i in range(len(x)):
            # λ = 1: the low frequencies are exactly one of client j's amplitudes ...
            err = [float((amp_j[i][..., win] - b[..., win]).abs().max()) for b in bank]
            assert min(err) < 1e-4
            own_err = [float((amp_j[i][..., win] - o[..., win]).abs().max()) for o in own]
            assert min(own_err) > 1e-2  # ... and not any of a's own
        # the high frequencies and the phase are x's
        torch.testing.assert_close(amp_j[..., ~win], amp_x[..., ~win], atol=1e-4, rtol=0)
        sig = amp_x > 1e-3 * float(amp_x.max())
        d = torch.remainder(ph_j - ph_x + math.pi, 2 * math.pi) - math.pi
        assert float(d[sig].abs().max()) < 1e-2
    assert a._budget.samples == {"fisher": 15}  # D_k and two transfers, counted


def test_style_augmentation_swaps_every_image_at_p_one(monkeypatch) -> None:
    m = ResFIM(style_augment=1.0, lambda_min=1.0, beta=0.15)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    seen = []

    def fake_train(model, batches, opt, extra_loss=None, where="", loss_fn=None):
        seen.extend(batches)
        return 0.0, 0

    monkeypatch.setattr(client_module, "train_epochs", fake_train)  # what Client.fit trains with
    m.fresh().local_update(cs[0])
    images, labels = sites[0].images, sites[0].labels
    assert sum(len(x) for x, _ in seen) == len(images)
    assert cs[0]._budget.samples["local"] == len(images)  # the suite's budget, no more
    for x, y in seen:
        for xi, yi in zip(x, y, strict=True):
            assert not any(torch.allclose(xi, img, atol=1e-3) for img in images)
            assert any(torch.equal(yi, lab) for lab in labels)


def _augmented_batches(m: ResFIM, c: Client, monkeypatch) -> list:
    seen = []

    def fake_train(model, batches, opt, extra_loss=None, where="", loss_fn=None):
        seen.extend((x.clone(), y.clone()) for x, y in batches)
        return 0.0, 0

    monkeypatch.setattr(client_module, "train_epochs", fake_train)
    m.fresh().local_update(c)
    return seen


def test_style_augmentation_swaps_each_image_by_its_own_draw_from_the_clients_stream(
    monkeypatch,
) -> None:
    """At p = ½ some images keep their own style bit for bit and the rest move; which ones is
    the client's seeded stream (the global RNG plays no part), and the round changes it."""
    m = ResFIM(style_augment=0.5, lambda_min=1.0, beta=0.15, bank_size=3)
    sites = [site("a", n=16, seed=0), site("b", seed=1, level=0.15), site("c", seed=2)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    view = client("a", sites[0], state=cs[0].state)
    torch.manual_seed(123)
    first = _augmented_batches(m, view, monkeypatch)

    def moved(batches) -> list[list[bool]]:
        images = sites[0].images
        return [[not any(torch.equal(xi, img) for img in images) for xi in x] for x, _ in batches]

    n_moved = sum(map(sum, moved(first)))
    assert 0 < n_moved < 16  # every image picks one of the others: `pick` alone moves all
    twin = client("a", sites[0], state=cs[0].state)
    torch.manual_seed(456)  # another global state, the same client, round and stream
    again = _augmented_batches(m, twin, monkeypatch)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    later = _augmented_batches(m, client("a", sites[0], state=cs[0].state, round=2), monkeypatch)
    assert moved(later) != moved(first)


# ---- the mask inside the method -------------------------------------------------------------


def test_local_update_without_style_augment_is_fit_then_the_mask_on_the_same_streams() -> None:
    """``style_augment: 0``: the plain training stream, then the residual-Fisher mask, drawing
    exactly what a client that fits and then asks for its mask draws (an augmented path at
    p = 0 would move images nowhere but shift every later seeded draw)."""
    m = ResFIM(bank_size=4, fisher_samples=6, rho=0.3)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15), site("c", seed=2, level=-0.1)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    view = client("a", sites[0], state=dict(cs[0].state), round=2)
    twin = client("a", sites[0], state=dict(cs[0].state), round=2)
    m.fresh().local_update(view)
    twin.fit()
    want = m.fresh().personal_mask(twin)
    for k, v in view.model.state_dict().items():
        assert torch.equal(v, twin.model.state_dict()[k]), k
    shared = view.state["resfim/shared"]
    assert shared.keys() == want.keys() and view.state["resfim/mask_round"] == 2
    for k, personal in want.items():
        expected = resfim_module._compact(~personal)
        assert (
            torch.equal(shared[k], expected)
            if isinstance(expected, torch.Tensor)
            else shared[k] is expected
        ), k


def test_bn_stats_switch_shares_or_keeps_the_running_statistics() -> None:
    """The warm-up partition: every floating entry shared; BN running statistics too with
    ``bn_stats: shared``, kept with ``local``; the integer batch counter never."""
    net = tiny_net()
    stats = bn_stat_keys(net)
    counter = {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
    assert stats and counter
    local, shared = ResFIM().partition(net), ResFIM(bn_stats="shared").partition(net)
    for k in net.state_dict():
        assert local[k] is (k not in stats | counter), k
        assert shared[k] is (k not in counter), k


def test_the_bank_rows_follow_the_clients_stream_not_the_global_rng() -> None:
    m = ResFIM(bank_size=3)
    a = site("a", seed=0)
    torch.manual_seed(1)
    first = m.fresh().setup(client("a", a))
    twin = client("a", a)
    torch.manual_seed(2)
    assert torch.equal(first, m.fresh().setup(twin))
    other_round = m.fresh().setup(client("a", a, round=2))
    assert not torch.equal(first, other_round)


def test_random_mask_computes_no_fisher_and_follows_the_clients_stream() -> None:
    """``mask: random`` (ablation): exact top-ρ counts per tensor drawn from the client's stream
    (not the global RNG); no Fisher pass, so no "fisher" samples in the budget."""
    m = ResFIM(mask="random", rho=0.3, bank_size=2, fisher_samples=4)
    a = site("a", seed=0)
    view = client("a", a)
    torch.manual_seed(1)
    got = m.fresh().personal_mask(view)
    twin = client("a", a)
    torch.manual_seed(2)
    again = m.fresh().personal_mask(twin)
    assert "fisher" not in view._budget.samples
    for k, p in view.model.named_parameters():
        assert got[k].shape == p.shape and got[k].dtype == torch.bool, k
        assert int(got[k].sum()) == math.floor(0.3 * p.numel() + 0.5), k
        assert torch.equal(got[k], again[k]), k
    later = m.fresh().personal_mask(client("a", a, round=2))
    assert any(not torch.equal(got[k], later[k]) for k in got)


@pytest.mark.parametrize(("mask", "scope"), [("tensor", "tensor"), ("resfim", "model")])
def test_tensor_masks_and_model_scope_rank_the_methods_own_scores(mask: str, scope: str) -> None:
    """``mask: tensor`` keeps whole tensors by mean score; ``scope: model`` takes one top-ρ over
    every entry of the model: each the rule of pflbench.fisher applied to the client's scores."""
    m = ResFIM(bank_size=4, fisher_samples=6, rho=0.3, mask=mask, scope=scope)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15), site("c", seed=2, level=-0.1)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    view, twin = (client("a", sites[0], state=cs[0].state) for _ in range(2))
    got = m.fresh().personal_mask(view)
    s = m.fresh().scores(twin)
    want = tensor_level_mask(s, 0.3) if mask == "tensor" else top_rho_mask(s, 0.3, "model")
    elementwise = top_rho_mask(s, 0.3, "tensor")
    assert any(not torch.equal(want[k], elementwise[k]) for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_method_mask_is_top_rho_of_normalized_residual_fisher() -> None:
    m = ResFIM(bank_size=4, fisher_samples=6, rho=0.3)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15), site("c", seed=2, level=-0.1)]
    cs = [client(s.name, s) for s in sites]
    exchange_bank(m, cs)
    # two views of client a in the same round, as the engine opens them: same draws
    view, twin = (client("a", sites[0], state=cs[0].state) for _ in range(2))
    got = m.fresh().personal_mask(view)
    x, y, moved = m.fresh().fisher_data(twin)
    f = per_sample_fisher(twin.model, x, y)
    r = residual_scores(f, [per_sample_fisher(twin.model, xj, y) for xj in moved.values()])
    want = top_rho_mask(normalize_scores(r), 0.3)
    assert got.keys() == {k for k, _ in view.model.named_parameters()}
    for k, v in want.items():
        assert torch.equal(got[k], v), k
        assert int(v.sum()) == math.floor(0.3 * v.numel() + 0.5)


@pytest.mark.parametrize("estimator", ["per_sample", "batch"])
def test_method_scores_use_the_suites_loss_and_batch(estimator: str) -> None:
    """The Fisher loss is the client's training loss (here with loss_smoothing 0.05, not the
    default 1); the ``batch`` estimator's mini-batch is the suite's batch size (2, not 32)."""
    work = dataclasses.replace(WORK, batch_size=2, loss_smoothing=0.05)
    m = ResFIM(bank_size=4, fisher_samples=6, fisher=estimator)
    sites = [site("a", seed=0), site("b", seed=1, level=0.15), site("c", seed=2, level=-0.1)]
    cs = [client(s.name, s, work=work) for s in sites]
    exchange_bank(m, cs)
    view, twin = (client("a", sites[0], state=cs[0].state, work=work) for _ in range(2))
    got = m.fresh().scores(view)
    x, y, moved = m.fresh().fisher_data(twin)

    def loss(logits, labels):
        return segmentation_loss(logits, labels, 0.05)

    def fisher(xs, loss_fn=loss, chunk=2):
        if estimator == "batch":
            return batch_fisher(twin.model, xs, y, loss_fn, chunk)
        return per_sample_fisher(twin.model, xs, y, loss_fn)

    def score(**kw):
        f = fisher(x, **kw)
        return normalize_scores(residual_scores(f, [fisher(xj, **kw) for xj in moved.values()]))

    want = score()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # the two choices do matter here: the default loss (and a 32-image batch) score otherwise
    others = [score(loss_fn=segmentation_loss)] + (
        [score(chunk=32)] if estimator == "batch" else []
    )
    for other in others:
        assert any(not torch.allclose(other[k], want[k], rtol=1e-3, atol=1e-5) for k in want)


def test_scores_without_residual_are_the_local_fisher_normalized_over_the_model() -> None:
    """``residual: false`` ranks by F(D_k) itself (not a residual over no styles, which is
    zero), and ``normalize: global`` min–max normalizes over all entries at once."""
    m = ResFIM(fisher_samples=6, residual=False, transfer="none", normalize="global")
    a = site("a", seed=0)
    view, twin = client("a", a), client("a", a)
    got = m.fresh().scores(view)
    x, y, moved = m.fresh().fisher_data(twin)
    assert moved == {}
    want = normalize_scores(per_sample_fisher(twin.model, x, y), "global")
    per_tensor = normalize_scores(per_sample_fisher(twin.model, x, y), "tensor")
    assert any(not torch.allclose(want[k], per_tensor[k]) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert max(float(v.max()) for v in got.values()) == pytest.approx(1.0)


def test_masked_aggregation_through_the_method() -> None:
    """Personal entries stay bit-identical; shared ones get Σ n s θ / Σ n s; unshared stay."""
    m = ResFIM()
    masks = {  # True = shared; element 3 of w is shared by nobody
        "a": torch.tensor([[True, True], [False, False]]),
        "b": torch.tensor([[True, False], [True, False]]),
        "c": torch.tensor([[False, True], [True, False]]),
    }
    sizes = {"a": 2, "b": 3, "c": 5}
    cs = []
    for i, cid in enumerate("abc"):
        lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(2, 2, generator=torch.Generator().manual_seed(i)))
        data = site(cid, n=sizes[cid])
        c = client(cid, data, model=lin, state={"resfim/shared": {"weight": masks[cid]}})
        cs.append(c)
    before = {c.id: c.model.weight.detach().clone() for c in cs}
    uploads = {c.id: m.fresh().upload(c) for c in cs}
    for cid, u in uploads.items():
        assert u.masks["weight"].equal(masks[cid]) and u.weight == sizes[cid]
    msg = m.aggregate(uploads, 2)
    num = sum(sizes[c] * masks[c].double() * before[c].double() for c in "abc")
    den = sum(sizes[c] * masks[c].double() for c in "abc")
    for c in cs:
        m.fresh().receive(c, msg)
        after, mine = c.model.weight.detach(), masks[c.id]
        assert torch.equal(after[~mine], before[c.id][~mine])  # personal: bit-identical
        want = (num / den.clamp_min(1e-12)).float()
        torch.testing.assert_close(after[mine], want[mine], rtol=0, atol=1e-6)
    assert msg.masks["weight"].tolist() == [[True, True], [True, False]]


def test_aggregate_over_all_averages_every_client_but_keeps_personal_entries() -> None:
    m = ResFIM(aggregate_over="all")
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([False, False])}
    cs = []
    for cid, val in (("a", 1.0), ("b", 4.0)):
        lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            lin.weight.fill_(val)
        cs.append(
            client(
                cid,
                site(cid, n=4),
                model=lin,
                state={"resfim/shared": {"weight": masks[cid].view(1, 2)}},
            )
        )
    uploads = {c.id: m.fresh().upload(c) for c in cs}
    assert all(not u.masks and u.entries["weight"].shape == (1, 2) for u in uploads.values())
    msg = m.aggregate(uploads, 2)
    assert msg.entries["weight"].tolist() == [[2.5, 2.5]]  # b's personal values count too
    for c in cs:
        m.fresh().receive(c, msg)
    assert cs[0].model.weight.tolist() == [[2.5, 1.0]]
    assert cs[1].model.weight.tolist() == [[4.0, 4.0]]


def test_aggregate_over_all_sends_every_parameter_and_only_the_shared_bn_statistics() -> None:
    """``aggregate_over: all``: every parameter whole, and of the non-parameters (BN running
    statistics) only those the partition shares: none with ``bn_stats: local``."""
    net = tiny_net()
    params = {k for k, _ in net.named_parameters()}
    stats = bn_stat_keys(net)
    masks = {k: torch.rand(p.shape) < 0.5 for k, p in net.named_parameters()}
    for bn, sent in (("local", set()), ("shared", stats)):
        m = ResFIM(aggregate_over="all", bn_stats=bn)
        c = client("a", site("a", n=4), model=net, state={"resfim/shared": dict(masks)})
        up = m.fresh().upload(c)
        assert set(up.entries) == params | sent, bn
        assert not up.masks


# ---- hyperparameters -------------------------------------------------------------------------


def test_every_switch_is_declared_and_bad_combinations_are_refused() -> None:
    for name in (
        "rho beta lambda_min bank_size fisher_samples fisher residual transfer normalize mask "
        "bn_stats mask_every warmup_rounds aggregate_over style_augment"
    ).split():
        assert name in ResFIM.params
    assert ResFIM().rho == 0.2 and ResFIM().warmup_rounds == 1 and ResFIM().mask_every == 1
    none = (
        "method resfim: transfer 'none' leaves no other style to compare with, so residual "
        "must be false (residual: false ranks by the local Fisher alone)"
    )
    with pytest.raises(ParamError, match=exactly(none)):
        ResFIM(transfer="none")
    augment = (
        "method resfim: style_augment > 0 needs a transfer (spectral or intensity), not 'none'"
    )
    with pytest.raises(ParamError, match=exactly(augment)):
        ResFIM(transfer="none", residual=False, style_augment=0.5)
    with pytest.raises(ParamError, match="'rho'"):
        ResFIM(rho=1.2)
    with pytest.raises(ParamError, match="'mask_every'"):
        ResFIM(mask_every=0)
    with pytest.raises(ParamError, match="'fisher' = 'exact' is not one of"):
        ResFIM(fisher="exact")
    with pytest.raises(ParamError, match="'mask' = 'layer' is not one of"):
        ResFIM(mask="layer")
    with pytest.raises(ParamError, match="is not one of"):
        ResFIM(residual="yes")
    ResFIM(transfer="none", residual=False)  # FIM only, no bank: valid
    # a tuner searches the spec's ranges, never the switches (they choose the reading)
    assert {k for k, p in ResFIM.params.items() if p.tunable} == {"rho", "beta", "lambda_min"}


# ---- whole runs ------------------------------------------------------------------------------


def _param_bytes(model: nn.Module, rho: float = 0.2) -> tuple[int, int]:
    """(float32 bytes of the parameters, one bit per element of every partially shared tensor)."""
    ps = list(model.parameters())
    partial = [p for p in ps if 0 < math.floor(rho * p.numel() + 0.5) < p.numel()]
    return sum(4 * p.numel() for p in ps), sum(math.ceil(p.numel() / 8) for p in partial)


def test_communication_is_the_bank_the_parameters_and_one_bit_masks() -> None:
    data = tiny_federation()
    fed, out = run(data, ResFIM(bank_size=4), rounds=2)
    comm = out.comm.groupby("round")[["bytes_up", "bytes_down"]].sum()
    k, c, hw = 3, 1, 16 * 16
    bank = k * 4 * c * hw * 4  # clients × bank_size × C×H×W float32 amplitudes
    assert comm.loc[0, "bytes_up"] == bank
    assert comm.loc[0, "bytes_down"] == bank * (k - 1)  # everyone gets the others' banks
    model = fed.model
    stats = bn_stat_keys(model)
    warm = sum(
        v.numel() * v.element_size()
        for key, v in model.state_dict().items()
        if v.is_floating_point() and key not in stats
    )
    assert comm.loc[1, "bytes_up"] == k * warm  # warm-up: everything but BN statistics
    params, mask_bits = _param_bytes(model)
    assert comm.loc[2, "bytes_up"] == k * (params + mask_bits)  # parameters + 1 bit each
    assert k * params <= comm.loc[2, "bytes_down"] <= k * (params + mask_bits)
    assert out.info["budget"]["fisher"] == k * 7 * k  # 7 train images, D_k + 2 transfers


def test_the_manifest_records_each_clients_own_partition() -> None:
    """The base partition is the warm-up one; each client's element masks show per client."""
    data = tiny_federation()
    fed, out = run(data, ResFIM(bank_size=4), rounds=2)
    model = fed.model
    n_params = sum(p.numel() for p in model.parameters())
    n_stats = sum(model.state_dict()[k].numel() for k in bn_stat_keys(model))
    base = out.info["partition_sizes"]
    per_client = out.info["client_partition_sizes"]
    assert set(per_client) == {s.name for s in data.sites}
    for sizes in per_client.values():
        assert sizes["shared"] + sizes["personal"] == base["shared"] + base["personal"]
        # top-ρ of every parameter tensor personal (rounded per tensor), BN statistics too
        personal_params = sizes["personal"] - n_stats
        assert abs(personal_params - 0.2 * n_params) <= len(list(model.parameters()))
        assert sizes["personal"] > base["personal"]


class _Spy(ResFIM):
    """Records everything that crosses the boundary (test only)."""

    crossed: list = []

    def setup(self, c):
        p = super().setup(c)
        type(self).crossed.append(("setup", p, c.train_data.images))
        return p

    def receive_setup(self, c, message):
        type(self).crossed.append(("setup-message", message, None))
        super().receive_setup(c, message)

    def upload(self, c):
        u = super().upload(c)
        type(self).crossed.append(("upload", u, None))
        return u

    def receive(self, c, message):
        type(self).crossed.append(("message", message, None))
        super().receive(c, message)


def test_only_spectra_parameters_and_masks_cross_the_boundary() -> None:
    data = tiny_federation()
    _Spy.crossed = []
    fed, _ = run(data, _Spy(bank_size=4), rounds=2)
    model = fed.model
    shareable = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    shareable -= bn_stat_keys(model)
    kinds = pd.Series([kind for kind, _, _ in _Spy.crossed]).value_counts().to_dict()
    assert kinds == {"setup": 3, "setup-message": 3, "upload": 6, "message": 6}
    for kind, obj, images in _Spy.crossed:
        if kind == "setup":
            amps = amplitude_phase(images)[0]
            assert all(any(torch.equal(row, a) for a in amps) for row in obj)
        elif kind == "setup-message":
            assert len(obj) == 2 and all(t.shape == (4, 1, 16, 16) for t in obj.values())
        else:
            assert not obj.extras and set(obj.entries) <= shareable
            assert all(t.is_floating_point() for t in obj.entries.values())
            assert all(m.dtype == torch.bool for m in obj.masks.values())
            if kind == "upload":
                assert isinstance(obj.weight, float)
            else:
                assert isinstance(obj, Message)


def test_rho_zero_with_local_bn_stats_is_silobn_and_differs_from_fedbn_only_on_gamma_beta() -> None:
    """ "Behaves as FedBN's partition" made precise: ρ = 0 shares every parameter and keeps the BN
    running statistics local. That is SiloBN's partition exactly (final models agree), and FedBN's
    partition on every entry except BN γ/β, which FedBN keeps local and ResFIM ρ = 0 shares."""
    data = tiny_federation()
    res_cls, silo_cls = capturing(ResFIM), capturing(get_method("silobn"))
    fed, a = run(data, res_cls(rho=0.0, warmup_rounds=0), rounds=2)
    _, b = run(data, silo_cls(), rounds=2)
    model = fed.model
    c = client("site0", data.sites[0], model=model, state={})
    res = ResFIM(rho=0.0, warmup_rounds=0)
    res.local_update(c)
    part = {
        k: bool(v.all()) if isinstance(v, torch.Tensor) else v
        for k, v in res.client_partition(c).items()
    }
    assert part == get_method("silobn")().partition(model)
    fedbn = get_method("fedbn")().partition(model)
    differ = {k for k in part if part[k] != fedbn[k]}
    assert differ == bn_affine_keys(model) and all(part[k] for k in differ)
    for cid, state in res_cls.models.items():
        for k, v in state.items():
            assert torch.equal(v, silo_cls.models[cid][k]), (cid, k)
    stats = sorted(bn_stat_keys(model))
    assert not torch.equal(res_cls.models["site0"][stats[0]], res_cls.models["site1"][stats[0]])
    for k in bn_affine_keys(model):
        assert torch.equal(res_cls.models["site0"][k], res_cls.models["site1"][k])
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.comm, b.comm)  # all-True masks travel as whole tensors


def test_rho_one_never_shares_a_parameter() -> None:
    data = tiny_federation()
    res_cls, loc_cls = capturing(ResFIM), capturing(get_method("local"))
    _, a = run(data, res_cls(rho=1.0, warmup_rounds=0), rounds=2)
    _, b = run(data, loc_cls(), rounds=2)
    assert a.info["bytes_up"] == 0 and a.info["bytes_down"] == 0
    for cid, state in loc_cls.models.items():
        for k, v in state.items():
            assert torch.equal(res_cls.models[cid][k], v), (cid, k)
    pd.testing.assert_frame_equal(a.rounds, b.rounds)


class _Schedule(ResFIM):
    log: list = []

    def local_update(self, c):
        super().local_update(c)
        type(self).log.append((c.round, c.id, c.state.get("resfim/mask_round")))


def test_warmup_and_mask_schedule() -> None:
    data = tiny_federation()
    _Schedule.log = []
    fed, out = run(data, _Schedule(warmup_rounds=2, mask_every=2), rounds=5, local_epochs=1)
    by_round = {r: {mr for rr, _, mr in _Schedule.log if rr == r} for r in range(1, 6)}
    assert by_round == {1: {None}, 2: {None}, 3: {3}, 4: {3}, 5: {5}}
    assert out.info["budget"]["fisher"] == 2 * 3 * 7 * 3  # two mask rounds
    up = out.comm.groupby("round")["bytes_up"].sum()
    _, mask_bits = _param_bytes(fed.model)
    assert up.loc[1] == up.loc[2] and up.loc[3] == up.loc[4] == up.loc[1] + 3 * mask_bits


def test_variants_run_and_are_deterministic() -> None:
    data = tiny_federation()
    _, a = run(data, ResFIM(), rounds=2)
    _, b = run(data, ResFIM(), rounds=2)
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    # FIM only and the random mask exchange no bank; random and tensor masks need no Fisher
    _, fim = run(data, ResFIM(residual=False, transfer="none"), rounds=2)
    assert fim.comm.query("round == 0")["bytes_up"].sum() == 0
    assert fim.info["budget"]["fisher"] == 3 * 7  # D_k only
    _, rnd = run(data, ResFIM(mask="random"), rounds=2)
    assert (
        "fisher" not in rnd.info["budget"] and rnd.comm.query("round == 0")["bytes_up"].sum() == 0
    )
    cls = capturing(ResFIM)
    fed, _ = run(data, cls(mask="tensor", fisher="batch", transfer="intensity"), rounds=2)
    ms = cls.models
    params = [k for k, _ in fed.model.named_parameters()]
    same = [
        k
        for k in params
        if torch.equal(ms["site0"][k], ms["site1"][k])
        and torch.equal(ms["site0"][k], ms["site2"][k])
    ]
    assert 0 < len(same) < len(params)  # whole tensors: some shared by all, some personal
