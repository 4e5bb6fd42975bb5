"""Fourier-amplitude transfer (pflbench.spectral), checked in the frequency domain."""

from __future__ import annotations

import math

import pytest
import torch

from pflbench.spectral import (
    amplitude_phase,
    low_freq_half_width,
    low_freq_window,
    spectral_transfer,
    style_bank_entry,
)

ATOL = 1e-5  # float32 round trip through fft2 / ifft2 for images in [0, 1]


def _images(n: int, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images well inside (0, 1), so that moderate transfers do not clip."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return 0.3 + 0.4 * x


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


# ---- the window ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, beta, b",
    [
        (64, 64, 0.05, 3),  # floor(3.2)
        (64, 64, 0.01, 1),  # floor(0.64) = 0 → max(1, ·) = 1
        (64, 64, 0.0, 1),
        (32, 48, 0.1, 3),  # min(H, W) = 32
        (33, 31, 0.1, 3),  # odd sizes
        (256, 256, 0.2, 51),
        (16, 16, 0.6, 9),  # larger than the image: covers everything
    ],
)
def test_window_half_width_and_size(h: int, w: int, beta: float, b: int) -> None:
    assert low_freq_half_width(h, w, beta) == b
    win = low_freq_window(h, w, beta)
    assert win.shape == (h, w) and win.dtype == torch.bool
    rows, cols = min(2 * b + 1, h), min(2 * b + 1, w)
    assert int(win.sum()) == rows * cols


@pytest.mark.parametrize("h, w, beta", [(64, 64, 0.05), (33, 31, 0.1), (32, 48, 0.02)])
def test_window_layout_is_unshifted_and_centred_after_fftshift(h: int, w: int, beta: float) -> None:
    b = low_freq_half_width(h, w, beta)
    win = low_freq_window(h, w, beta)
    assert bool(win[0, 0])  # the zero frequency, unshifted layout
    shifted = torch.fft.fftshift(win)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[h // 2 - b : h // 2 + b + 1, w // 2 - b : w // 2 + b + 1] = True
    assert torch.equal(shifted, expected)
    # equivalently: |signed frequency| ≤ b on both axes, a set symmetric under k → −k
    fy = (torch.fft.fftfreq(h) * h).round().abs()[:, None]
    fx = (torch.fft.fftfreq(w) * w).round().abs()[None, :]
    assert torch.equal(win, (fy <= b) & (fx <= b))
    neg = torch.roll(torch.flip(win, (0, 1)), shifts=(1, 1), dims=(0, 1))
    assert torch.equal(win, neg)


def test_window_rejects_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta"):
        low_freq_window(32, 32, -0.1)
    with pytest.raises(ValueError, match="beta"):
        low_freq_window(32, 32, float("nan"))


# ---- amplitude / phase ---------------------------------------------------------------------


def test_amplitude_phase_reconstructs() -> None:
    x = _images(2)
    amp, ph = amplitude_phase(x)
    assert amp.shape == x.shape and ph.shape == x.shape
    assert not amp.is_complex() and bool((amp >= 0).all())
    back = torch.fft.ifft2(torch.polar(amp, ph)).real
    torch.testing.assert_close(back, x, atol=ATOL, rtol=0)


# ---- transfer ------------------------------------------------------------------------------


def test_lambda_zero_is_identity() -> None:
    x = _images(3)
    target = amplitude_phase(_images(3, seed=1))[0]
    assert torch.equal(spectral_transfer(x, target, 0.1, 0.0, clip=False), x)
    assert torch.equal(spectral_transfer(x, target, 0.1, 0.0), x)  # x already in [0, 1]
    lam = torch.zeros(3)
    assert torch.equal(spectral_transfer(x, target, 0.1, lam), x)


def test_matches_the_textbook_formula() -> None:
    """x + ifft(Δ·e^{iP}) equals real(ifft(Â·e^{iP})) as written in the spec."""
    x, y = _images(2), _images(2, seed=1)
    amp_x, ph_x = amplitude_phase(x)
    amp_t = amplitude_phase(y)[0]
    win = low_freq_window(32, 32, 0.1)
    lam = 0.7
    blended = torch.where(win, (1 - lam) * amp_x + lam * amp_t, amp_x)
    ref = torch.fft.ifft2(torch.polar(blended, ph_x)).real
    out = spectral_transfer(x, amp_t, 0.1, lam, clip=False)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", [0.01, 0.05, 0.15])
def test_amplitude_blended_inside_window_unchanged_outside(beta: float) -> None:
    x, y = _images(4), _images(4, seed=1)
    amp_x, _ = amplitude_phase(x)
    amp_t = amplitude_phase(y)[0]
    lam = torch.tensor([0.0, 0.3, 0.7, 1.0])
    out = spectral_transfer(x, amp_t, beta, lam, clip=False)
    amp_o, _ = amplitude_phase(out)
    win = low_freq_window(32, 32, beta)
    scale = float(amp_x.max())
    tol = 1e-5 * scale
    # outside the window: the amplitude is untouched
    torch.testing.assert_close(amp_o[..., ~win], amp_x[..., ~win], atol=tol, rtol=0)
    # inside: the blend, per image
    lam4 = lam.view(-1, 1, 1, 1)
    expected = (1 - lam4) * amp_x + lam4 * amp_t
    torch.testing.assert_close(amp_o[..., win], expected[..., win], atol=tol, rtol=0)
    # only frequencies inside the window changed at all
    diff = torch.fft.fft2(out - x).abs()
    assert float(diff[..., ~win].max()) < tol


def test_lambda_one_gives_target_amplitude_inside_window() -> None:
    x, y = _images(2), _images(2, seed=3)
    amp_t = amplitude_phase(y)[0]
    out = spectral_transfer(x, amp_t, 0.1, 1.0, clip=False)
    win = low_freq_window(32, 32, 0.1)
    amp_o = amplitude_phase(out)[0]
    torch.testing.assert_close(
        amp_o[..., win], amp_t[..., win], atol=1e-5 * float(amp_t.max()), rtol=0
    )


def test_phase_is_kept() -> None:
    x, y = _images(3), _images(3, seed=2)
    amp_x, ph_x = amplitude_phase(x)
    amp_t = amplitude_phase(y)[0]
    out = spectral_transfer(x, amp_t, 0.15, torch.tensor([0.5, 0.8, 1.0]), clip=False)
    amp_o, ph_o = amplitude_phase(out)
    # compare angles where both amplitudes are non-negligible (the angle of ~0 is noise)
    sig = (amp_x > 1e-4 * float(amp_x.max())) & (amp_o > 1e-4 * float(amp_o.max()))
    assert float(sig.float().mean()) > 0.8
    assert float(_wrap(ph_o - ph_x)[sig].abs().max()) < 1e-2


def test_no_clipping_needed_for_these_inputs_and_clip_keeps_range() -> None:
    x, y = _images(2), _images(2, seed=1)
    amp_t = amplitude_phase(y)[0]
    raw = spectral_transfer(x, amp_t, 0.05, 0.8, clip=False)
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1  # the tests above test pre-clip
    assert torch.equal(spectral_transfer(x, amp_t, 0.05, 0.8), raw)
    # a target far brighter than x does clip, and the result stays in [0, 1]
    bright = amplitude_phase(torch.ones(1, 3, 32, 32) * 5.0)[0]
    out = spectral_transfer(x, bright, 0.05, 1.0)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out.max()) == 1.0


def test_target_broadcasts_and_moves_the_low_frequencies() -> None:
    x = _images(4)
    bank = amplitude_phase(_images(1, seed=5))[0][0]  # C×H×W
    out = spectral_transfer(x, bank, 0.05, 1.0, clip=False)
    out2 = spectral_transfer(x, bank.expand(4, -1, -1, -1), 0.05, 1.0, clip=False)
    torch.testing.assert_close(out, out2, atol=ATOL, rtol=0)
    # the mean (zero frequency) of every channel now equals the target's
    torch.testing.assert_close(
        out.mean(dim=(-2, -1)), (bank[:, 0, 0] / (32 * 32)).expand(4, -1), atol=1e-5, rtol=0
    )


def test_bad_arguments() -> None:
    x = _images(2)
    amp = amplitude_phase(x)[0]
    with pytest.raises(ValueError, match="lam"):
        spectral_transfer(x, amp, 0.05, 1.5)
    with pytest.raises(ValueError, match="lam"):
        spectral_transfer(x, amp, 0.05, torch.ones(3))
    with pytest.raises(ValueError, match="spatial size"):
        spectral_transfer(x, amp[..., :16], 0.05, 0.5)
    with pytest.raises(ValueError, match="float"):
        spectral_transfer(x.to(torch.int64), amp, 0.05, 0.5)


def test_float64_input_keeps_dtype() -> None:
    x = _images(2).double()
    amp = amplitude_phase(_images(2, seed=1).double())[0]
    out = spectral_transfer(x, amp, 0.05, 0.5)
    assert out.dtype == torch.float64


# ---- style bank -----------------------------------------------------------------------------


def test_style_bank_entry_is_amplitudes_of_a_seeded_subset() -> None:
    imgs = _images(10, c=1, h=16, w=16)
    amp_all = amplitude_phase(imgs)[0]
    bank = style_bank_entry(imgs, 4, torch.Generator().manual_seed(0))
    assert bank.shape == (4, 1, 16, 16)
    assert bank.dtype == torch.float32 and not bank.is_complex()
    # every entry is the amplitude spectrum of one distinct image of the client
    matches = [
        [i for i in range(10) if torch.allclose(bank[j], amp_all[i], atol=1e-6)] for j in range(4)
    ]
    assert all(len(m) == 1 for m in matches)
    assert len({m[0] for m in matches}) == 4
    again = style_bank_entry(imgs, 4, torch.Generator().manual_seed(0))
    assert torch.equal(bank, again)
    other = style_bank_entry(imgs, 4, torch.Generator().manual_seed(1))
    assert not torch.equal(bank, other)


def test_style_bank_entry_smaller_client_and_errors() -> None:
    imgs = _images(3, c=1, h=8, w=8)
    assert style_bank_entry(imgs, 16, torch.Generator().manual_seed(0)).shape[0] == 3
    with pytest.raises(ValueError, match="bank_size"):
        style_bank_entry(imgs, 0)
    with pytest.raises(ValueError, match="N×C×H×W"):
        style_bank_entry(imgs[0], 2)


def test_bank_entry_drives_a_transfer() -> None:
    a, b = _images(4, seed=0), _images(6, seed=9) * 0.5
    bank = style_bank_entry(b, 3, torch.Generator().manual_seed(0))
    lam = torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    pick = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))
    out = spectral_transfer(a, bank[pick], 0.05, lam)
    assert out.shape == a.shape
    # b is darker: the transferred images moved towards its brightness
    assert float(out.mean()) < float(a.mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x, y = _images(4), _images(4, seed=1)
    amp_t = amplitude_phase(y)[0]
    lam = torch.tensor([0.2, 0.5, 0.8, 1.0])
    cpu = spectral_transfer(x, amp_t, 0.05, lam)
    gpu = spectral_transfer(x.cuda(), amp_t.cuda(), 0.05, lam.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    win = low_freq_window(32, 32, 0.05, device="cuda")
    assert win.is_cuda and torch.equal(win.cpu(), low_freq_window(32, 32, 0.05))
    bank = style_bank_entry(x.cuda(), 2, torch.Generator().manual_seed(0))
    assert bank.is_cuda and bank.shape == (2, 3, 32, 32)
