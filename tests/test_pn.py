"""PN (Population Normalization, issue 17): the layer, the architecture hook, the method.

The layer's defining property is that it normalises with its learned population parameters,
never with the batch's statistics, identically in training and evaluation; the method's is that
it is FedAvg over every entry of the PN model, on the seeded weights the other methods start from.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, fast_protocol
from method_helpers import capturing, run, tiny_federation, tiny_unet
from torch import nn

from pflbench.client import _seed
from pflbench.data import make_splits
from pflbench.engine import Federation, build_model
from pflbench.methods.fedavg import FedAvg
from pflbench.methods.pn import PN
from pflbench.partition import PartitionError
from pflbench.population_norm import PopulationNorm2d, population_norm_keys, to_population_norm
from pflbench.registry import get_method
from pflbench.suite import ModelSpec


def _layer(c: int = 3) -> PopulationNorm2d:
    layer = PopulationNorm2d(c)
    with torch.no_grad():
        layer.pop_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.pop_gamma.copy_(torch.tensor([4.0, 0.25, 1.0]))
        layer.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    return layer


# the layer -----------------------------------------------------------------------------------


def test_forward_is_the_hand_computed_population_transform():
    layer = _layer()
    x = torch.tensor([1.5, 0.0, 2.0]).reshape(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
    # (1.5-0.5)/sqrt(4)·2+0 = 1;  (0+1)/sqrt(.25)·1+1 = 3;  (2-2)/1·(-1)+3 = 3   (eps = 1e-5)
    want = torch.tensor([1.0, 3.0, 3.0])
    out = layer(x)
    assert torch.allclose(out[0, :, 0, 0], want, atol=1e-4)
    exact = (x - layer.pop_mean.view(1, 3, 1, 1)) / torch.sqrt(
        layer.pop_gamma.view(1, 3, 1, 1) + 1e-5
    ) * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    assert torch.equal(out, exact)


def test_an_image_is_transformed_the_same_whatever_its_batch():
    """Batch statistics would make an image's output depend on its batch-mates; PN's does not."""
    torch.manual_seed(0)
    layer = _layer().train()
    a = torch.randn(1, 3, 4, 4)
    b = 100.0 + 50.0 * torch.randn(3, 3, 4, 4)  # very different mean and variance
    alone = layer(a)
    together = layer(torch.cat([a, b]))[:1]
    assert torch.equal(alone, together)
    bn = nn.BatchNorm2d(3).train()  # the near-miss: batch statistics
    assert not torch.allclose(bn(a), bn(torch.cat([a, b]))[:1], atol=1e-2)


def test_train_and_eval_modes_give_the_same_output_and_no_running_statistics():
    layer = _layer()
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(layer.train()(x), layer.eval()(x))
    assert set(layer.state_dict()) == {"pop_mean", "pop_gamma", "weight", "bias"}


def test_a_fresh_layer_is_the_identity_up_to_eps():
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(PopulationNorm2d(3)(x), x, atol=1e-4)


def test_gradients_reach_the_population_parameters():
    layer = _layer()
    x = torch.randn(2, 3, 4, 4)
    (layer(x) ** 2).sum().backward()
    for name in ("pop_mean", "pop_gamma", "weight", "bias"):
        g = getattr(layer, name).grad
        assert g is not None and bool((g != 0).all()), name
    # d/dμ of Σ y² with y = (x-μ)/σ·w + b is Σ -2y·w/σ: checked channel 0
    with torch.no_grad():
        y = layer(x)
        want = (-2 * y[:, 0] * layer.weight[0] / torch.sqrt(layer.pop_gamma[0] + 1e-5)).sum()
    assert torch.allclose(layer.pop_mean.grad[0], want, rtol=1e-4)


def test_wrong_input_shape_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"N×3×H×W input, got shape \(2, 4, 5, 5\)"):
        PopulationNorm2d(3)(torch.randn(2, 4, 5, 5))


# the conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_conversion_replaces_every_norm_layer_and_keeps_every_other_weight(norm):
    model = tiny_unet(norm=norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    widths = [
        m.num_channels if norm == "group" else m.num_features
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))
    ]
    rng = torch.get_rng_state()
    out = to_population_norm(model)
    assert out is model
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    pns = [m for m in model.modules() if isinstance(m, PopulationNorm2d)]
    assert [m.num_features for m in pns] == widths and pns
    assert not any(
        isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)) for m in model.modules()
    )
    after = model.state_dict()
    convs = [k for k in before if ".conv" in k or k.startswith("head")]
    assert convs
    for k in convs:  # the seeded convolution weights are untouched
        assert torch.equal(before[k], after[k]), k
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_a_model_without_norm_layers_is_refused_by_name():
    with pytest.raises(PartitionError, match=r"pn: model UNet has no normalization layer"):
        PN().adapt_model(tiny_unet(norm="none"))


def test_a_norm_layer_pn_cannot_replace_exactly_is_refused_by_path_and_type():
    class BatchNormAct(nn.BatchNorm2d):  # like timm's: a norm fused with an activation
        pass

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), BatchNormAct(2))
    with pytest.raises(PartitionError, match=r"layer '2' of type .*BatchNormAct"):
        to_population_norm(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # refused before anything was replaced


def test_pn_refuses_a_model_without_pn_layers_in_partition_and_setup():
    model = tiny_unet()  # BatchNorm, not converted
    with pytest.raises(PartitionError) as err:
        PN().partition(model)
    assert str(err.value) == (
        "pn: model UNet has no Population Normalization layer; pn trains the model its "
        "adapt_model makes (norm layers replaced by PopulationNorm2d) and would otherwise "
        "silently be FedAvg"
    )
    converted = to_population_norm(tiny_unet())
    part = PN().partition(converted)
    assert part == {k: True for k in converted.state_dict()}  # FedAvg over every entry
    assert {k for k in part if k.endswith(("pop_mean", "pop_gamma"))} <= set(
        population_norm_keys(converted)
    )


# the hook and the method through the engine --------------------------------------------------------


def _federation(method, data, seed=0):
    return Federation(data, make_splits(data), method, TINY_MODEL, fast_protocol(rounds=1), seed)


def test_default_hook_is_the_identity_so_other_methods_train_the_seeded_model_itself():
    data = tiny_federation()
    model = tiny_unet()
    assert FedAvg().adapt_model(model) is model
    fed = _federation(FedAvg(), data, seed=3)
    seeded = build_model(TINY_MODEL, data, _seed(3, "init"))
    assert fed.model.state_dict().keys() == seeded.state_dict().keys()
    for k, v in seeded.state_dict().items():
        assert torch.equal(v, fed.model.state_dict()[k]), k


def test_pn_starts_from_the_same_seeded_weights_as_fedavg():
    data = tiny_federation()
    avg, pn = _federation(FedAvg(), data), _federation(PN(), data)
    a, p = avg.model.state_dict(), pn.model.state_dict()
    shared = set(a) & set(p)
    assert any(k.endswith("conv1.weight") for k in shared)
    for k in shared:
        assert torch.equal(a[k], p[k]), k
    assert population_norm_keys(pn.model) and not population_norm_keys(avg.model)


class _RecordingPN(capturing(PN)):
    uploads: dict = {}

    def aggregate(self, uploads, round):
        type(self).uploads = {cid: up for cid, up in uploads.items()}
        return super().aggregate(uploads, round)


def test_one_round_through_the_engine_is_fedavg_over_every_pn_entry():
    data = tiny_federation(sizes=[6, 10, 14])  # unequal sizes: a plain mean would differ
    fed, out = run(data, _RecordingPN(), rounds=1, local_epochs=1)
    assert out.info["status"] == "ok"
    ups = _RecordingPN.uploads
    assert len(ups) == 3
    keys = set(population_norm_keys(fed.model))
    for up in ups.values():
        assert keys <= set(up.entries)  # the PN parameters are shared
    total = sum(up.weight for up in ups.values())
    models = _RecordingPN.models
    for k in next(iter(ups.values())).entries:
        want = sum(up.weight * up.entries[k] for up in ups.values()) / total
        for cid, state in models.items():
            assert torch.allclose(state[k], want, atol=1e-6), (cid, k)
    init = PopulationNorm2d(1)
    trained = [k for k in keys if k.endswith("pop_mean")]
    assert any(
        not torch.equal(models["site0"][k], init.pop_mean.expand_as(models["site0"][k]))
        for k in trained
    )  # the population statistics were trained, not left at 0
    assert out.info["partition_sizes"]["personal"] == 0


def test_pn_is_registered_and_refuses_a_norm_free_suite_model_at_build_time():
    assert get_method("pn") is PN
    data = tiny_federation()
    spec = ModelSpec(name="unet", options={"base": 4, "depth": 2, "norm": "none"})
    with pytest.raises(PartitionError, match="pn: model UNet has no normalization layer"):
        Federation(data, make_splits(data), PN(), spec, fast_protocol(rounds=1), 0)


def test_pn_gives_the_same_run_with_client_state_on_disk():
    """The PN model (a module type of its own) goes through the on-disk store and snapshots."""
    data = tiny_federation(sizes=[6, 10, 14])
    _, mem = run(data, "pn", rounds=2, local_epochs=1)
    _, disk = run(data, "pn", rounds=2, local_epochs=1, store="disk")
    for table in ("rounds", "cases", "comm"):
        pd.testing.assert_frame_equal(getattr(mem, table), getattr(disk, table), check_exact=True)
