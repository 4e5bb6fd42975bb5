"""pytest-benchmark: the core kernels every run leans on, each beside a reference to read ratios from.

Run with ``pytest tests/benchmarks/test_bench_core.py --benchmark-enable``; without it (the
default run) each benchmark runs once as a smoke test, and every test still checks its result.
Groups (compare the rows inside one group, measured in one run):

* ``aggregate-10x2M``: the server step of one round, 10 clients × the engine benchmark's U-Net
  (base 16, depth 4: 1.95 M floating-point entries in 118 tensors). ``masked_average`` with whole
  tensors (FedAvg) and with element masks (ResFIM), against a plain PyTorch weighted sum
  (``torch.stack`` per entry, float32): the price of float64 accumulation and of masks.
* ``spectral-64`` / ``spectral-256``: ``spectral_transfer`` on a batch (16×3×64², 4×3×256²),
  against the bare FFT round trip (``fft2`` + ``ifft2``) it cannot be cheaper than.
* ``hd95-128`` / ``hd95-256``: ``metrics.hd95`` on two irregular overlapping blobs, against
  MedPy's ``hd95`` (same definition; the test checks both give the same value).
* ``synthetic``: generating a federation (``Synthetic(...).load()``) at 64², fundus (RGB, 90
  images, JPEG-like quantisation) and prostate (grey volumes, 140 slices).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflbench.aggregation import masked_average
from pflbench.datasets.synthetic import Synthetic
from pflbench.messages import Upload
from pflbench.metrics import hd95
from pflbench.models import UNet
from pflbench.spectral import amplitude_phase, low_freq_window, spectral_transfer

CLIENTS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, as in the suites' pinned protocol, so the numbers compare across machines."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Aggregation: 10 clients × 2 M parameters
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uploads() -> dict[str, dict[str, Upload]]:
    """Per-client uploads of a 1.95 M-entry U-Net: whole tensors, and with ~70 % element masks."""
    shapes = {
        k: v.shape
        for k, v in UNet(3, 3, base=16, depth=4).state_dict().items()
        if v.is_floating_point()
    }
    g = torch.Generator().manual_seed(0)
    whole, masked = {}, {}
    for i in range(CLIENTS):
        entries = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        masks = {k: torch.rand(s, generator=g) < 0.7 for k, s in shapes.items()}
        weight = float(10 + 3 * i)
        whole[f"c{i}"] = Upload(entries=entries, weight=weight)
        masked[f"c{i}"] = Upload(entries=entries, weight=weight, masks=masks)
    return {"whole": whole, "masked": masked}


def test_uploads_are_2m_parameters(uploads: dict[str, dict[str, Upload]]) -> None:
    n = sum(t.numel() for t in uploads["whole"]["c0"].entries.values())
    assert 1.9e6 < n < 2.1e6


@pytest.mark.benchmark(group="aggregate-10x2M")
def test_masked_average_whole(benchmark, uploads: dict[str, dict[str, Upload]]) -> None:
    ups = uploads["whole"]
    msg = benchmark(masked_average, ups)
    total = sum(u.weight for u in ups.values())
    k = "head.weight" if "head.weight" in msg.entries else next(iter(msg.entries))
    expected = sum(u.entries[k].double() * (u.weight / total) for u in ups.values()).float()
    torch.testing.assert_close(msg.entries[k], expected, rtol=1e-6, atol=1e-6)
    assert not msg.masks  # every element shared by every client


@pytest.mark.benchmark(group="aggregate-10x2M")
def test_masked_average_elementwise(benchmark, uploads: dict[str, dict[str, Upload]]) -> None:
    ups = uploads["masked"]
    msg = benchmark(masked_average, ups)
    k = next(iter(msg.entries))
    num = sum(u.entries[k].double() * u.masks[k] * u.weight for u in ups.values())
    den = sum(u.masks[k].double() * u.weight for u in ups.values())
    covered = den > 0
    expected = torch.where(covered, num / den.clamp_min(1e-300), 0.0).float()
    got = msg.entries[k]
    torch.testing.assert_close(got[covered], expected[covered], rtol=1e-6, atol=1e-6)


@pytest.mark.benchmark(group="aggregate-10x2M")
def test_plain_weighted_sum(benchmark, uploads: dict[str, dict[str, Upload]]) -> None:
    """The floor: a float32 weighted sum per entry in plain PyTorch, no masks, no float64."""
    ups = list(uploads["whole"].values())
    total = sum(u.weight for u in ups)
    w = torch.tensor([u.weight / total for u in ups])
    keys = list(ups[0].entries)

    def plain() -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            stacked = torch.stack([u.entries[k] for u in ups])
            out[k] = torch.tensordot(w, stacked, dims=1)
        return out

    out = benchmark(plain)
    ref = masked_average(uploads["whole"])
    for k in keys[:5]:
        torch.testing.assert_close(out[k], ref.entries[k], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Spectral transfer
# ---------------------------------------------------------------------------------------------

SPECTRAL = [(16, 64), (4, 256)]


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("n, size", SPECTRAL, ids=[f"{n}x3x{s}" for n, s in SPECTRAL])
def test_spectral_transfer(benchmark, n: int, size: int) -> None:
    benchmark.group = f"spectral-{size}"
    x = _images(n, size, 0)
    target, _ = amplitude_phase(_images(n, size, 1))
    lam = torch.full((n,), 0.5)
    out = benchmark(spectral_transfer, x, target, 0.05, lam, clip=False)
    # Inside the window the amplitude moved halfway towards the target; outside it did not move.
    window = low_freq_window(size, size, 0.05)
    a_x, _ = amplitude_phase(x)
    a_out, _ = amplitude_phase(out)
    torch.testing.assert_close(
        a_out[..., window], (0.5 * a_x + 0.5 * target)[..., window], rtol=1e-3, atol=1e-2
    )
    torch.testing.assert_close(a_out[..., ~window], a_x[..., ~window], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("n, size", SPECTRAL, ids=[f"{n}x3x{s}" for n, s in SPECTRAL])
def test_fft_round_trip(benchmark, n: int, size: int) -> None:
    """The floor of any amplitude transfer: one forward and one inverse 2-D FFT."""
    benchmark.group = f"spectral-{size}"
    x = _images(n, size, 0)
    out = benchmark(lambda: torch.fft.ifft2(torch.fft.fft2(x)).real)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# HD95
# ---------------------------------------------------------------------------------------------


def _blobs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping blobs with wavy borders (a prediction and its ground truth)."""
    yy, xx = np.mgrid[:size, :size] / size
    ang = np.arctan2(yy - 0.5, xx - 0.5)
    r = np.hypot(yy - 0.5, xx - 0.5)
    true = r < 0.3 + 0.03 * np.sin(5 * ang)
    r2 = np.hypot(yy - 0.52, xx - 0.47)
    pred = r2 < 0.28 + 0.04 * np.sin(7 * ang + 1.0)
    return pred, true


@pytest.mark.parametrize("size", [128, 256])
def test_hd95_pflbench(benchmark, size: int) -> None:
    benchmark.group = f"hd95-{size}"
    pred, true = _blobs(size)
    value = benchmark(hd95, pred, true)
    assert 0 < value < size / 4


@pytest.mark.parametrize("size", [128, 256])
def test_hd95_medpy(benchmark, size: int) -> None:
    """MedPy's implementation of the same definition, for the ratio (and the value)."""
    binary = pytest.importorskip("medpy.metric.binary")
    benchmark.group = f"hd95-{size}"
    pred, true = _blobs(size)
    value = benchmark(binary.hd95, pred, true)
    assert value == pytest.approx(hd95(pred, true), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Synthetic data generation
# ---------------------------------------------------------------------------------------------


#: The flavours' documented default images per site (Synthetic's docstring).
DEFAULT_IMAGES = {"fundus": [12, 18, 30, 30], "prostate": [32, 32, 24, 20, 16, 16]}


@pytest.mark.parametrize("flavour", list(DEFAULT_IMAGES))
@pytest.mark.benchmark(group="synthetic")
def test_synthetic_load(benchmark, flavour: str) -> None:
    def load():
        return Synthetic(flavour=flavour, size=64, seed=0).load()

    data = benchmark(load)
    assert [len(s) for s in data.sites] == DEFAULT_IMAGES[flavour]
    for site in data.sites:
        assert tuple(site.images.shape[-2:]) == (64, 64)
        assert 0 <= int(site.labels.min()) and int(site.labels.max()) < data.num_classes
