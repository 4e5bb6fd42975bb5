"""Tests of pflbench.models: the U-Net, the timm U-Net and the contract methods rely on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pflbench.models import TimmUNet, UNet, count_parameters, norm_layer_types

DEFAULT_UNET_PARAMS = 1_942_306  # UNet(1, 2): base 16, depth 4, BatchNorm


def _has_norm(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, norm_layer_types())}


# ---------------------------------------------------------------------------------------------
# UNet


@pytest.mark.parametrize(
    ("in_ch", "out_ch", "size", "options"),
    [
        (1, 2, (64, 64), {}),
        (3, 4, (32, 80), {}),
        (1, 1, (128, 48), {}),
        (2, 3, (12, 20), {"depth": 2}),
        (4, 5, (64, 32), {"base": 8, "depth": 5}),
        (3, 1, (192, 384), {"depth": 5}),  # the gland task's H×W, the benchmark's 5 levels
        (1, 3, (32, 32), {"up": "bilinear"}),
        (1, 3, (32, 32), {"norm": "instance", "dropout": 0.2}),
    ],
)
def test_unet_output_shape(in_ch, out_ch, size, options):
    model = UNet(in_ch, out_ch, **options).eval()
    x = torch.randn(2, in_ch, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, out_ch, *size)
    assert y.dtype == torch.float32


def test_default_unet_parameter_count():
    n = count_parameters(UNet(1, 2))
    assert n == DEFAULT_UNET_PARAMS
    assert abs(n - 1.9e6) <= 0.1 * 1.9e6
    # the head depends on in/out channels only through the stem conv and the 1x1 head
    assert count_parameters(UNet(3, 4)) == n + 2 * 9 * 16 + 2 * (16 + 1)


def test_count_parameters_trainable_only():
    model = UNet(1, 2)
    model.head.requires_grad_(False)
    head = sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - head


def test_unet_named_parts():
    model = UNet(1, 2)
    assert [name for name, _ in model.named_children()] == ["encoder", "decoder", "head"]
    assert isinstance(model.encoder, nn.ModuleList)
    assert isinstance(model.decoder, nn.ModuleList)
    assert len(model.encoder) == 5 and len(model.decoder) == 4
    assert UNet.head_path == "head" and UNet.encoder_path == "encoder"
    assert model.get_submodule(model.head_path) is model.head
    assert model.get_submodule(model.encoder_path) is model.encoder
    # the stem is the full-resolution block that sees the input channels
    assert model.encoder[0].conv1.in_channels == 1
    assert UNet.name == "unet" and UNet.description


@pytest.mark.parametrize("out_ch", [1, 2, 5])
def test_unet_head_is_1x1_conv(out_ch):
    model = UNet(3, out_ch, base=8)
    head = model.head
    assert isinstance(head, nn.Conv2d)
    assert head.kernel_size == (1, 1)
    assert head.out_channels == out_ch
    assert head.in_channels == model.feature_channels == 8


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_unet_feature_forward_then_head_equals_forward(norm):
    torch.manual_seed(0)
    model = UNet(2, 3, norm=norm, dropout=0.1)
    # move BN statistics away from their initial values so eval mode is not trivial
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 2, 32, 32))
    model.eval()
    x = torch.randn(2, 2, 32, 48)
    with torch.no_grad():
        features = model.feature_forward(x)
        assert features.shape == (2, model.feature_channels, 32, 48)
        assert torch.equal(model.head(features), model(x))


def test_unet_norm_variants():
    assert _has_norm(UNet(1, 2)) == {nn.BatchNorm2d}
    assert _has_norm(UNet(1, 2, norm="group")) == {nn.GroupNorm}
    instance = UNet(1, 2, norm="instance")
    assert _has_norm(instance) == {nn.InstanceNorm2d}
    for m in instance.modules():
        if isinstance(m, nn.InstanceNorm2d):
            assert m.affine and not m.track_running_stats
    none = UNet(1, 2, norm="none")
    assert not any(isinstance(m, norm_layer_types()) for m in none.modules())
    assert not _has_norm(none)
    # without norm layers the convolutions carry their biases
    assert all(m.bias is not None for m in none.modules() if isinstance(m, nn.Conv2d))
    # group norm uses groups that divide odd widths too
    odd = UNet(1, 2, base=12, norm="group")
    assert all(
        m.num_channels % m.num_groups == 0 for m in odd.modules() if isinstance(m, nn.GroupNorm)
    )


def test_norm_layer_types():
    types = norm_layer_types()
    for t in (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.GroupNorm,
        nn.LayerNorm,
    ):
        assert t in types
    assert not isinstance(nn.Conv2d(1, 1, 1), types)


def test_unet_dropout_module():
    assert not any(isinstance(m, nn.Dropout2d) for m in UNet(1, 2).modules())
    assert any(isinstance(m, nn.Dropout2d) for m in UNet(1, 2, dropout=0.3).modules())


@pytest.mark.parametrize(("h", "w"), [(50, 64), (64, 40), (8, 8)])
def test_unet_bad_size_names_the_size(h, w):
    model = UNet(1, 2)
    with pytest.raises(ValueError, match=f"{h}×{w}") as info:
        model(torch.randn(1, 1, h, w))
    assert "16" in str(info.value)


def test_unet_bad_input_errors():
    model = UNet(1, 2)
    with pytest.raises(ValueError, match="3 channel"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(1, 32, 32))


@pytest.mark.parametrize(
    "options",
    [{"norm": "layer"}, {"depth": 0}, {"base": 0}, {"dropout": 1.0}, {"up": "nearest"}],
)
def test_unet_bad_options(options):
    with pytest.raises(ValueError):
        UNet(1, 2, **options)


def test_unet_init_is_deterministic():
    torch.manual_seed(123)
    a = UNet(1, 2).state_dict()
    torch.manual_seed(123)
    b = UNet(1, 2).state_dict()
    torch.manual_seed(124)
    c = UNet(1, 2).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unet_every_parameter_gets_a_gradient():
    model = UNet(1, 3, base=8, depth=3)
    loss = nn.functional.cross_entropy(
        model(torch.randn(2, 1, 32, 32)), torch.randint(0, 3, (2, 32, 32))
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_models_module_does_not_import_timm():
    code = (
        "import sys, pflbench.models; "
        "bad = [m for m in ('timm', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_entry_points_name_the_models():
    from importlib.metadata import entry_points

    found = {e.name: e.load() for e in entry_points(group="pflbench.models")}
    assert found.get("unet") is UNet
    assert found.get("unet-timm") is TimmUNet


# ---------------------------------------------------------------------------------------------
# TimmUNet


def test_timm_unet_says_how_to_install_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "pflbench\[timm\]"'):
        TimmUNet(1, 2)


@pytest.fixture(scope="module")
def timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"timm is not installed ({exc}); pip install 'pflbench[timm]'")
    return timm


@pytest.mark.parametrize("in_ch", [1, 3])
def test_timm_unet_resnet18_shape_and_contract(timm, in_ch):
    torch.manual_seed(0)
    model = TimmUNet(in_ch, 4, encoder="resnet18", pretrained=False)
    assert [name for name, _ in model.named_children()] == ["encoder", "decoder", "head"]
    assert TimmUNet.name == "unet-timm" and TimmUNet.description
    assert model.head_path == "head" and model.encoder_path == "encoder"
    assert model.get_submodule(model.encoder_path).conv1.in_channels == in_ch
    assert isinstance(model.head, nn.Conv2d) and model.head.kernel_size == (1, 1)
    assert model.head.out_channels == 4 and model.head.in_channels == model.feature_channels
    assert model.decoder_channels == (256, 128, 64, 32, 16)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, in_ch, 64, 64))
    model.eval()
    x = torch.randn(2, in_ch, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 4, 64, 64)
        assert torch.equal(model.head(model.feature_forward(x)), y)
    with torch.no_grad():
        assert model(torch.randn(1, in_ch, 96, 32)).shape == (1, 4, 96, 32)
        assert model(torch.randn(1, in_ch, 192, 384)).shape == (1, 4, 192, 384)


@pytest.mark.parametrize("encoder", ["efficientnet_b0", "convnext_atto"])
def test_timm_unet_other_encoders(timm, encoder):
    model = TimmUNet(1, 2, encoder=encoder, decoder_channels=None).eval()
    assert model.get_submodule(model.encoder_path) is model.encoder
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_timm_unet_custom_decoder_channels(timm):
    model = TimmUNet(1, 2, decoder_channels=(64, 32, 32, 16, 8)).eval()
    assert model.feature_channels == 8
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="needs 5"):
        TimmUNet(1, 2, decoder_channels=(64, 32))


def test_timm_unet_bad_size_and_name(timm):
    model = TimmUNet(1, 2)
    with pytest.raises(ValueError, match="48×64") as info:
        model(torch.randn(1, 1, 48, 64))
    assert "32" in str(info.value)
    with pytest.raises(ValueError, match="no model named"):
        TimmUNet(1, 2, encoder="resnet_does_not_exist")


def test_timm_unet_init_is_deterministic(timm):
    torch.manual_seed(7)
    a = TimmUNet(1, 2).state_dict()
    torch.manual_seed(7)
    b = TimmUNet(1, 2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# Offline behaviour of pretrained=True, checked in a fresh interpreter whose caches point to an
# empty temporary folder and whose sockets refuse to connect (and say so on stderr). The
# subprocess timeout is a hang guard, not a performance bound: a code path that waited on the
# network would be stopped there and reported, instead of blocking the test run.

_NETWORK_GUARD = """
import socket, sys
def _refuse(*args, **kwargs):
    sys.stderr.write("NETWORK-ATTEMPT %r\\n" % (args[:2],))
    sys.stderr.flush()
    raise OSError("network access attempted in an offline test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""
_HANG_GUARD_S = 180


def _run_offline(script: str, cache: Path) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE", "TORCH_HOME", "TRANSFORMERS_OFFLINE"))
    }
    env.update(HF_HOME=str(cache / "hf"), TORCH_HOME=str(cache / "torch"))
    code = _NETWORK_GUARD + textwrap.dedent(script)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=_HANG_GUARD_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"no answer after {_HANG_GUARD_S}s: the offline path hangs (waiting on the network?)\n"
            f"stderr: {exc.stderr!r}"
        )
    assert "NETWORK-ATTEMPT" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_timm_unet_pretrained_without_cache_fails_clearly(timm, tmp_path):
    proc = _run_offline(
        """
        import os
        from pflbench.models import TimmUNet
        for encoder in ("resnet18", "hf-hub:timm/resnet18.a1_in1k"):
            try:
                TimmUNet(3, 2, encoder=encoder, pretrained=True)
            except RuntimeError as exc:
                print("ERROR:", exc)
            else:
                raise SystemExit("no error for " + encoder)
        # the offline switch is put back as it was
        assert os.environ.get("HF_HUB_OFFLINE") is None
        import huggingface_hub.constants as c
        assert not c.HF_HUB_OFFLINE
        """,
        tmp_path,
    )
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2
    for message in errors:
        assert "local cache" in message
        assert "HF_HUB_OFFLINE" in message and "TORCH_HOME" in message
        assert "pretrained: false" in message


def test_timm_unet_pretrained_loads_cached_weights_offline(timm, tmp_path):
    pytest.importorskip("safetensors", reason="timm loads hub weights with safetensors")
    proc = _run_offline(
        """
        import os, torch, timm
        from safetensors.torch import save_file
        from pflbench.models import TimmUNet
        repo = os.path.join(os.environ["HF_HOME"], "hub", "models--timm--resnet18.a1_in1k")
        commit = "0" * 40
        os.makedirs(os.path.join(repo, "refs"))
        os.makedirs(os.path.join(repo, "snapshots", commit))
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(commit)
        torch.manual_seed(1)
        weights = timm.create_model("resnet18", pretrained=False).state_dict()
        weights["conv1.weight"].fill_(0.25)
        save_file(weights, os.path.join(repo, "snapshots", commit, "model.safetensors"))
        torch.manual_seed(2)
        model = TimmUNet(3, 2, encoder="resnet18", pretrained=True).eval()
        assert torch.equal(model.encoder.conv1.weight, weights["conv1.weight"])
        assert torch.equal(model.encoder.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
        print("LOADED")
        """,
        tmp_path,
    )
    assert "LOADED" in proc.stdout
