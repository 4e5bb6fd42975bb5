"""FedAP's rules (issue 22: fedap mutation survivors), each from the method's definition with the
expected value computed here: BN input statistics merged over every batch (three of unequal size
and content, so a count that is reset instead of accumulated shows), the summed per-layer
Wasserstein distance (two layers, nonzero means on both sides), the similarity weights by hand
(distance 0, distance exactly 1, a lone client), the exact refusals, and the one-epoch BN pass."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import exactly, make_client, tiny_federation, tiny_unet
from torch import nn

from pflbench.client import Budget
from pflbench.messages import Upload
from pflbench.methods.fedap import STATS, bn_distance, bn_input_stats, similarity_weights
from pflbench.partition import PartitionError
from pflbench.registry import get_method

T = torch.tensor


def _close(expected: float) -> object:
    # relative only: pytest.approx's default absolute 1e-12 would hide weights near 1e-15
    return pytest.approx(expected, rel=1e-12, abs=0.0)


# bn_input_stats ----------------------------------------------------------------------------------


def test_bn_input_stats_merge_every_batch_not_only_the_last_two():
    torch.manual_seed(1)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    xs = [
        torch.randn(3, 2, 4, 4),
        torch.randn(2, 2, 4, 4) * 2.0 + 1.0,
        torch.randn(4, 2, 4, 4) * 0.5 - 3.0,
    ]
    ((mean, var),) = bn_input_stats(model, [(x, None) for x in xs])
    # closed form of the metacount merge over all batches: m = Σ n_b m_b / N,
    # v = Σ n_b (v_b + (m − m_b)²) / N, v_b the unbiased variance over (N, H, W) of batch b
    n = [len(x) for x in xs]
    total = sum(n)
    mb = [x.double().mean((0, 2, 3)) for x in xs]
    vb = [x.double().var((0, 2, 3)) for x in xs]
    m = sum(k * mm for k, mm in zip(n, mb, strict=True)) / total
    v = sum(k * (vv + (m - mm) ** 2) for k, mm, vv in zip(n, mb, vb, strict=True)) / total
    assert torch.allclose(mean.double(), m, atol=1e-6)
    assert torch.allclose(var.double(), v, atol=1e-6)
    # the pooled mean is the plain mean of every sample, whatever the batching
    pooled = torch.cat(xs).double().mean((0, 2, 3))
    assert torch.allclose(mean.double(), pooled, atol=1e-6)


def test_bn_input_stats_refuse_an_empty_batch_stream():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    with pytest.raises(
        ValueError, match=exactly("fedap: no training batch to compute BN statistics from")
    ):
        bn_input_stats(model, [])


# bn_distance -------------------------------------------------------------------------------------


def test_bn_distance_sums_the_per_layer_wasserstein_distances():
    a = [
        (T([1.0, 2.0]), T([1.0, 1.0])),
        (T([1.0, -1.0]), T([4.0, 9.0])),
    ]
    b = [
        (T([4.0, 6.0]), T([1.0, 1.0])),  # layer 1: ‖Δμ‖² = 9 + 16, ‖Δσ‖² = 0 → 5
        (T([2.0, 1.0]), T([1.0, 1.0])),  # layer 2: ‖Δμ‖² = 1 + 4, ‖Δσ‖² = 1 + 4 → √10
    ]
    expected = 5.0 + math.sqrt(10.0)
    assert bn_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert bn_distance(b, a) == pytest.approx(expected, rel=1e-6)
    assert bn_distance(a, a) == 0.0


def test_bn_distance_refuses_statistics_of_different_layer_counts():
    one = [(T([0.0]), T([1.0]))]
    two = [(T([0.0]), T([1.0])), (T([5.0]), T([1.0]))]
    with pytest.raises(ValueError):
        bn_distance(one, two)
    with pytest.raises(ValueError):
        bn_distance(two, one)


# similarity_weights ------------------------------------------------------------------------------


def _layer(mean: float, var: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(T([mean]), T([var]))]


def test_similarity_weights_give_a_pair_at_distance_zero_the_official_1e14():
    stats = {
        "a": _layer(0.0, 1.0),
        "b": _layer(0.0, 1.0),  # d(a, b) = 0
        "c": _layer(2.0, 1.0),  # d(a, c) = d(b, c) = 2
    }
    m = 0.3
    w = similarity_weights(stats, m)
    same, inv_c = 1e14, 1.0 / 2.0
    for i, j in (("a", "b"), ("b", "a")):
        assert w[i][i] == m
        assert w[i][j] == _close((1 - m) * same / (same + inv_c))
        assert w[i]["c"] == _close((1 - m) * inv_c / (same + inv_c))
    assert w["c"] == {"c": m, "a": _close((1 - m) / 2), "b": _close((1 - m) / 2)}


def test_similarity_weights_at_distance_exactly_one_are_one_over_the_distance():
    stats = {
        "a": _layer(0.0, 1.0),
        "b": _layer(1.0, 1.0),  # d(a, b) = 1
        "c": _layer(0.0, 9.0),  # d(a, c) = |√9 − √1| = 2, d(b, c) = √(1 + 4) = √5
    }
    m = 0.4
    w = similarity_weights(stats, m)
    inv = {("a", "b"): 1.0, ("a", "c"): 0.5, ("b", "c"): 1 / math.sqrt(5.0)}
    inv.update({(j, i): d for (i, j), d in list(inv.items())})
    for i in stats:
        others = [j for j in stats if j != i]
        norm = sum(inv[i, j] for j in others)
        expected = {i: m, **{j: (1 - m) * inv[i, j] / norm for j in others}}
        assert w[i] == {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()}, i


def test_similarity_weights_leave_a_lone_client_its_own_model():
    assert similarity_weights({"a": _layer(3.0, 2.0)}, 0.3) == {"a": {"a": 1.0}}


# partition ---------------------------------------------------------------------------------------


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.InstanceNorm2d(2, affine=True)


class CountOnlyBatchNorm(nn.Module):
    """A BN layer whose only state entry is the integer ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2, affine=False)
        self.bn.running_mean = None
        self.bn.running_var = None


def test_fedap_refuses_a_model_without_batchnorm_naming_its_class():
    method = get_method("fedap")()
    message = (
        "fedap: model NoBatchNorm has no BatchNorm layer; FedAP compares clients by BatchNorm "
        "feature statistics (use norm: batch)"
    )
    with pytest.raises(PartitionError, match=exactly(message)):
        method.partition(NoBatchNorm())


def test_fedap_refuses_batchnorm_layers_without_a_floating_entry_naming_them():
    model = CountOnlyBatchNorm()
    assert list(model.bn.state_dict()) == ["num_batches_tracked"]
    message = (
        "fedap: the personal part (BatchNorm layers) of model CountOnlyBatchNorm is empty, so "
        "fedap would silently be FedAvg; use a model where it is not empty"
    )
    with pytest.raises(PartitionError, match=exactly(message)):
        get_method("fedap")().partition(model)


# local_update ------------------------------------------------------------------------------------


def test_fedap_bn_statistics_pass_is_one_epoch_even_with_two_local_epochs():
    n_train = len(tiny_federation().sites[0].images)
    budget = Budget()
    client = make_client(tiny_unet(0), round=2, budget=budget, epochs=2)
    method = get_method("fedap")(warmup_rounds=1).fresh()
    method.local_update(client)
    assert budget.samples["fedap-bn-stats"] == n_train
    assert budget.samples["local"] == 2 * n_train


# aggregate ---------------------------------------------------------------------------------------


def test_fedap_aggregate_refuses_clients_without_bn_statistics_naming_round_and_clients():
    entries = {"conv.weight": T([1.0, 2.0])}
    stats = _layer(0.0, 1.0)
    method = get_method("fedap")(warmup_rounds=1)
    ups = {
        "a": Upload(entries=entries, weight=1.0, extras={STATS: stats}),
        "b": Upload(entries=entries, weight=1.0),
        "c": Upload(entries=entries, weight=1.0),
    }
    with pytest.raises(
        RuntimeError, match=exactly("fedap round 2: no BN statistics from ['b', 'c']")
    ):
        method.aggregate(ups, 2)
    # a's statistics were kept; once b sends its own only c is missing
    ups["b"] = Upload(entries=entries, weight=1.0, extras={STATS: _layer(1.0, 1.0)})
    ups["a"] = Upload(entries=entries, weight=1.0)
    with pytest.raises(RuntimeError, match=exactly("fedap round 3: no BN statistics from ['c']")):
        method.aggregate(ups, 3)
