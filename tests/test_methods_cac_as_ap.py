"""FedCAC, FedAS, FedAP (issue 16): each test checks a defining property with hand-computed
numbers, chosen so that the nearest wrong implementation (global instead of per-layer top-τ,
|Δθ| instead of |Δθ⊙θ|, a symmetric or fixed overlap threshold, sample-count instead of Fisher
weights, a mean instead of a sum over batches, n-weighted instead of W-weighted personalized
averages, BN entries sent) gives other numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from method_helpers import make_client, run, state_of, tiny_federation, tiny_unet
from torch import nn

from pflbench.client import Budget
from pflbench.messages import Message, Upload
from pflbench.methods.fedap import STATS, bn_input_stats, similarity_weights
from pflbench.methods.fedas import TRACE, fisher_trace, nll
from pflbench.methods.fedcac import (
    CRITICAL,
    collaboration_threshold,
    critical_mask,
    overlap,
    sensitivity,
)
from pflbench.params import ParamError
from pflbench.partition import PartitionError, keys_of_types
from pflbench.registry import get_method
from pflbench.suite import ModelSpec

T = torch.tensor


# FedCAC ------------------------------------------------------------------------------------------


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(torch.zeros(2))


def test_fedcac_critical_entries_are_the_top_tau_of_delta_times_theta_in_each_layer():
    model = _TwoLayers()
    with torch.no_grad():
        model.a.copy_(T([3.0, 0.1, 2.5, 4.0]))
        model.b.copy_(T([0.1, 0.1]))
    # a: Δ = [.5, .9, .2, .1], |Δ⊙θ| = [1.5, .09, .5, .4]; b: |Δ⊙θ| = [.001, .002]
    before = {"a": T([2.5, -0.8, 2.3, 3.9]), "b": T([0.09, 0.08])}
    scores = sensitivity(before, model)
    assert torch.allclose(scores["a"], T([1.5, 0.09, 0.5, 0.4]))
    assert torch.allclose(scores["b"], T([0.001, 0.002]))
    masks = {k: critical_mask(s, 0.5) for k, s in scores.items()}
    # by |Δ⊙θ|: {0, 2}; by |Δ| it would be {0, 1}, by |θ| {0, 3}
    assert masks["a"].tolist() == [True, False, True, False]
    # per layer: a global top-τ over both layers would pick none of b's entries
    assert masks["b"].tolist() == [False, True]


def test_fedcac_critical_mask_follows_the_official_threshold_rules():
    # ties at the threshold are all critical
    assert critical_mask(T([1.0, 2.0, 2.0, 0.5]), 0.25).tolist() == [False, True, True, False]
    # a zero threshold drops to the smallest non-zero score: every entry that moved
    assert critical_mask(T([0.0, 0.3, 0.0, 0.2]), 0.75).tolist() == [False, True, False, True]
    # ⌊τ·n⌋ = 0: nothing is critical
    assert not critical_mask(T([1.0, 2.0, 3.0]), 0.3).any()


def test_fedcac_numerically_zero_threshold_is_at_most_1e_10_and_moved_means_above_1e_20():
    """The official constants, at their boundaries (float64 scores hold them exactly): a
    threshold of exactly 1e-10 counts as zero; a score of exactly 1e-20 has not moved."""
    d = torch.float64
    at_zero = critical_mask(torch.tensor([1e-10, 1e-15, 0.0, 0.0], dtype=d), 0.25)
    assert at_zero.tolist() == [True, True, False, False]  # lowered to 1e-15
    not_moved = critical_mask(torch.tensor([1e-12, 1e-20, 0.0, 0.0], dtype=d), 0.25)
    assert not_moved.tolist() == [True, False, False, False]  # 1e-20 is not above 1e-20


def test_fedcac_overlap_is_one_minus_the_mask_difference_over_twice_its_own_count():
    mine, other = T([1, 1, 0, 0]).bool(), T([1, 0, 1, 0]).bool()
    assert overlap(mine, other) == 1.0 - 2 / (2 * 2)
    assert overlap(mine, T([1, 1, 1, 1]).bool()) == 1.0 - 2 / (2 * 2)
    assert overlap(T([1, 0, 0, 0]).bool(), T([1, 1, 1, 0]).bool()) == 1.0 - 2 / (2 * 1)  # < 0
    assert overlap(T([0, 0, 0, 0]).bool(), mine) == 0.0  # no critical entry: no overlap
    assert collaboration_threshold({}, 3, 100.0) == math.inf  # a lone uploader


def test_fedcac_upload_sends_the_clients_critical_masks_beside_its_parameters():
    client = make_client(tiny_unet(0), lr=3e-2)
    method = get_method("fedcac")(tau=0.3)
    method.local_update(client)
    up = method.upload(client)
    assert up is not None and up.weight == client.weight
    params = dict(client.model.named_parameters())
    assert set(up.entries) >= set(params)
    for k, m in client.state[CRITICAL].items():
        assert torch.equal(up.extras[CRITICAL][k], m), k
        assert up.extras[CRITICAL][k] is not m  # a copy: the client's masks stay its own
        assert torch.equal(up.entries[k], params[k].detach()), k


def test_fedcac_local_update_records_the_masks_of_its_own_training_step():
    client = make_client(tiny_unet(0), lr=3e-2)
    before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
    get_method("fedcac")(tau=0.3).local_update(client)
    expected = {k: critical_mask(s, 0.3) for k, s in sensitivity(before, client.model).items()}
    got = client.state[CRITICAL]
    assert set(got) == {n for n, _ in client.model.named_parameters()}
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def _cac_uploads() -> dict[str, Upload]:
    """a, b, c with masks whose overlaps (1 − Σ|cᵢ−cⱼ| / 2Σcᵢ) are, by hand:
    a→b .75, a→c 0, b→a .5, b→c −.5, c→a 0, c→b .25 (mean 1/6, max .75)."""
    masks = {"a": [1, 1, 0, 0], "b": [1, 0, 0, 0], "c": [0, 0, 1, 1]}
    theta = {"a": 1.0, "b": 10.0, "c": 100.0}
    n = {"a": 1.0, "b": 2.0, "c": 1.0}
    return {
        cid: Upload(
            entries={"w": theta[cid] * T([1.0, 2.0, 3.0, 4.0])},
            weight=n[cid],
            extras={CRITICAL: {"w": T(masks[cid]).bool()}},
        )
        for cid in masks
    }


@pytest.mark.parametrize(
    "round, groups",
    [
        # threshold 1/6 + t/100 · (.75 − 1/6)
        (1, {"a": ["a", "b"], "b": ["b", "a"], "c": ["c", "b"]}),  # .1725
        (50, {"a": ["a", "b"], "b": ["b", "a"], "c": ["c"]}),  # .4583
        (100, {"a": ["a", "b"], "b": ["b"], "c": ["c"]}),  # .75
    ],
)
def test_fedcac_collaborators_are_the_clients_overlapping_above_a_rising_threshold(round, groups):
    method = get_method("fedcac")(beta=100.0)
    assert method.collaborators(_cac_uploads(), round) == groups


def test_fedcac_threshold_rises_from_the_mean_overlap_to_the_maximum():
    ov = {("a", "b"): 0.2, ("b", "a"): 0.6, ("a", "c"): 0.1, ("c", "a"): 0.3}
    assert collaboration_threshold(ov, 0, 10.0) == pytest.approx(0.3)
    assert collaboration_threshold(ov, 5, 10.0) == pytest.approx(0.45)
    assert collaboration_threshold(ov, 10, 10.0) == pytest.approx(0.6)


def test_fedcac_critical_entries_average_over_collaborators_the_rest_over_everyone():
    msgs = get_method("fedcac")(beta=100.0).aggregate(_cac_uploads(), 50)
    # global, n-weighted (1, 2, 1): (θa + 2θb + θc)/4 = 30.25 · [1, 2, 3, 4]
    # a: critical {0, 1}, group {a, b}: unweighted (θa + θb)/2 = 5.5 · [1, 2, 3, 4]
    assert torch.allclose(msgs["a"].entries["w"], T([5.5, 11.0, 90.75, 121.0]))
    # b: critical {0}, group {b, a}
    assert torch.allclose(msgs["b"].entries["w"], T([5.5, 60.5, 90.75, 121.0]))
    # c: critical {2, 3}, alone: its own values
    assert torch.allclose(msgs["c"].entries["w"], T([30.25, 60.5, 300.0, 400.0]))


def test_fedcac_a_client_that_did_not_upload_keeps_its_critical_entries():
    method = get_method("fedcac")(beta=100.0)
    ups = _cac_uploads()
    method.aggregate(ups, 1)
    msgs = method.aggregate({k: ups[k] for k in ("a", "b")}, 2)
    assert torch.equal(msgs["c"].masks["w"], T([True, True, False, False]))


def test_fedcac_run_keeps_bn_statistics_local_and_counts_no_extra_pass():
    _, out = run(tiny_federation(), "fedcac", rounds=2)
    assert set(out.info["budget"]) == {"local"}
    part = get_method("fedcac")().partition(tiny_unet())
    stats = [k for k in part if k.endswith(("running_mean", "running_var"))]
    assert stats and not any(part[k] for k in stats)


# FedAS -------------------------------------------------------------------------------------------


def test_fedas_aggregation_weights_follow_the_fisher_traces_not_the_sample_counts():
    ups = {
        "a": Upload(entries={"w": T([1.0, 0.0])}, weight=1.0, extras={TRACE: 3.0}),
        "b": Upload(entries={"w": T([0.0, 1.0])}, weight=3.0, extras={TRACE: 1.0}),
    }
    msg = get_method("fedas")().aggregate(ups, 1)
    assert torch.allclose(msg.entries["w"], T([0.75, 0.25]))
    # the w/o-synchronization switch: sample counts
    msg = get_method("fedas")(weights="samples").aggregate(ups, 1)
    assert torch.allclose(msg.entries["w"], T([0.25, 0.75]))


def test_fedas_refuses_all_zero_traces_by_round():
    ups = {"a": Upload(entries={"w": T([1.0])}, weight=1.0, extras={TRACE: 0.0})}
    with pytest.raises(ValueError, match="fedas round 3: every uploaded Fisher trace is zero"):
        get_method("fedas")().aggregate(ups, 3)


def test_fedas_fisher_trace_is_the_sum_over_batches_of_squared_nll_gradients_in_eval_mode():
    client = make_client(tiny_unet(0), shuffle=False, batch_size=4)  # 10 images: 4, 4, 2
    model = client.model.train()
    got = fisher_trace(model, client, "fedas-fisher")
    assert model.training  # mode restored
    hand = 0.0
    model.eval()
    data = client.train_data
    for lo in (0, 4, 8):
        x, y = data.images[lo : lo + 4], data.labels[lo : lo + 4]
        grads = torch.autograd.grad(nll(model(x), y), list(model.parameters()))
        hand += sum(float(g.square().sum()) for g in grads)
    model.train()
    assert got == pytest.approx(hand, rel=1e-5)
    assert client._budget.samples["fedas-fisher"] == 10


def test_fedas_round_aligns_the_body_keeps_the_head_and_uploads_its_trace():
    budget = Budget()
    client = make_client(tiny_unet(0), budget=budget, round=2, shuffle=False)
    method = get_method("fedas")()
    own = state_of(client.model)
    glob = state_of(tiny_unet(1))
    body = [k for k, v in method.partition(client.model).items() if v]
    method.receive(client, Message(entries={k: glob[k] for k in body}))
    assert torch.equal(client.model.state_dict()["head.weight"], own["head.weight"])  # not yet
    # alignment alone (no local training) must move the body away from w, keep the head
    method.align_and_load(client, Message(**client.state.pop("fedas/pending")))
    after = state_of(client.model)
    assert torch.equal(after["head.weight"], own["head.weight"])
    assert any(not torch.equal(after[k], glob[k]) for k in body)
    stats = [k for k in own if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], own[k]) for k in stats)  # BN statistics local
    assert budget.samples["fedas-prototypes"] == 10 and budget.samples["fedas-align"] == 10
    # without alignment the body is w exactly
    c0 = make_client(tiny_unet(0), round=2)
    get_method("fedas")(align_epochs=0).align_and_load(
        c0, Message(entries={k: glob[k] for k in body})
    )
    assert all(torch.equal(c0.model.state_dict()[k], glob[k]) for k in body)


def test_fedas_alignment_pulls_the_received_body_towards_the_local_prototypes():
    from pflbench.methods.fedas import alignment_loss, pixel_classes

    client = make_client(tiny_unet(0), round=2, shuffle=False)
    method = get_method("fedas")(align_lr=0.05, align_epochs=3)
    glob = state_of(tiny_unet(1))
    body = [k for k, v in method.partition(client.model).items() if v]
    protos, channels = method.prototypes(client, client.model)
    assert channels == 1

    def loss_of(model):
        probe = copy.deepcopy(model).train()
        with torch.no_grad():
            data = client.train_data
            f = probe.feature_forward(data.images)
            return float(alignment_loss(f, pixel_classes(channels, data.labels), protos))

    start = client.new_model(glob)
    before = loss_of(start)
    method.align_and_load(client, Message(entries={k: glob[k] for k in body}))
    assert loss_of(client.model) < before


def test_fedas_prototypes_are_per_class_means_of_the_head_input():
    client = make_client(tiny_unet(0), shuffle=False, batch_size=10)  # one batch: all images
    model = client.model
    own = state_of(model)
    protos, channels = get_method("fedas")().prototypes(client, model)
    assert all(torch.equal(v, own[k]) for k, v in state_of(model).items())  # nothing moved
    probe = copy.deepcopy(model).train()  # BN on batch statistics, as in local training
    with torch.no_grad():
        f = probe.feature_forward(client.train_data.images).movedim(1, -1)
    fg = client.train_data.labels > 0
    assert channels == 1 and set(protos) == {0, 1}
    assert torch.allclose(protos[1], f[fg].mean(0), atol=1e-5)
    assert torch.allclose(protos[0], f[~fg].mean(0), atol=1e-5)


def test_fedas_run_counts_each_extra_pass_under_its_own_label():
    data = tiny_federation()
    _, out = run(data, "fedas", rounds=2, local_epochs=1)
    b = out.info["budget"]
    # one epoch a round: the trace pass equals the local budget; prototypes and alignment
    # happen from round 2 on (nothing received before), one pass each
    assert b["fedas-fisher"] == b["local"] > 0
    assert b["fedas-prototypes"] == b["fedas-align"] == b["local"] // 2


# FedAP -------------------------------------------------------------------------------------------


def _stats(mean, var):
    return [(T(mean), T(var))]


def test_fedap_weights_are_inverse_bn_wasserstein_distances_with_momentum_on_the_diagonal():
    stats = {
        "a": _stats([0.0, 0.0], [1.0, 1.0]),
        "b": _stats([3.0, 4.0], [1.0, 1.0]),  # d(a, b) = 5
        "c": _stats([0.0, 0.0], [4.0, 4.0]),  # d(a, c) = √((2−1)² · 2) = √2
    }
    w = similarity_weights(stats, 0.5)
    inv_b, inv_c = 1 / 5, 1 / math.sqrt(2)
    assert w["a"]["a"] == 0.5
    assert w["a"]["b"] == pytest.approx(0.5 * inv_b / (inv_b + inv_c))
    assert w["a"]["c"] == pytest.approx(0.5 * inv_c / (inv_b + inv_c))
    assert sum(w["b"].values()) == pytest.approx(1.0)


def test_fedap_client_i_receives_the_w_weighted_average_not_the_sample_weighted_one():
    stats = {
        "a": _stats([0.0, 0.0], [1.0, 1.0]),
        "b": _stats([3.0, 4.0], [1.0, 1.0]),
        "c": _stats([0.0, 0.0], [4.0, 4.0]),
    }
    theta = {"a": T([1.0, 0.0, 0.0]), "b": T([0.0, 1.0, 0.0]), "c": T([0.0, 0.0, 1.0])}
    n = {"a": 5.0, "b": 1.0, "c": 1.0}
    ups = {
        cid: Upload(entries={"conv.weight": theta[cid]}, weight=n[cid], extras={STATS: stats[cid]})
        for cid in stats
    }
    method = get_method("fedap")(momentum=0.5, warmup_rounds=1)
    msgs = method.aggregate(ups, 2)
    w = similarity_weights(stats, 0.5)
    for i in stats:
        expected = T([w[i]["a"], w[i]["b"], w[i]["c"]])
        assert torch.allclose(msgs[i].entries["conv.weight"], expected), i
    # statistics are kept by the server: a later round's uploads need not carry them
    later = {cid: Upload(entries=u.entries, weight=u.weight) for cid, u in ups.items()}
    again = method.aggregate(later, 3)
    assert torch.allclose(again["a"].entries["conv.weight"], msgs["a"].entries["conv.weight"])
    # during the warm-up: one FedAvg message, n-weighted
    warm = method.aggregate(ups, 1)
    assert isinstance(warm, Message)
    assert torch.allclose(warm.entries["conv.weight"], T([5.0, 1.0, 1.0]) / 7)


def test_fedap_bn_entries_stay_local_after_the_warm_up_and_stats_go_up_once():
    model = tiny_unet(0)
    bn = set(keys_of_types(model, (nn.BatchNorm2d,)))
    method = get_method("fedap")(warmup_rounds=1)
    warm = make_client(model, round=1)
    assert bn & set(method.fresh().upload(warm).entries)  # FedAvg warm-up shares BN
    budget = Budget()
    client = make_client(tiny_unet(0), round=2, budget=budget)
    m = method.fresh()
    m.local_update(client)
    up = m.upload(client)
    assert not bn & set(up.entries) and STATS in up.extras
    assert budget.samples["fedap-bn-stats"] == 10
    own = state_of(client.model)
    glob = {k: v + 1.0 for k, v in own.items() if v.is_floating_point()}
    m.receive(client, Message(entries=glob))
    after = state_of(client.model)
    for k in bn:
        assert torch.equal(after[k], own[k]), k
    assert torch.equal(after["head.weight"], glob["head.weight"])
    client.round = 3
    m2 = method.fresh()
    m2.local_update(client)
    assert STATS not in m2.upload(client).extras
    assert budget.samples["fedap-bn-stats"] == 10  # computed once


def test_fedap_bn_input_statistics_merge_batches_as_the_official_metacount():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    x1, x2 = torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4) + 1.0
    ((mean, var),) = bn_input_stats(model, [(x1, None), (x2, None)])
    m1, v1 = x1.mean((0, 2, 3)).double(), x1.var((0, 2, 3)).double()
    m2, v2 = x2.mean((0, 2, 3)).double(), x2.var((0, 2, 3)).double()
    m = (3 * m1 + 2 * m2) / 5
    v = (3 * (v1 + (m - m1) ** 2) + 2 * (v2 + (m - m2) ** 2)) / 5
    assert torch.allclose(mean.double(), m, atol=1e-6)
    assert torch.allclose(var.double(), v, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "instance"])
def test_fedap_refuses_a_model_without_batchnorm(norm):
    data = tiny_federation()
    spec = ModelSpec(name="unet", options={"base": 4, "depth": 2, "norm": norm})
    with pytest.raises(PartitionError, match="no BatchNorm layer"):
        run(data, "fedap", model=spec, rounds=1)


def test_fedap_run_counts_one_bn_statistics_pass_per_client():
    data = tiny_federation()
    fed, out = run(data, get_method("fedap")(warmup_rounds=1), rounds=3, local_epochs=1)
    b = out.info["budget"]
    per_round = b["local"] // 3
    assert b["fedap-bn-stats"] == per_round  # one pass over each client's train split, once


# hyperparameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params, key",
    [
        ("fedcac", {"tau": 1.5}, "tau"),
        ("fedcac", {"beta": 0.5}, "beta"),
        ("fedas", {"align_epochs": -1}, "align_epochs"),
        ("fedas", {"weights": "uniform"}, "weights"),
        ("fedap", {"momentum": 1.2}, "momentum"),
        ("fedap", {"warmup_rounds": 1.5}, "warmup_rounds"),
    ],
)
def test_new_methods_refuse_values_they_cannot_use(method, params, key):
    with pytest.raises(ParamError, match=rf"method {method}: parameter '{key}'"):
        get_method(method)(**params)


# all three -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedcac", "fedas", "fedap"])
def test_partial_participation_on_a_disk_store_gives_the_memory_results(name):
    """Two of three clients a round exercise the non-uploader paths; the disk store re-reads
    uploads and client state from files, which must change nothing."""

    def go(store):
        m = get_method(name)(**({"warmup_rounds": 1} if name == "fedap" else {}))
        _, out = run(
            tiny_federation(), m, rounds=3, local_epochs=1, client_fraction=0.67, store=store
        )
        return out

    mem, disk = go("memory"), go("disk")
    assert mem.info["status"] == disk.info["status"] == "ok"
    assert mem.info["budget"] == disk.info["budget"]
    assert mem.rounds["value"].tolist() == disk.rounds["value"].tolist()
