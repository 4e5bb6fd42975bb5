"""Synthetic multi-site segmentation data: seeded, deterministic, fast, no files needed.

Three flavours mimic the real tasks (``reference/data.md`` §3):

- ``fundus``: RGB optic-disc/cup crops; classes background / disc / cup, structures
  ``disc = {1, 2}`` and ``cup = {2}`` (the cup lies inside the disc); one case per image.
- ``prostate``: one-channel MRI-like slices; a case is a volume of ``slices_per_case`` consecutive
  slices whose organ changes smoothly; structure ``prostate = {1}``.
- ``polyp``: RGB endoscopy-like frames with one blob-shaped polyp; one case per image.

Each site has two **independent** families of shift, each scaled by its own knob
(0 = every site draws from the same distribution for that family):

- **appearance** (``appearance_shift``), the acquisition chain of :func:`site_acquisition` /
  :func:`apply_acquisition`: colour cast, low-frequency bias field (MRI) or vignetting (camera),
  blur, noise (Rician for MRI, Poisson–Gaussian for cameras), gamma / contrast / brightness curve,
  quantisation (JPEG-like 8×8 DCT for cameras). Low-frequency parts are what Fourier-amplitude
  transfer can remove; the high-frequency parts (blur, noise, JPEG) and label shift it cannot.
- **label** (``label_shift``): object size, shape irregularity, position and (fundus) the
  cup-to-disc ratio; the rate of empty images scales around ``empty_fraction``.

A third, optional family changes only the **annotation** (``annotation_shift``, default 0): each
site's annotators draw every boundary a site-specific number of pixels outside (dilated) or
inside (eroded) the object's true boundary, as sites with different delineation protocols do.
The images are untouched, so it is a pure shift of P(label | image), the premise of
personalized heads; the label-shift family changes P(label) and the images with it.

The two families use separate random streams derived from ``seed`` (``numpy.random.SeedSequence``),
so changing ``appearance_shift`` leaves every label bitwise unchanged, and changing
``label_shift`` leaves every site's acquisition parameters unchanged. Per-site parameters form a
Latin hypercube over the sites: for every parameter the K sites take K different strata, in an
order drawn from the seed, so that sites differ in every parameter.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.fft
import torch
from scipy.ndimage import gaussian_filter

from pflbench.data import DataError, FederatedData, SiteData
from pflbench.dataset import Dataset
from pflbench.datasets._io import write_cache_file

__all__ = [
    "AcquisitionParams",
    "GENERATOR_VERSION",
    "Synthetic",
    "apply_acquisition",
    "site_acquisition",
]

#: Bumped whenever the generated data change for the same options (invalidates caches).
GENERATOR_VERSION = 1

Modality = Literal["mri", "camera"]

_FLAVOURS: dict[str, dict[str, Any]] = {
    "fundus": {
        "channels": 3,
        "modality": "camera",
        "classes": ["background", "disc", "cup"],
        "structures": {"disc": [1, 2], "cup": [2]},
        "case_level": "image",
        # Fed-Fundus has 101 / 159 / 400 / 400 images; scaled down.
        "images": [12, 18, 30, 30],
    },
    "prostate": {
        "channels": 1,
        "modality": "mri",
        "classes": ["background", "prostate"],
        "structures": {"prostate": [1]},
        "case_level": "volume",
        # Fed-Prostate has 30 / 30 / 19 / 13 / 12 / 12 cases; scaled down (cases, not slices).
        "cases": [8, 8, 6, 5, 4, 4],
    },
    "polyp": {
        "channels": 3,
        "modality": "camera",
        "classes": ["background", "polyp"],
        "structures": {"polyp": [1]},
        "case_level": "image",
        # Kvasir 1000 / ETIS 196 / ColonDB 380 / ClinicDB 612; scaled down.
        "images": [30, 10, 16, 24],
    },
}

# Random streams (SeedSequence spawn keys); separate so the shift families stay independent.
_STREAM_LABEL_DESIGN = 1
_STREAM_ACQ_DESIGN = 2
_STREAM_CONTENT = 3
_STREAM_ACQ_NOISE = 4
_STREAM_ANNOTATION = 5

# ---------------------------------------------------------------------------------------------
# Acquisition chain (public: reused by "real anatomy, synthetic sites" datasets)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquisitionParams:
    """One site's acquisition chain. The defaults are the identity (no change, no noise).

    Applied by :func:`apply_acquisition` in this order: colour gains (cast) → low-frequency field
    (MRI bias field ``exp(field_tilt·(cos a·x + sin a·y) + field_curve·(x²+y²−2/3))`` and/or camera
    vignetting ``1 − vignette·|p−c|²/2``) → saturation to [0, 1] → Gaussian blur (σ =
    ``blur``·min(H, W) pixels) → noise → intensity curve ``((x^gamma) − ½)·contrast + ½ +
    brightness`` → quantisation (JPEG-like, ``jpeg_quality``; or ``bit_depth`` levels) → [0, 1].
    Coordinates x, y run over [−1, 1] across the image.
    """

    modality: str = "camera"
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    field_tilt: float = 0.0
    field_angle: float = 0.0
    field_curve: float = 0.0
    vignette: float = 0.0
    vignette_centre: tuple[float, float] = (0.0, 0.0)
    blur: float = 0.0
    noise: Literal["none", "rician", "poisson-gaussian"] = "none"
    noise_sigma: float = 0.0
    photon_peak: float | None = None
    jpeg_quality: int | None = None
    bit_depth: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ACQ_DRAWS = (
    "gamma",
    "contrast",
    "brightness",
    "gain_r",
    "gain_g",
    "gain_b",
    "field_tilt",
    "field_angle",
    "field_curve",
    "vignette",
    "vignette_x",
    "vignette_y",
    "blur",
    "noise_sigma",
    "photon_peak",
    "jpeg_quality",
)


def _latin_positions(
    k: int, n_sites: int, names: tuple[str, ...], rng: np.random.Generator
) -> dict[str, float]:
    """Site k's position in [0, 1) for every parameter of a Latin hypercube over the sites.

    For each name the sites are ordered by a permutation drawn from ``rng`` and site k takes
    stratum ``(perm[k] + v) / n_sites`` with one offset ``v`` per name. Every name consumes the
    same draws whatever ``k`` is, so giving every site a generator in the same state yields one
    consistent design in which all sites differ in every parameter.
    """
    perms = [rng.permutation(n_sites) for _ in names]
    offsets = rng.random(len(names))
    return {
        name: float((perm[k] + v) / n_sites)
        for name, perm, v in zip(names, perms, offsets, strict=True)
    }


def site_acquisition(
    k: int,
    n_sites: int,
    strength: float,
    rng: np.random.Generator,
    modality: Modality,
) -> AcquisitionParams:
    """The acquisition chain of site ``k`` of ``n_sites`` at shift ``strength`` (0 = base chain).

    ``rng`` draws the site design. To get sites that differ in every parameter (a Latin hypercube
    over the sites), give every site a generator **in the same state**, e.g.
    ``np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))`` created afresh per
    call; a different generator per site gives independent random sites instead.

    With ``strength = 0`` all sites get the same mild base chain (MRI: Rician σ = 0.01; camera:
    Poisson–Gaussian with 2000 photons at full scale, read noise 0.004, JPEG quality 95). Each
    parameter moves away from the base proportionally to ``strength`` (typical range 0–2).
    """
    if not isinstance(k, (int, np.integer)) or not isinstance(n_sites, (int, np.integer)):
        raise ValueError(f"k and n_sites must be integers, got k={k!r}, n_sites={n_sites!r}")
    if n_sites < 1 or not 0 <= k < n_sites:
        raise ValueError(f"site index k={k} must be in [0, n_sites={n_sites})")
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a finite number ≥ 0, got {strength!r}")
    if modality not in ("mri", "camera"):
        raise ValueError(f"modality must be 'mri' or 'camera', got {modality!r}")
    u = _latin_positions(int(k), int(n_sites), _ACQ_DRAWS, rng)
    c = {name: 2.0 * v - 1.0 for name, v in u.items()}  # centred, in [-1, 1)
    s = float(strength)
    if modality == "mri":
        return AcquisitionParams(
            modality="mri",
            gamma=math.exp(s * 0.4 * c["gamma"]),
            contrast=math.exp(s * 0.25 * c["contrast"]),
            brightness=s * 0.06 * c["brightness"],
            field_tilt=s * 0.4 * u["field_tilt"],
            field_angle=2.0 * math.pi * u["field_angle"] if s > 0 else 0.0,
            field_curve=s * 0.35 * c["field_curve"],
            blur=s * 0.015 * u["blur"],
            noise="rician",
            noise_sigma=0.01 + s * 0.035 * u["noise_sigma"],
        )
    quality = int(round(95 - s * 55 * u["jpeg_quality"]))
    return AcquisitionParams(
        modality="camera",
        gamma=math.exp(s * 0.35 * c["gamma"]),
        contrast=math.exp(s * 0.2 * c["contrast"]),
        brightness=s * 0.05 * c["brightness"],
        gains=(
            math.exp(s * 0.15 * c["gain_r"]),
            math.exp(s * 0.15 * c["gain_g"]),
            math.exp(s * 0.15 * c["gain_b"]),
        ),
        vignette=s * 0.5 * u["vignette"],
        vignette_centre=(s * 0.25 * c["vignette_x"], s * 0.25 * c["vignette_y"]),
        blur=s * 0.012 * u["blur"],
        noise="poisson-gaussian",
        noise_sigma=0.004 + s * 0.015 * u["noise_sigma"],
        photon_peak=float(10.0 ** (3.3 - min(3.0, s * 1.0 * u["photon_peak"]))),
        jpeg_quality=max(10, min(100, quality)),
    )


_JPEG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
_JPEG_CHROMA = np.full((8, 8), 99.0)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _jpeg_steps(table: np.ndarray, quality: int) -> np.ndarray:
    """IJG quality scaling of a quantisation table, as step sizes for intensities in [0, 1]."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((table * scale + 50.0) / 100.0), 1, 255) / 255.0


def _jpeg_like(x: np.ndarray, quality: int) -> np.ndarray:
    """8×8 block-DCT quantisation (YCbCr for 3 channels, no chroma subsampling); x is N×C×H×W."""
    n, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    if c == 3:
        x = np.einsum("kc,nchw->nkhw", _RGB2YCC, x) + _YCC_OFFSET[None, :, None, None]
        steps = np.stack(
            [_jpeg_steps(_JPEG_LUMA, quality)] + [_jpeg_steps(_JPEG_CHROMA, quality)] * 2
        )
    else:
        steps = np.stack([_jpeg_steps(_JPEG_LUMA, quality)] * c)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    hb, wb = x.shape[2] // 8, x.shape[3] // 8
    blocks = (x - 0.5).reshape(n, c, hb, 8, wb, 8).transpose(0, 1, 2, 4, 3, 5)
    coef = scipy.fft.dctn(blocks, axes=(-2, -1), norm="ortho")
    st = steps.astype(np.float32)[None, :, None, None]
    coef = np.round(coef / st) * st
    blocks = scipy.fft.idctn(coef, axes=(-2, -1), norm="ortho") + 0.5
    x = blocks.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)[:, :, :h, :w]
    if c == 3:
        x = np.einsum("kc,nchw->nkhw", _YCC2RGB, x - _YCC_OFFSET[None, :, None, None])
    return x


_RGB2YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
    dtype=np.float32,
)
_YCC2RGB = np.linalg.inv(_RGB2YCC.astype(np.float64)).astype(np.float32)
_YCC_OFFSET = np.array([0.0, 0.5, 0.5], dtype=np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [−1, 1], float32: (y of shape H×1, x of shape 1×W)."""
    y = np.linspace(-1 + 1 / h, 1 - 1 / h, h, dtype=np.float32)[:, None]
    x = np.linspace(-1 + 1 / w, 1 - 1 / w, w, dtype=np.float32)[None, :]
    return y, x


def apply_acquisition(
    image: np.ndarray, params: AcquisitionParams, rng: np.random.Generator
) -> np.ndarray:
    """Pass an image (C×H×W, or a batch N×C×H×W) in [0, 1] through a site's acquisition chain.

    Returns float32 of the same shape in [0, 1]; computed in float32. The noise is drawn from
    ``rng``: Rician ``sqrt((x + σ·n₁)² + (σ·n₂)²)`` for ``noise="rician"``; Poisson–Gaussian for
    ``noise="poisson-gaussian"`` in its heteroscedastic Gaussian form (Foi et al. 2008),
    ``x + sqrt(x / photon_peak + σ²)·n``, which is much faster than Poisson draws and
    indistinguishable at these photon counts. Colour gains apply to 3-channel images only.
    See :class:`AcquisitionParams` for the order of the steps.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"image must be C×H×W or N×C×H×W, got shape {x.shape}")
    single = x.ndim == 3
    if single:
        x = x[None]
    x = np.clip(x, 0.0, 1.0)
    _, c, h, w = x.shape
    p = params
    if c == 3 and tuple(p.gains) != (1.0, 1.0, 1.0):
        x = x * np.asarray(p.gains, dtype=np.float32)[None, :, None, None]
    yy, xx = _grid(h, w)
    field = np.ones((h, w), dtype=np.float32)
    if p.field_tilt or p.field_curve:
        field = field * np.exp(
            p.field_tilt * (math.cos(p.field_angle) * xx + math.sin(p.field_angle) * yy)
            + p.field_curve * (xx**2 + yy**2 - 2.0 / 3.0)
        )
    if p.vignette:
        cx, cy = p.vignette_centre
        field = field * np.clip(
            1.0 - p.vignette * ((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0, 0.05, 1.0
        )
    x = np.clip(x * field, 0.0, 1.0)
    if p.blur > 0:
        sigma = p.blur * min(h, w)
        if sigma > 0.05:
            x = gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.0)
    if p.noise == "rician":
        n12 = rng.standard_normal((2, *x.shape), dtype=np.float32)
        sig = np.float32(p.noise_sigma)
        x = np.sqrt((x + sig * n12[0]) ** 2 + (sig * n12[1]) ** 2)
    elif p.noise == "poisson-gaussian":
        var = np.float32(p.noise_sigma**2)
        if p.photon_peak:
            var = np.clip(x, 0.0, None) * np.float32(1.0 / p.photon_peak) + var
        x = x + np.sqrt(var) * rng.standard_normal(x.shape, dtype=np.float32)
    elif p.noise != "none":
        raise ValueError(f"unknown noise {p.noise!r}; expected none, rician or poisson-gaussian")
    x = np.clip(x, 0.0, 1.0)
    if p.gamma != 1.0:
        x = x ** np.float32(p.gamma)
    if p.contrast != 1.0 or p.brightness:
        x = (x - 0.5) * np.float32(p.contrast) + np.float32(0.5 + p.brightness)
    x = np.clip(x, 0.0, 1.0)
    if p.jpeg_quality is not None:
        x = np.clip(_jpeg_like(x, int(p.jpeg_quality)), 0.0, 1.0)
    if p.bit_depth is not None:
        levels = np.float32(2 ** int(p.bit_depth) - 1)
        x = np.round(x * levels) / levels
    out = np.ascontiguousarray(x, dtype=np.float32)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------
# Scene content (labels + clean images), float32 and vectorised over the images of a site
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelDesign:
    """One site's label distribution (the label-shift family)."""

    size_scale: float  # multiplies the object's mean radius
    irregularity: float  # amplitude of the boundary's angular harmonics
    offset: tuple[float, float]  # mean shift of the object's centre (x, y), image units [-1, 1]
    ratio: float  # fundus: mean cup-to-disc ratio (unused otherwise)
    empty_rate: float  # probability that an image (a slice) holds no object

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LABEL_DRAWS = ("size", "irregularity", "offset_x", "offset_y", "ratio", "empty")


def _label_design(
    k: int, n_sites: int, label_shift: float, empty_fraction: float, rng: np.random.Generator
) -> LabelDesign:
    u = _latin_positions(k, n_sites, _LABEL_DRAWS, rng)
    c = {name: 2.0 * v - 1.0 for name, v in u.items()}
    s = label_shift
    return LabelDesign(
        size_scale=math.exp(s * 0.3 * c["size"]),
        irregularity=0.05 + s * 0.1 * u["irregularity"],
        offset=(s * 0.2 * c["offset_x"], s * 0.2 * c["offset_y"]),
        ratio=float(np.clip(0.5 + s * 0.25 * c["ratio"], 0.2, 0.85)),
        empty_rate=float(np.clip(empty_fraction * (1.0 + s * 0.8 * c["empty"]), 0.0, 0.95)),
    )


def annotation_offsets(n_sites: int, strength: float, rng: np.random.Generator) -> list[int]:
    """Each site's boundary offset in pixels (> 0 dilated, < 0 eroded): round(strength · c_k)
    with c_k a Latin-hypercube stratum of [−1, 1) per site, so the sites spread over ±strength."""
    u = [_latin_positions(k, n_sites, ("annotation",), rng) for k in range(n_sites)]
    return [int(round(strength * (2.0 * v["annotation"] - 1.0))) for v in u]


def _annotate(labels: np.ndarray, offset: int) -> np.ndarray:
    """Labels (N×H×W) with every boundary moved ``offset`` pixels out (> 0) or in (< 0).

    Each nested region {label ≥ c} is dilated / eroded (4-connected steps) separately and the
    label rebuilt as their sum, so nesting (the cup inside the disc) is kept.
    """
    if offset == 0:
        return labels
    from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure

    cross = generate_binary_structure(2, 1)[None]  # never across images
    op = binary_dilation if offset > 0 else binary_erosion
    out = np.zeros_like(labels)
    for c in range(1, int(labels.max(initial=0)) + 1):
        out += op(labels >= c, structure=cross, iterations=abs(offset)).astype(labels.dtype)
    return out


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _e(a: np.ndarray) -> np.ndarray:
    """A per-image vector as N×1×1 for broadcasting against N×H×W maps."""
    return _f32(a)[:, None, None]


def _smooth_noise(rng: np.random.Generator, n: int, h: int, w: int, cycles: float) -> np.ndarray:
    """N×H×W smooth random texture (Gaussian spectrum, ``cycles`` per image), zero mean, unit std.

    Drawn directly in the Fourier domain: only the coefficients within 3·cycles are random, so
    the texture costs one inverse FFT and looks alike at every image size.
    """
    ky_max = min(int(math.ceil(3 * cycles)), (h - 1) // 2)
    kx_max = min(int(math.ceil(3 * cycles)), w // 2)
    rows = np.r_[0 : ky_max + 1, h - ky_max : h] if ky_max else np.array([0])
    ky = np.r_[0 : ky_max + 1, -ky_max:0] if ky_max else np.array([0])
    kx = np.arange(kx_max + 1)
    g = np.exp(-(ky[:, None] ** 2 + kx[None, :] ** 2) / (2.0 * cycles**2)).astype(np.float32)
    z = rng.standard_normal((2, n, len(rows), len(kx)), dtype=np.float32)
    spec = np.zeros((n, h, w // 2 + 1), dtype=np.complex64)
    spec[:, rows[:, None], kx[None, :]] = (z[0] + 1j * z[1]) * g
    spec[:, 0, 0] = 0
    out = np.fft.irfft2(spec, s=(h, w)).astype(np.float32, copy=False)
    out /= out.std(axis=(1, 2), keepdims=True) + np.float32(1e-12)
    return out


def _blob_level(
    yy: np.ndarray,
    xx: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: np.ndarray,
    ry: np.ndarray,
    rot: np.ndarray,
    harm: np.ndarray | None = None,
    phase: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised radius of an irregular ellipse per image (N×H×W, float32): inside where < 1.

    The boundary radius is ``1 + Σ_m harm[:, m]·cos((m+2)·φ + phase[:, m])`` in the ellipse's
    rotated, axis-scaled frame; every parameter is a length-N array.
    """
    dx, dy = xx[None] - _e(cx), yy[None] - _e(cy)
    cr, sr = _e(np.cos(rot)), _e(np.sin(rot))
    u = (cr * dx + sr * dy) / _e(rx)
    v = (cr * dy - sr * dx) / _e(ry)
    rho = np.sqrt(u * u + v * v)
    if harm is None:
        return rho
    phi = np.arctan2(v, u)
    bound = np.ones_like(rho)
    for m in range(harm.shape[1]):
        bound += _e(harm[:, m]) * np.cos((m + 2) * phi + _e(phase[:, m]))
    return rho / np.maximum(bound, np.float32(0.3))


def _soft(level: np.ndarray, radius_px: np.ndarray, width_px: float = 0.6) -> np.ndarray:
    """Anti-aliased inside-mask of a blob from its level (≈ distance in pixels / width)."""
    z = (1.0 - level) * _e(np.asarray(radius_px) * (0.5 / width_px))
    return np.float32(0.5) * (np.float32(1.0) + np.tanh(z))


def _erode(mask: np.ndarray) -> np.ndarray:
    """3×3 binary erosion of N×H×W masks (outside the image counts as background)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    h, w = mask.shape[1:]
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out &= p[:, dy : dy + h, dx : dx + w]
    return out


def _harmonics(
    rng: np.random.Generator, n: int, amp: float, m: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    harm = np.minimum(amp * np.abs(rng.standard_normal((n, m))), 0.3) / np.arange(1, m + 1)[None]
    phase = rng.uniform(0.0, 2.0 * math.pi, (n, m))
    return harm, phase


def _mix(weights: list[np.ndarray], colours: list[tuple[float, float, float]]) -> np.ndarray:
    """Σ_k weights[k] (N×H×W) · colours[k] (RGB) → N×3×H×W (float32)."""
    n, h, w = weights[0].shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for c in range(3):
        acc = out[:, c]
        np.multiply(weights[0], np.float32(colours[0][c]), out=acc)
        for wk, col in zip(weights[1:], colours[1:], strict=True):
            acc += wk * np.float32(col[c])
    return out


def _fundus(
    n: int, size: int, d: LabelDesign, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size, size)
    half = size / 2.0
    empty = rng.random(n) < d.empty_rate
    cx = np.clip(d.offset[0] + 0.06 * rng.standard_normal(n), -0.45, 0.45)
    cy = np.clip(d.offset[1] + 0.06 * rng.standard_normal(n), -0.45, 0.45)
    r = np.clip(
        0.42 * d.size_scale * np.exp(0.08 * rng.standard_normal(n)), max(0.12, 3.0 / half), 0.8
    )
    asp = np.exp(0.05 + 0.05 * rng.standard_normal(n))
    rx, ry = r / np.sqrt(asp), r * np.sqrt(asp)
    rot = 0.2 * rng.standard_normal(n)
    harm_d, ph_d = _harmonics(rng, n, d.irregularity)
    cdr = np.clip(d.ratio + 0.05 * rng.standard_normal(n), 0.15, 0.9)
    ccx = cx + 0.08 * r * rng.standard_normal(n)
    ccy = cy + 0.08 * r * rng.standard_normal(n)
    harm_c, ph_c = _harmonics(rng, n, 1.5 * d.irregularity)
    n_vessels = 6
    theta = rng.uniform(0, 2 * math.pi, (n_vessels, n))
    kappa = 0.7 * rng.standard_normal((n_vessels, n))
    width = rng.uniform(0.018, 0.04, (n_vessels, n))
    tex_lo = _smooth_noise(rng, n, size, size, 3.0)
    tex_hi = _smooth_noise(rng, n, size, size, 12.0)

    lvl_d = _blob_level(yy, xx, cx, cy, rx, ry, rot, harm_d, ph_d)
    lvl_c = _blob_level(yy, xx, ccx, ccy, cdr * rx, cdr * ry, rot, harm_c, ph_c)
    keep = ~empty[:, None, None]
    disc = (lvl_d < 1.0) & keep
    # The cup stays inside the disc with a rim of at least 12% of the radius and 1.5 pixels.
    inner = 1.0 - np.maximum(0.12, 1.5 / (r * half))
    lvl_in = lvl_d / _e(inner)
    inside = _erode(disc)  # so that no cup pixel touches the background, even diagonally
    cup = (lvl_c < 1.0) & (lvl_in < 1.0) & inside
    # A tiny disc can lose its cup to the rim: keep at least the cup's most central pixel.
    lost = ~cup.any(axis=(1, 2)) & inside.any(axis=(1, 2))
    if lost.any():
        idx = np.flatnonzero(lost)
        best = np.where(inside[idx], lvl_c[idx], np.inf).reshape(len(idx), -1).argmin(1)
        cup[idx, best // size, best % size] = True
    labels = disc.astype(np.int64) + cup.astype(np.int64)

    sd = _soft(lvl_d, r * half) * keep
    sc = np.minimum(_soft(lvl_c, cdr * r * half), _soft(lvl_in, inner * r * half)) * keep
    dx, dy = xx[None] - _e(cx), yy[None] - _e(cy)
    rho2 = dx * dx + dy * dy
    rho = np.sqrt(rho2)
    phi = np.arctan2(dy, dx)
    # Vessels: curves leaving the disc centre (φ = θ + κ·ρ), chord distance to the curve.
    wfac = 1.0 - 0.3 * np.minimum(rho, np.float32(1.5))
    g = 2.0 * rho2 / (wfac * wfac)
    vessel = np.zeros_like(rho)
    for v in range(n_vessels):
        ang = phi - _e(theta[v]) - _e(kappa[v]) * rho
        np.maximum(vessel, np.exp((np.cos(ang) - 1.0) * g * _e(1.0 / width[v] ** 2)), out=vessel)
    a = 0.7 * vessel * np.minimum(rho * np.float32(1 / 0.08), np.float32(1.0))
    shade = (1.0 + 0.12 * tex_lo + 0.05 * tex_hi) * (1.0 - 0.12 * rho2)
    rest = 1.0 - a
    w_cup = sc * rest
    w_disc = (sd - sc) * rest  # = sd·(1 − sc) for sc ≤ sd, up to the soft edge
    w_bg = (1.0 - sd) * rest * shade
    w_disc_tex = w_disc * 0.04 * tex_hi
    img = _mix(
        [w_bg, w_disc + w_disc_tex, w_cup, a],
        [(0.62, 0.27, 0.12), (0.93, 0.71, 0.43), (0.99, 0.88, 0.68), (0.42, 0.10, 0.06)],
    )
    return np.clip(img, 0.0, 1.0), labels


def _prostate(
    n_cases: int, slices: int, size: int, d: LabelDesign, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size, size)
    half = size / 2.0
    n = n_cases * slices
    # Per case (volume) parameters, then smooth changes across the slices.
    r_case = np.clip(0.26 * d.size_scale * np.exp(0.08 * rng.standard_normal(n_cases)), 0.08, 0.6)
    asp_case = np.exp(0.25 + 0.06 * rng.standard_normal(n_cases))
    cx_case = np.clip(d.offset[0] + 0.04 * rng.standard_normal(n_cases), -0.4, 0.4)
    cy_case = np.clip(0.1 + d.offset[1] + 0.04 * rng.standard_normal(n_cases), -0.3, 0.5)
    rot_case = 0.15 * rng.standard_normal(n_cases)
    harm_case, ph_case = _harmonics(rng, n_cases, d.irregularity)
    drift = 0.05 * rng.standard_normal(n_cases)
    n_empty = rng.binomial(slices, d.empty_rate, n_cases)
    body_h, body_p = _harmonics(rng, n, 0.03)
    tex_lo = _smooth_noise(rng, n, size, size, 3.0)
    tex_hi = _smooth_noise(rng, n, size, size, 14.0)

    t = (np.arange(slices) - (slices - 1) / 2.0) / max(slices / 2.0, 1.0)
    # Empty slices sit at the ends of a volume (where the organ ends).
    order = np.argsort(-np.abs(t) + 1e-6 * np.arange(slices), kind="stable")
    empty = np.zeros((n_cases, slices), dtype=bool)
    for i in range(n_cases):
        empty[i, order[: n_empty[i]]] = True
    empty = empty.reshape(n)
    rep = np.repeat(np.arange(n_cases), slices)
    tt = np.tile(t, n_cases)
    f = np.sqrt(np.clip(1.0 - 0.55 * tt**2, 0.05, 1.0))
    r = r_case[rep] * f
    rx, ry = r * np.sqrt(asp_case[rep]), r / np.sqrt(asp_case[rep])
    cx = cx_case[rep] + drift[rep] * tt
    cy = cy_case[rep] + 0.05 * tt
    rot = rot_case[rep]
    lvl = _blob_level(yy, xx, cx, cy, rx, ry, rot, harm_case[rep], ph_case[rep] + 0.3 * tt[:, None])
    keep = ~empty[:, None, None]
    labels = ((lvl < 1.0) & keep).astype(np.int64)

    ones, zeros = np.ones(n), np.zeros(n)
    body = _blob_level(yy, xx, zeros, 0.05 * ones, 0.92 * ones, 0.75 * ones, zeros, body_h, body_p)
    s_body = _soft(body, 0.8 * half * ones)
    img = 0.02 + s_body * (0.28 + 0.05 * tex_lo + 0.04 * tex_hi)
    z = (body - 0.93) * np.float32(1 / 0.05)
    img += 0.35 * np.exp(-z * z) * s_body  # subcutaneous fat
    # Bladder (bright fluid) above the organ, larger towards the upper slices.
    fb = np.clip(1.0 - 0.5 * tt, 0.3, 1.5)
    bl = _blob_level(yy, xx, cx, cy - ry - 0.2 * fb, 0.3 * fb, 0.17 * fb, rot)
    s_bl = _soft(bl, 0.17 * fb * half)
    img = img + s_bl * (0.82 + 0.03 * tex_hi - img)
    # Rectum (dark lumen, brighter wall) below the organ.
    rc = _blob_level(yy, xx, cx, cy + ry + 0.16, 0.13 * ones, 0.11 * ones, zeros)
    z = (rc - 1.0) * np.float32(1 / 0.18)
    wall = 0.6 * np.exp(-z * z)
    img = img + wall * (0.45 - img)
    s_rc = _soft(rc, 0.1 * half * ones)
    img = img + s_rc * (0.1 - img)
    # Prostate: brighter peripheral zone, darker textured central gland, dark capsule.
    s_o = _soft(lvl, r * half) * keep
    s_cg = _soft(lvl * np.float32(1 / 0.65), 0.65 * r * half) * keep
    organ = 0.52 + 0.04 * tex_hi
    organ = organ + s_cg * (0.36 + 0.07 * tex_hi + 0.03 * tex_lo - organ)
    img = img + s_o * (organ - img)
    z = (lvl - 1.0) * _e(r * half / 0.9)
    img -= 0.12 * np.exp(-z * z) * keep
    return np.clip(img, 0.0, 1.0)[:, None], labels


def _polyp(
    n: int, size: int, d: LabelDesign, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size, size)
    half = size / 2.0
    empty = rng.random(n) < d.empty_rate
    r = np.clip(0.28 * d.size_scale * np.exp(0.2 * rng.standard_normal(n)), 0.08, 0.7)
    cx = np.clip(d.offset[0] + rng.uniform(-0.3, 0.3, n), -0.6, 0.6)
    cy = np.clip(d.offset[1] + rng.uniform(-0.3, 0.3, n), -0.6, 0.6)
    asp = np.exp(0.15 * rng.standard_normal(n))
    rx, ry = r * np.sqrt(asp), r / np.sqrt(asp)
    rot = rng.uniform(0, math.pi, n)
    harm, ph = _harmonics(rng, n, 1.5 * d.irregularity)
    ly, lx = rng.uniform(-0.7, 0.7, (2, n))
    lsig = rng.uniform(0.2, 0.4, n)
    n_spec = 6
    sy, sx = rng.uniform(-0.9, 0.9, (2, n_spec, n))
    ss = rng.uniform(0.01, 0.03, (n_spec, n))
    tex_lo = _smooth_noise(rng, n, size, size, 3.0)
    tex_mid = _smooth_noise(rng, n, size, size, 7.0)
    tex_hi = _smooth_noise(rng, n, size, size, 16.0)

    lvl = _blob_level(yy, xx, cx, cy, rx, ry, rot, harm, ph)
    keep = ~empty[:, None, None]
    labels = ((lvl < 1.0) & keep).astype(np.int64)

    shade = 1.0 + 0.12 * tex_lo + 0.06 * np.sin(3.0 * tex_mid) + 0.04 * tex_hi
    # Dark lumen somewhere in the frame.
    d2 = (xx[None] - _e(lx)) ** 2 + (yy[None] - _e(ly)) ** 2
    shade *= 1.0 - 0.75 * np.exp(-d2 * _e(0.5 / lsig**2))
    # Polyp: a lit dome, redder, with a darker rim.
    sp = _soft(lvl, r * half) * keep
    h = np.sqrt(np.clip(1.0 - lvl * lvl, 0.0, 1.0))
    light = -(math.cos(0.8) * (xx[None] - _e(cx)) + math.sin(0.8) * (yy[None] - _e(cy))) * _e(
        1.0 / r
    )
    pshade = 0.72 + 0.3 * h + 0.12 * np.clip(light, -1.0, 1.0) * h + 0.05 * tex_hi
    z = (lvl - 1.0) * _e(r * half)
    dim = (1.0 - 0.25 * np.exp(-z * z) * keep) * (1.0 - 0.15 * (xx * xx + yy * yy))
    img = _mix(
        [shade * (1.0 - sp) * dim, pshade * sp * dim], [(0.84, 0.47, 0.38), (0.9, 0.4, 0.33)]
    )
    # Specular highlights.
    spec = np.zeros((n, size, size), dtype=np.float32)
    for j in range(n_spec):
        dd = (xx[None] - _e(sx[j])) ** 2 + (yy[None] - _e(sy[j])) ** 2
        np.maximum(spec, np.exp(-dd * _e(0.5 / ss[j] ** 2)), out=spec)
    img += spec[:, None] * (1.0 - img)
    return np.clip(img, 0.0, 1.0), labels


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class Synthetic(Dataset):
    """Seeded synthetic multi-site data with separate appearance and label shift knobs.

    Options (all keyword, all stored as attributes of the same name):

    - ``flavour``: ``fundus`` | ``prostate`` | ``polyp``.
    - ``sites``: number of sites (default 4 / 6 / 4 per flavour, or ``len(images_per_site)``).
    - ``size``: image height = width in pixels (16–1024).
    - ``images_per_site``: images per site (default unequal per flavour: fundus
      [12, 18, 30, 30], prostate [32, 32, 24, 20, 16, 16] = 8/8/6/5/4/4 cases × 4 slices, polyp
      [30, 10, 16, 24]; when ``sites`` is larger the pattern repeats). For ``prostate`` every entry
      must be a multiple of ``slices_per_case``. Every site needs ≥ 3 cases for the split.
    - ``slices_per_case``: prostate only, slices per volume (case).
    - ``appearance_shift``, ``label_shift``: strengths of the two shift families, in [0, 3].
    - ``annotation_shift``: largest boundary offset in pixels between sites' annotations, in
      [0, 8] (0: every site annotates the true boundary); images unchanged.
    - ``empty_fraction``: base rate of images (slices) without the object, in [0, 1).
    - ``seed``: integer ≥ 0; everything derives from it.
    - ``cache_dir``: if set, the arrays are cached there as ``.npz`` keyed by a hash of the options
      and :data:`GENERATOR_VERSION`; otherwise data are generated in memory on every load.
    """

    name = "synthetic"
    description = (
        "Seeded synthetic multi-site segmentation data (fundus disc/cup, prostate-like MRI volumes, "
        "endoscopy polyps) with independent appearance (acquisition chain) and label shift knobs"
    )

    source = (
        "generated by pflbench (datasets/synthetic.py, reference/data.md §3): seeded multi-site "
        "images in fundus, prostate and polyp flavours with separate appearance and label shift"
    )
    homepage = "this repository"
    licence = "Apache-2.0 (pflbench's own; the data are generated, nothing is redistributed)"
    access = "nothing to get: generated in memory from the seed (cached by content hash with `cache_dir`)"
    citation = "pflbench (CITATION.cff)"

    def __init__(
        self,
        flavour: str = "fundus",
        sites: int | None = None,
        size: int = 64,
        images_per_site: list[int] | None = None,
        slices_per_case: int = 4,
        appearance_shift: float = 1.0,
        label_shift: float = 0.5,
        empty_fraction: float = 0.0,
        seed: int = 0,
        cache_dir: str | None = None,
        annotation_shift: float = 0.0,
    ) -> None:
        self.flavour = flavour
        self.sites = sites
        self.size = size
        self.images_per_site = list(images_per_site) if images_per_site is not None else None
        self.slices_per_case = slices_per_case
        self.appearance_shift = appearance_shift
        self.label_shift = label_shift
        self.empty_fraction = empty_fraction
        self.annotation_shift = annotation_shift
        self.seed = seed
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self._counts = self._validate()
        #: True when the last :meth:`load` read the cache instead of generating.
        self.loaded_from_cache = False

    # -- options ----------------------------------------------------------------------------

    def _validate(self) -> list[int]:
        """Check every option; return the resolved images per site."""
        if self.flavour not in _FLAVOURS:
            raise DataError(
                f"synthetic: option 'flavour' must be one of {', '.join(_FLAVOURS)}; got {self.flavour!r}"
            )
        spec = _FLAVOURS[self.flavour]
        if not _is_int(self.size) or not 16 <= self.size <= 1024:
            raise DataError(
                f"synthetic: option 'size' must be an integer in [16, 1024]; got {self.size!r}"
            )
        if not _is_int(self.slices_per_case) or self.slices_per_case < 1:
            raise DataError(
                f"synthetic: option 'slices_per_case' must be an integer ≥ 1; got {self.slices_per_case!r}"
            )
        for opt in ("appearance_shift", "label_shift"):
            v = getattr(self, opt)
            if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= 3:
                raise DataError(f"synthetic: option {opt!r} must be a number in [0, 3]; got {v!r}")
        a = self.annotation_shift
        if not _is_number(a) or not math.isfinite(a) or not 0 <= a <= 8:
            raise DataError(
                f"synthetic: option 'annotation_shift' must be a number of pixels in [0, 8]; got {a!r}"
            )
        ef = self.empty_fraction
        if not _is_number(ef) or not math.isfinite(ef) or not 0 <= ef < 1:
            raise DataError(
                f"synthetic: option 'empty_fraction' must be a number in [0, 1); got {ef!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise DataError(f"synthetic: option 'seed' must be an integer ≥ 0; got {self.seed!r}")
        if self.cache_dir is not None and not self.cache_dir:
            raise DataError("synthetic: option 'cache_dir' must be a folder path or null; got ''")
        if self.sites is not None and (not _is_int(self.sites) or not 1 <= self.sites <= 64):
            raise DataError(
                f"synthetic: option 'sites' must be an integer in [1, 64]; got {self.sites!r}"
            )
        per_case = self.slices_per_case if self.flavour == "prostate" else 1
        if self.images_per_site is not None:
            counts = self.images_per_site
            if not counts or not all(_is_int(c) for c in counts):
                raise DataError(
                    f"synthetic: option 'images_per_site' must be a non-empty list of integers; got {counts!r}"
                )
            if self.sites is not None and len(counts) != self.sites:
                raise DataError(
                    f"synthetic: option 'images_per_site' has {len(counts)} entries but option "
                    f"'sites' is {self.sites}; give one count per site"
                )
        else:
            default = spec["images"] if "images" in spec else [c * per_case for c in spec["cases"]]
            k = self.sites if self.sites is not None else len(default)
            counts = [default[i % len(default)] for i in range(k)]
        for i, c in enumerate(counts):
            if c % per_case:
                raise DataError(
                    f"synthetic: option 'images_per_site'[{i}] = {c} is not a multiple of "
                    f"slices_per_case = {per_case} (prostate: a case is a volume of that many slices)"
                )
            if c // per_case < 3:
                raise DataError(
                    f"synthetic: option 'images_per_site'[{i}] = {c} gives {c // per_case} case(s); "
                    "at least 3 cases per site are needed for the train/val/test split"
                )
        return [int(c) for c in counts]

    @property
    def n_sites(self) -> int:
        return len(self._counts)

    @property
    def site_names(self) -> list[str]:
        return [f"site{k + 1}" for k in range(self.n_sites)]

    def _resolved(self) -> dict[str, Any]:
        out = {
            "generator": "pflbench.synthetic",
            "version": GENERATOR_VERSION,
            "flavour": self.flavour,
            "size": int(self.size),
            "images_per_site": self._counts,
            "slices_per_case": int(self.slices_per_case) if self.flavour == "prostate" else 1,
            "appearance_shift": float(self.appearance_shift),
            "label_shift": float(self.label_shift),
            "empty_fraction": float(self.empty_fraction),
            "seed": int(self.seed),
        }
        if self.annotation_shift:  # only when set: earlier cache keys stay as they were
            out["annotation_shift"] = float(self.annotation_shift)
        return out

    def annotation_offsets(self) -> list[int]:
        """Each site's annotation boundary offset in pixels (all 0 without annotation shift)."""
        if not self.annotation_shift:
            return [0] * self.n_sites
        return annotation_offsets(
            self.n_sites, float(self.annotation_shift), self._rng(_STREAM_ANNOTATION)
        )

    def cache_key(self) -> str:
        """Content hash of the options that determine the data (``cache_dir`` excluded)."""
        blob = json.dumps(self._resolved(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / f"synthetic-{self.flavour}-{self.cache_key()}.npz"

    # -- design -----------------------------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(int(self.seed), spawn_key=key))

    def site_designs(self) -> tuple[list[LabelDesign], list[AcquisitionParams]]:
        """Per-site label designs and acquisition chains (cheap; no images are generated)."""
        modality = _FLAVOURS[self.flavour]["modality"]
        k_all = self.n_sites
        labels = [
            _label_design(
                k,
                k_all,
                float(self.label_shift),
                float(self.empty_fraction),
                self._rng(_STREAM_LABEL_DESIGN),
            )
            for k in range(k_all)
        ]
        acqs = [
            site_acquisition(
                k, k_all, float(self.appearance_shift), self._rng(_STREAM_ACQ_DESIGN), modality
            )
            for k in range(k_all)
        ]
        return labels, acqs

    # -- generation -------------------------------------------------------------------------

    def _generate(self) -> list[dict[str, np.ndarray]]:
        label_designs, acqs = self.site_designs()
        offsets = self.annotation_offsets()
        out = []
        for k, (count, ld, acq) in enumerate(zip(self._counts, label_designs, acqs, strict=True)):
            rng = self._rng(_STREAM_CONTENT, k)
            name = self.site_names[k]
            if self.flavour == "fundus":
                img, lab = _fundus(count, self.size, ld, rng)
            elif self.flavour == "prostate":
                img, lab = _prostate(
                    count // self.slices_per_case, self.slices_per_case, self.size, ld, rng
                )
            else:
                img, lab = _polyp(count, self.size, ld, rng)
            img = apply_acquisition(img, acq, self._rng(_STREAM_ACQ_NOISE, k))
            lab = _annotate(lab, offsets[k])
            if self.flavour == "prostate":
                s = self.slices_per_case
                case_ids = [f"{name}_case{i // s:03d}" for i in range(count)]
                slices = [i % s for i in range(count)]
            else:
                case_ids = [f"{name}_img{i:04d}" for i in range(count)]
                slices = [0] * count
            out.append(
                {
                    "images": np.ascontiguousarray(img, dtype=np.float32),
                    "labels": np.ascontiguousarray(lab, dtype=np.int64),
                    "case_ids": np.asarray(case_ids),
                    "slice_index": np.asarray(slices, dtype=np.int64),
                }
            )
        return out

    def _read_cache(self, path: Path) -> list[dict[str, np.ndarray]] | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta != self._resolved():
                    return None
                return [
                    {
                        "images": z[f"images_{k}"],
                        "labels": z[f"labels_{k}"],
                        "case_ids": z[f"case_ids_{k}"],
                        "slice_index": z[f"slice_index_{k}"],
                    }
                    for k in range(self.n_sites)
                ]
        except (OSError, KeyError, ValueError):  # missing, partial or stale: regenerate
            return None

    def _write_cache(self, path: Path, arrays: list[dict[str, np.ndarray]]) -> None:
        payload: dict[str, np.ndarray] = {"meta": np.asarray(json.dumps(self._resolved()))}
        for k, a in enumerate(arrays):
            for key, v in a.items():
                payload[f"{key}_{k}"] = v
        write_cache_file(path, lambda f: np.savez(f, **payload))

    def load(self) -> FederatedData:
        spec = _FLAVOURS[self.flavour]
        path = self.cache_path()
        arrays = self._read_cache(path) if path is not None and path.exists() else None
        self.loaded_from_cache = arrays is not None
        if arrays is None:
            arrays = self._generate()
            if path is not None:
                self._write_cache(path, arrays)
        sites = [
            SiteData(
                name=name,
                images=torch.from_numpy(np.array(a["images"], dtype=np.float32)),
                labels=torch.from_numpy(np.array(a["labels"], dtype=np.int64)),
                case_ids=[str(c) for c in a["case_ids"]],
                slice_index=[int(i) for i in a["slice_index"]],
            )
            for name, a in zip(self.site_names, arrays, strict=True)
        ]
        label_designs, acqs = self.site_designs()
        return FederatedData(
            name=f"synthetic-{self.flavour}",
            sites=sites,
            classes=list(spec["classes"]),
            structures={k: list(v) for k, v in spec["structures"].items()},
            case_level=spec["case_level"],
            source={
                **self._resolved(),
                "sites": {
                    n: {"label": ld.to_dict(), "acquisition": acq.to_dict()}
                    | ({"annotation_offset_px": off} if self.annotation_shift else {})
                    for n, ld, acq, off in zip(
                        self.site_names, label_designs, acqs, self.annotation_offsets(), strict=True
                    )
                },
                "cache": str(path) if path is not None else None,
            },
        )
