"""Baselines that compute what their papers and official code compute (issue 12).

Each test checks the defining property of one fix; each would fail on the implementation it
replaced (LG-FedAvg with a private stem, Ditto with one personal epoch, FedALA overwriting BN
statistics, APFL without the official α regularizer).
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import floating, make_client, run, state_of, tiny_federation, tiny_unet

from pflbench.docs import FIDELITY_END, FIDELITY_START, builtin_methods, fidelity_table
from pflbench.messages import Message
from pflbench.methods.apfl import ALPHA
from pflbench.methods.apfl import PERSONAL as APFL_PERSONAL
from pflbench.models import UNet
from pflbench.partition import partition_sizes
from pflbench.registry import get_method
from pflbench.training import segmentation_loss

FIDELITY_FIELDS = ("official_code", "shares", "personal", "evaluates", "newcomer", "extra_passes")

# LG-FedAvg ---------------------------------------------------------------------------------------


def test_lgfedavg_private_share_on_the_default_unet_is_the_encoder():
    model = UNet(1, 2)  # the default U-Net (base 16, depth 4, BatchNorm)
    partition = get_method("lgfedavg")().partition(model)
    personal = {k for k, v in partition.items() if v is False}
    state = model.state_dict()
    encoder = {k for k in state if k.startswith("encoder.") and state[k].is_floating_point()}
    assert encoder <= personal
    assert {k for k in personal - encoder if state[k].is_floating_point()} == set()
    sizes = partition_sizes(model, partition)
    fraction = sizes["personal"] / (sizes["personal"] + sizes["shared"])
    # 1,181,474 of 1,945,268 entries: the encoder; the old private stem was 0.13 %
    assert sizes["personal"] == 1_181_474 and sizes["shared"] == 763_794
    assert fraction == pytest.approx(0.6074, abs=1e-4)


def test_lgfedavg_body_reading_keeps_all_but_the_head():
    model = UNet(1, 2)
    partition = get_method("lgfedavg")(local="body").partition(model)
    shared = {k for k, v in partition.items() if v is True}
    assert shared == {"head.weight", "head.bias"}


def test_lgfedavg_manifest_records_the_encoder_split():
    _, out = run(tiny_federation(), "lgfedavg", rounds=1)
    model = tiny_unet()
    state = model.state_dict()
    encoder = sum(v.numel() for k, v in state.items() if k.startswith("encoder."))
    # integer buffers (num_batches_tracked) are local under every method
    ints = sum(
        v.numel()
        for k, v in state.items()
        if not k.startswith("encoder.") and not v.is_floating_point()
    )
    assert out.info["partition_sizes"]["personal"] == encoder + ints


# Ditto -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("work", [{"local_epochs": 2}, {"local_epochs": None, "local_steps": 3}])
def test_ditto_personal_budget_equals_the_global_one(work):
    _, out = run(tiny_federation(), "ditto", rounds=2, **work)
    budget = out.info["budget"]
    assert budget["personal"] == budget["local"] > 0
    assert not any("personal_epochs" in d for d in out.info["deviations"])


def test_ditto_smaller_personal_budget_is_declared_as_a_deviation():
    _, out = run(
        tiny_federation(), get_method("ditto")(personal_epochs=1), rounds=1, local_epochs=2
    )
    budget = out.info["budget"]
    assert budget["personal"] * 2 == budget["local"]
    assert any("personal_epochs = 1" in d for d in out.info["deviations"])


def test_ditto_personal_epochs_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="personal_epochs"):
        get_method("ditto")(personal_epochs=0)
    with pytest.raises(ValueError, match="personal_epochs"):
        get_method("ditto")(personal_epochs=1.5)


# FedALA ------------------------------------------------------------------------------------------


def test_fedala_receive_leaves_bn_running_statistics_bit_identical():
    method = get_method("fedala")(p=2)
    client = make_client(tiny_unet(0), lr=3e-2)
    client.fit()  # the client's model and its BN statistics drift from the global model
    glob = state_of(tiny_unet(1))
    with torch.no_grad():  # make the global statistics clearly different
        for k in glob:
            if k.endswith(("running_mean", "running_var")):
                glob[k] = glob[k] + 5.0
    local = state_of(client.model)
    method.receive(client, Message(entries=floating(glob)))
    after = state_of(client.model)
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert torch.equal(after[k], local[k]), k
    # and the lower parameters did take the global values
    assert torch.equal(after["encoder.0.conv1.weight"], glob["encoder.0.conv1.weight"])


def test_fedala_never_uploads_or_averages_buffers():
    partition = get_method("fedala")().partition(tiny_unet())
    params = {n for n, _ in tiny_unet().named_parameters()}
    assert {k for k, v in partition.items() if v} == params


# APFL --------------------------------------------------------------------------------------------


def _hand_alpha_step(w, v, x, y, alpha, alpha_lr, reg):
    """One α step written from the definition: ∂f/∂α of the output mixture, plus reg·α."""
    w_out = w(x).detach()
    v_out = v(x).detach()
    mix = (alpha * v_out + (1 - alpha) * w_out).requires_grad_(True)
    (g,) = torch.autograd.grad(segmentation_loss(mix, y), mix)
    d_alpha = float((g * (v_out - w_out)).sum())
    return min(1.0, max(0.0, alpha - alpha_lr * (d_alpha + reg * alpha)))


@pytest.mark.parametrize("reg", [0.02, 5.0])
def test_apfl_alpha_follows_the_official_update_on_one_step(reg):
    torch.manual_seed(0)
    client = make_client(tiny_unet(0), steps=1, epochs=None, batch_size=64, shuffle=False)
    v = tiny_unet(3)
    client.state[APFL_PERSONAL] = state_of(v)
    alpha0, lr = 0.4, 0.05
    client.state[ALPHA] = alpha0
    w_copy, v_copy = tiny_unet(0).train(), tiny_unet(3).train()
    data = client.train_data
    expected = _hand_alpha_step(w_copy, v_copy, data.images, data.labels, alpha0, lr, reg)
    get_method("apfl")(alpha_lr=lr, alpha_reg=reg).local_update(client)
    assert client.state[ALPHA] == pytest.approx(expected, abs=1e-6)
    # the regularizer is really in the step: without it α lands elsewhere
    without = _hand_alpha_step(
        tiny_unet(0).train(), tiny_unet(3).train(), data.images, data.labels, alpha0, lr, 0.0
    )
    assert abs(without - expected) == pytest.approx(lr * reg * alpha0, rel=1e-4)


# the fidelity table ------------------------------------------------------------------------------


def test_every_builtin_method_declares_its_fidelity():
    methods = builtin_methods()
    assert len(methods) >= 14
    for name, cls in methods.items():
        assert "official_code" in vars(cls), f"{name} inherits its official_code"
        assert "newcomer" in vars(cls), f"{name} does not declare what an unseen site gets"
        for field in FIDELITY_FIELDS:
            assert getattr(cls, field).strip(), f"{name}: empty {field}"
        assert isinstance(cls.deviations, tuple), name


def test_readme_fidelity_table_lists_every_method_and_deviation():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split(FIDELITY_START, 1)[1].split(FIDELITY_END, 1)[0].strip()
    assert block == fidelity_table()
    for name, cls in builtin_methods().items():
        assert f"| `{name}` |" in block, name
        for d in cls.deviations:
            assert d in block, (name, d)
