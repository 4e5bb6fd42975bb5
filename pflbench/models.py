"""Segmentation models: a plain PyTorch U-Net (``unet``) and a timm-encoder U-Net (``unet-timm``).

Every model is built as ``Model(in_channels, out_channels, **options)`` and returns per-pixel
logits ``N×out_channels×H×W`` for an input ``N×in_channels×H×W`` (same H, W). Federated methods
never look inside a model by name substrings; they rely on what the model declares:

``head_path``
    module path of the prediction head, a 1×1 convolution (FedPer, FedRep, FedBABU, FedRoD).
``encoder_path``
    module path of the encoder (the representation that LG-FedAvg keeps private): ``"encoder"``
    for both U-Nets. Everything outside it and the head is the decoder (``decoder``).
``feature_forward(x)`` and ``feature_channels``
    the body: ``model.head(model.feature_forward(x))`` is exactly ``model(x)``, and
    ``feature_channels`` is the channel count entering the head, so that a method can attach
    extra heads to the body features (FedRoD).

Norm layers are selected by type with :func:`norm_layer_types` (FedBN, SiloBN, FedAP).

timm (and torchvision) are optional: they are imported inside :class:`TimmUNet` only, never when
this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNet",
    "TimmUNet",
    "ConvBlock",
    "count_parameters",
    "norm_layer_types",
]

Norm = Literal["batch", "instance", "group", "none"]
_NORMS: tuple[str, ...] = ("batch", "instance", "group", "none")


def norm_layer_types() -> tuple[type[nn.Module], ...]:
    """The module types that count as normalization layers (FedBN, SiloBN select by these).

    Subclasses match too (``isinstance``), e.g. timm's ``BatchNormAct2d`` or ``LayerNorm2d``.
    """
    return (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.GroupNorm,
        nn.LayerNorm,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries of ``model`` (buffers such as BN running stats excluded).

    Shared parameters are counted once. With ``trainable_only`` only ``requires_grad`` ones.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_input(model: str, x: torch.Tensor, in_channels: int, multiple: int, why: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects a 4-D input N×C×H×W, got a tensor of shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{model} was built for {in_channels} input channel(s), got an input with "
            f"{x.shape[1]} channel(s) (shape {tuple(x.shape)})"
        )
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % multiple or w % multiple:
        raise ValueError(
            f"{model}: input size {h}×{w} (H×W) is not supported: H and W must be multiples of "
            f"{multiple} ({why}); pad or resize the images, e.g. to "
            f"{_round_up(h, multiple)}×{_round_up(w, multiple)}"
        )


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _group_count(channels: int, max_groups: int = 8) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _make_norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if norm == "none":
        return None
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


class ConvBlock(nn.Sequential):
    """(3×3 conv → norm → ReLU) × 2, then optional ``Dropout2d``.

    Convolutions carry a bias only when there is no norm layer (a bias before a norm layer is
    redundant). Children: ``conv1, norm1, act1, conv2, norm2, act2[, drop]`` (no ``norm*`` when
    ``norm="none"``).
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        bias = norm == "none"
        for i, cin in ((1, in_ch), (2, out_ch)):
            self.add_module(f"conv{i}", nn.Conv2d(cin, out_ch, 3, padding=1, bias=bias))
            layer = _make_norm(norm, out_ch)
            if layer is not None:
                self.add_module(f"norm{i}", layer)
            self.add_module(f"act{i}", nn.ReLU(inplace=True))
        if dropout > 0:
            self.add_module("drop", nn.Dropout2d(dropout))


class _Down(nn.Module):
    """Encoder stage below the stem: 2×2 max-pool, then a :class:`ConvBlock`."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.block = ConvBlock(in_ch, out_ch, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class _Up(nn.Module):
    """Decoder stage: up-sample ×2 halving channels, concatenate the skip, :class:`ConvBlock`."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float, mode: str):
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, kernel_size=1),
            )
        else:
            raise ValueError(f"up must be 'transpose' or 'bilinear', got {mode!r}")
        self.block = ConvBlock(2 * out_ch, out_ch, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Plain PyTorch U-Net (Ronneberger et al., MICCAI 2015, arXiv 1505.04597), 2-D.

    ``depth`` is the number of 2×2 down-sampling steps. The encoder has ``depth + 1`` stages with
    ``base·2**i`` channels (i = 0 … depth; the last one is the bottleneck); the decoder has
    ``depth`` stages, each up-sampling ×2 (transposed 2×2 conv by default, or bilinear + 1×1 conv
    with ``up="bilinear"``), concatenating the encoder skip of the same resolution and applying a
    :class:`ConvBlock`; the head is a 1×1 conv to ``out_channels`` logits. The defaults (base 16,
    depth 4, BatchNorm) give 1,942,306 parameters for 1 input and 2 output channels (the original
    U-Net layout at a quarter of its width; ≈1.9 M, data.md §4).

    Module tree (top-level children and paths that methods use):

    - ``encoder`` (``encoder_path``): ``nn.ModuleList``; ``encoder.0`` is the stem (a
      :class:`ConvBlock` at full resolution); ``encoder.i`` (i ≥ 1) = ``pool`` + ``block``.
    - ``decoder``: ``nn.ModuleList`` of ``depth`` stages, deepest first; each = ``up`` + ``block``.
    - ``head``: ``nn.Conv2d(base, out_channels, 1)`` (``head_path``).

    Options: ``norm`` = ``"batch"`` (BatchNorm2d), ``"instance"`` (InstanceNorm2d, affine, no
    running statistics), ``"group"`` (GroupNorm with up to 8 groups) or ``"none"`` (no
    normalization layer at all, convolutions then carry biases). ``dropout`` > 0 adds
    ``Dropout2d(dropout)`` at the end of every conv block. ``up="bilinear"`` is not
    deterministic in backward on CUDA (PyTorch raises under ``use_deterministic_algorithms``).

    Input H and W must be multiples of ``2**depth``.
    """

    name: ClassVar[str] = "unet"
    description: ClassVar[str] = (
        "Plain PyTorch U-Net: conv-norm-ReLU×2 blocks, max-pool down, transposed-conv up, skip "
        "connections, 1×1 conv head (base 16, depth 4, BatchNorm: ~1.9 M parameters)"
    )
    head_path: ClassVar[str] = "head"
    encoder_path: ClassVar[str] = "encoder"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base: int = 16,
        depth: int = 4,
        norm: Norm = "batch",
        dropout: float = 0.0,
        up: Literal["transpose", "bilinear"] = "transpose",
    ):
        super().__init__()
        for label, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("base", base, 1),
            ("depth", depth, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"UNet: {label} must be an integer >= {low}, got {value!r}")
        if norm not in _NORMS:
            raise ValueError(f"UNet: norm must be one of {_NORMS}, got {norm!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout!r}")
        if up not in ("transpose", "bilinear"):
            raise ValueError(f"UNet: up must be 'transpose' or 'bilinear', got {up!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.size_multiple = 2**depth
        channels = [base * 2**i for i in range(depth + 1)]

        stages: list[nn.Module] = [ConvBlock(in_channels, channels[0], norm, dropout)]
        stages += [_Down(channels[i - 1], channels[i], norm, dropout) for i in range(1, depth + 1)]
        self.encoder = nn.ModuleList(stages)
        self.decoder = nn.ModuleList(
            _Up(channels[i], channels[i - 1], norm, dropout, up) for i in range(depth, 0, -1)
        )
        self.feature_channels = channels[0]
        self.head = nn.Conv2d(self.feature_channels, out_channels, kernel_size=1)

    def feature_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Body features (``N×feature_channels×H×W``) entering the head."""
        _check_input(
            f"UNet(depth={self.depth})",
            x,
            self.in_channels,
            self.size_multiple,
            f"2**depth, {self.depth} down-sampling steps",
        )
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_forward(x))


# ----------------------------------------------------------------------------------------------
# timm encoder + U-Net decoder

_TIMM_MISSING = (
    'the "unet-timm" model needs timm, which is not installed: pip install "pflbench[timm]"'
)
_HF_PREFIXES = ("hf-hub:", "hf_hub:")


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force Hugging Face Hub offline mode for the duration of the block (restored after).

    ``HF_HUB_OFFLINE`` is read by huggingface_hub when it is imported, so the already-imported
    constant is patched as well as the environment. Not thread-safe (process-global state).
    """
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants: Any = None
    old_const: Any = None
    try:
        import huggingface_hub.constants as constants  # type: ignore[no-redef]

        old_const = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except Exception:  # huggingface_hub missing or without that constant
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _weights_error(encoder: str, detail: str) -> RuntimeError:
    return RuntimeError(
        f"unet-timm: pretrained weights for encoder {encoder!r} are not available offline "
        f"({detail}). pflbench never downloads weights during a run: they must already be in "
        "the local cache (Hugging Face hub cache, see HF_HOME / HF_HUB_CACHE, loaded with "
        "HF_HUB_OFFLINE=1; or the torch hub cache, see TORCH_HOME). Fetch them once on a "
        "machine with network access (e.g. timm.create_model(name, pretrained=True)) and copy "
        "the cache, or set pretrained: false."
    )


def _cached_weights(encoder: str) -> tuple[bool, str]:
    """Whether timm would find ``encoder``'s pretrained weights locally, and where it looked.

    Mirrors timm's choice of source (Hugging Face hub first when ``huggingface_hub`` is
    installed, then the torch hub URL cache, or a local file). Returns ``(True, where)`` when
    found; ``(False, why)`` otherwise. Never touches the network.
    """
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(encoder)
    except Exception as exc:  # pragma: no cover - depends on the timm version
        return False, f"cannot resolve timm's pretrained config to check the cache ({exc})"
    if cfg is None:
        return False, f"timm knows no pretrained weights for {encoder!r}"
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k, None)
    if get("state_dict") is not None:
        return True, "state dict in the config"
    if get("file"):
        path = Path(os.path.expanduser(str(get("file"))))
        return path.is_file(), f"file {path}"
    hf_hub_id, url = get("hf_hub_id"), get("url")
    looked: list[str] = []
    hf_available = False
    try:
        import huggingface_hub
        from huggingface_hub import try_to_load_from_cache

        hf_available = True
    except ImportError:
        pass
    if hf_hub_id and hf_available:
        repo, _, revision = str(hf_hub_id).partition("@")
        names = [get("hf_hub_filename")] if get("hf_hub_filename") else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return True, found
        looked.append(
            f"Hugging Face repo {repo} in {huggingface_hub.constants.HF_HUB_CACHE} (not cached)"
        )
        # timm uses the hub when huggingface_hub is installed: the URL cache would be ignored
        return False, "; ".join(looked)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url).split("?")[0])
        if path.is_file():
            return True, str(path)
        looked.append(f"{path} (not cached)")
    return False, "; ".join(looked) or "no weight source in the pretrained config"


class _Stage(nn.Module):
    """TimmUNet decoder stage: nearest up-sampling to the skip's size, concat, :class:`ConvBlock`."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.block = ConvBlock(in_ch + skip_ch, out_ch, "batch")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]):
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class TimmUNet(nn.Module):
    """U-Net decoder over the feature pyramid of a timm encoder (the segmentation_models_pytorch
    layout).

    ``encoder`` is ``timm.create_model(encoder, features_only=True, pretrained=pretrained,
    in_chans=in_channels)``. The decoder (``decoder``: ``nn.ModuleList``, deepest first) starts
    from the deepest feature map; each stage up-samples (nearest) to the next shallower feature
    map, concatenates it and applies a :class:`ConvBlock` (BatchNorm). When the shallowest
    feature map has stride > 1 (ResNets, EfficientNets: 2; ConvNeXt: 4) a last stage up-samples
    to the input size without a skip, so the output has the input's H×W. ``decoder_channels``
    gives each stage's width (length = number of stages; default ``16·2**k`` down to 16, i.e.
    (256, 128, 64, 32, 16) for resnet18). ``head`` is a 1×1 conv to ``out_channels``.

    ``encoder_path`` is ``"encoder"``: the whole timm feature network (LG-FedAvg's private
    representation).

    Input H and W must be multiples of the encoder's total stride (32 for the usual CNN encoders).

    ``pretrained=True`` never reaches the network: the weights must already be in the local
    cache, otherwise a RuntimeError says so at once. timm is imported here, lazily.
    """

    name: ClassVar[str] = "unet-timm"
    description: ClassVar[str] = (
        "U-Net decoder over a timm encoder (features_only; e.g. resnet18, efficientnet_b0); "
        'inputs multiple of 32; needs pip install "pflbench[timm]"'
    )
    head_path: ClassVar[str] = "head"
    encoder_path: ClassVar[str] = "encoder"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        encoder: str = "resnet18",
        pretrained: bool = False,
        decoder_channels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"unet-timm: {label} must be an integer >= 1, got {value!r}")
        try:
            import timm
        except ImportError as exc:
            raise ImportError(_TIMM_MISSING) from exc

        is_hub_name = encoder.startswith(_HF_PREFIXES)
        if not is_hub_name and not timm.is_model(encoder):
            close = timm.list_models(f"*{encoder.split('.')[0][:8]}*")[:8]
            raise ValueError(
                f"unet-timm: timm has no model named {encoder!r}"
                + (f"; similar names: {', '.join(close)}" if close else "")
            )
        if pretrained and not is_hub_name:
            found, where = _cached_weights(encoder)
            if not found:
                raise _weights_error(encoder, where)
        try:
            with _hf_offline():
                self.encoder = timm.create_model(
                    encoder, features_only=True, pretrained=pretrained, in_chans=in_channels
                )
        except Exception as exc:
            if pretrained or is_hub_name:
                raise _weights_error(encoder, f"{type(exc).__name__}: {exc}") from exc
            raise

        info = self.encoder.feature_info
        enc_channels: list[int] = list(info.channels())
        reductions: list[int] = list(info.reduction())
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder_name = encoder
        self.size_multiple = max(reductions)

        n_stages = len(enc_channels) - 1 + (1 if reductions[0] > 1 else 0)
        if decoder_channels is None:
            decoder_channels = tuple(16 * 2 ** (n_stages - 1 - i) for i in range(n_stages))
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != n_stages or min(decoder_channels) < 1:
            raise ValueError(
                f"unet-timm: encoder {encoder!r} needs {n_stages} positive decoder_channels "
                f"(feature strides {reductions}), got {decoder_channels}"
            )
        self.decoder_channels = decoder_channels

        stages = []
        x_ch = enc_channels[-1]
        skip_channels: list[int | None] = list(reversed(enc_channels[:-1]))
        if reductions[0] > 1:
            skip_channels.append(None)
        for out_ch, skip_ch in zip(decoder_channels, skip_channels, strict=True):
            stages.append(_Stage(x_ch, skip_ch or 0, out_ch))
            x_ch = out_ch
        self.decoder = nn.ModuleList(stages)
        self.feature_channels = decoder_channels[-1]
        self.head = nn.Conv2d(self.feature_channels, out_channels, kernel_size=1)

    def feature_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Body features (``N×feature_channels×H×W``) entering the head."""
        _check_input(
            f"unet-timm({self.encoder_name})",
            x,
            self.in_channels,
            self.size_multiple,
            "the encoder's total stride",
        )
        size = x.shape[-2:]
        features = list(self.encoder(x))
        x = features.pop()
        for stage in self.decoder:
            skip = features.pop() if features else None
            x = stage(x, skip, skip.shape[-2:] if skip is not None else size)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_forward(x))
