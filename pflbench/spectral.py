"""Fourier-amplitude (spectral) style transfer, as used by pFL-ResFIM to simulate other clients.

Follows FDA (Yang & Soatto, CVPR 2020) and FedDG-ELCFS (Liu et al., CVPR 2021); see
``reference/resfim.md`` §1–2. All functions work on tensors whose last two dimensions are H×W
(normally a batch N×C×H×W), on CPU and CUDA, and never need gradients.

Layout convention
-----------------
Every spectrum here (amplitudes, phases, the low-frequency window) is in the **unshifted**
``torch.fft.fft2`` index layout: frequency 0 at index ``[0, 0]``. The window is *defined* as the
centred square after ``fftshift`` and then moved back with ``ifftshift``, so it is the set of
frequencies whose signed index (``fftfreq(n) * n``) has absolute value ≤ the half-width along
both axes. Because that set is symmetric under ``k → −k``, blending amplitudes inside it keeps the
spectrum Hermitian and the inverse transform real (up to float error).

What crosses a client boundary is :func:`style_bank_entry`'s output: amplitude spectra only,
never phases, images or labels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "amplitude_phase",
    "low_freq_half_width",
    "low_freq_window",
    "spectral_transfer",
    "style_bank_entry",
]


def amplitude_phase(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude and phase of the 2-D FFT over the last two dimensions (unshifted layout).

    Real float input of any dtype is promoted to at least float32; the outputs are real tensors
    of the input's shape.
    """
    if not torch.is_floating_point(x):
        x = x.float()
    f = torch.fft.fft2(x)
    return f.abs(), f.angle()


def low_freq_half_width(h: int, w: int, beta: float) -> int:
    """Half-width of the low-frequency window: ``max(1, floor(beta * min(h, w)))``."""
    if h < 1 or w < 1:
        raise ValueError(f"window size must be positive, got {h}×{w}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number ≥ 0, got {beta!r}")
    return max(1, int(math.floor(beta * min(h, w))))


def low_freq_window(
    h: int, w: int, beta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean H×W mask of the low-frequency window M_β in **unshifted** FFT layout.

    M_β is the square of half-width ``b = max(1, floor(beta * min(h, w)))`` centred on the zero
    frequency after ``fftshift``: rows ``h//2 - b .. h//2 + b`` and columns ``w//2 - b .. w//2 + b``
    (inclusive, clipped to the array) of the shifted spectrum, i.e. a (2b+1)×(2b+1) square when it
    fits. It is returned after ``ifftshift`` so it indexes ``torch.fft.fft2`` output directly.
    """
    b = low_freq_half_width(h, w, beta)
    shifted = torch.zeros(h, w, dtype=torch.bool, device=device)
    ch, cw = h // 2, w // 2
    shifted[max(0, ch - b) : ch + b + 1, max(0, cw - b) : cw + b + 1] = True
    return torch.fft.ifftshift(shifted, dim=(-2, -1))


def spectral_transfer(
    x: torch.Tensor,
    amp_target: torch.Tensor,
    beta: float,
    lam: float | torch.Tensor,
    clip: bool = True,
) -> torch.Tensor:
    """Move the low-frequency amplitude of ``x`` towards ``amp_target``, keeping the phase of ``x``.

    ``Â = (1−λ)·A(x) + λ·A_target`` inside the window :func:`low_freq_window` (``beta``), ``A(x)``
    outside; the result is ``real(ifft2(Â·e^{iP(x)}))`` clipped to [0, 1] (``clip=False`` skips the
    clip, for tests and for data outside [0, 1]).

    ``x``: N×C×H×W (any leading dims work). ``amp_target``: amplitude spectra in the unshifted
    layout, broadcastable to ``x`` (N×C×H×W, C×H×W, ...). ``lam``: a float or a tensor of shape N
    (one λ per image of the batch).

    It is computed as ``x + real(ifft2((Â − A(x))·e^{iP(x)}))``, which equals the formula above by
    linearity of the inverse FFT but is exact where nothing changes: with λ = 0 the result is
    ``x`` bitwise (before the clip; with ``clip=True`` values of ``x`` already in [0, 1] are
    unchanged). Elsewhere the float32 round-off is about 1e-6 for images in [0, 1] (tests use
    ``atol=1e-5``).
    """
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims (…×H×W), got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    amp_target = torch.as_tensor(amp_target, device=x.device)
    if amp_target.shape[-2:] != (h, w):
        raise ValueError(
            f"amp_target spatial size {tuple(amp_target.shape[-2:])} does not match x {h}×{w}"
        )
    if isinstance(lam, torch.Tensor):
        lam_t = lam.to(device=x.device, dtype=x.dtype)
        if lam_t.ndim == 0:
            lam_t = lam_t.reshape([1] * x.ndim)
        else:
            if lam_t.ndim != 1 or x.ndim < 3 or lam_t.shape[0] != x.shape[0]:
                raise ValueError(
                    f"lam must be a float or a tensor of shape N={x.shape[0]}, got {tuple(lam_t.shape)}"
                )
            lam_t = lam_t.reshape([-1] + [1] * (x.ndim - 1))
    else:
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and 0.0 <= lam_f <= 1.0):
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        lam_t = torch.tensor(lam_f, device=x.device, dtype=x.dtype)
    window = low_freq_window(h, w, beta, device=x.device)

    f = torch.fft.fft2(x)
    amp = f.abs()
    # e^{iP}: the unit phasor; where the amplitude is 0 the phase is 0 (torch.angle's convention).
    phasor = torch.polar(torch.ones_like(amp), f.angle())
    delta = torch.where(window, lam_t * (amp_target.to(amp.dtype) - amp), torch.zeros_like(amp))
    out = x + torch.fft.ifft2(delta * phasor).real.to(x.dtype)
    if clip:
        out = out.clamp(0.0, 1.0)
    return out


def style_bank_entry(
    images: torch.Tensor, bank_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Amplitude spectra of a random subset of a client's images: what the client uploads.

    ``images``: N×C×H×W. Picks ``min(bank_size, N)`` distinct images with ``torch.randperm`` on
    ``generator`` (a CPU generator; the indices then move to the images' device) and returns their
    amplitude spectra, ``bank×C×H×W`` in the unshifted FFT layout, on the images' device. Only
    amplitudes leave: no phase, image or label. ``bank_size * C * H * W * 4`` bytes in float32.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
    if int(bank_size) < 1:
        raise ValueError(f"bank_size must be ≥ 1, got {bank_size!r}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images is empty: a client needs at least one image for its style bank")
    k = min(int(bank_size), n)
    idx = torch.randperm(n, generator=generator)[:k].sort().values.to(images.device)
    amp, _ = amplitude_phase(images.index_select(0, idx))
    return amp
