"""The synthetic multi-site generator: determinism, validity, the two shift families, the cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pflbench.data import DataError, FederatedData, SiteData, make_splits
from pflbench.datasets.synthetic import (
    AcquisitionParams,
    Synthetic,
    apply_acquisition,
    site_acquisition,
)
from pflbench.spectral import amplitude_phase, low_freq_window, spectral_transfer

FLAVOURS = ("fundus", "prostate", "polyp")
CHANNELS = {"fundus": 3, "prostate": 1, "polyp": 3}


def _load(**kw) -> FederatedData:
    kw.setdefault("size", 32)
    return Synthetic(**kw).load()


def _lf_amplitude(images: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Mean amplitude spectrum of a set of images, inside the low-frequency window."""
    h, w = images.shape[-2:]
    return amplitude_phase(images)[0].mean(0)[..., low_freq_window(h, w, beta)]


def _rel_spread(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.ptp(v) / np.mean(v))


# ---- shapes, dtypes, labels ---------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_defaults_shapes_dtypes_ranges(flavour: str) -> None:
    data = _load(flavour=flavour)
    k = {"fundus": 4, "prostate": 6, "polyp": 4}[flavour]
    assert len(data.sites) == k and data.site_names == [f"site{i + 1}" for i in range(k)]
    assert data.in_channels == CHANNELS[flavour]
    sizes = [len(s) for s in data.sites]
    assert len(set(sizes)) > 1  # sites differ in size, as real ones do
    n_classes = len(data.classes)
    for s in data.sites:
        assert s.images.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert s.images.shape[1:] == (CHANNELS[flavour], 32, 32)
        assert s.labels.shape == (len(s), 32, 32)
        assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
        assert torch.isfinite(s.images).all()
        ids = set(torch.unique(s.labels).tolist())
        assert ids <= set(range(n_classes)) and ids == set(range(n_classes))
    for ids in data.structures.values():
        assert all(0 < i < n_classes for i in ids)
    make_splits(data)  # every site has enough cases for train / val / test


def test_fundus_semantics_and_cup_inside_disc() -> None:
    data = _load(flavour="fundus", label_shift=1.0)
    assert data.classes == ["background", "disc", "cup"]
    assert data.structures == {"disc": [1, 2], "cup": [2]}
    assert data.case_level == "image"
    for s in data.sites:
        lab = s.labels
        disc, cup = lab >= 1, lab == 2
        assert bool((disc.flatten(1).sum(1) > cup.flatten(1).sum(1)).all())
        assert bool((cup.flatten(1).sum(1) > 0).all())
        # no cup pixel touches the background: the cup is enclosed by the disc rim
        padded = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=0)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            neighbour = padded[:, dy : dy + lab.shape[1], dx : dx + lab.shape[2]]
            assert not bool((cup & (neighbour == 0)).any())
        assert len(set(s.case_ids)) == len(s)  # one case per image


def test_prostate_volumes_change_smoothly() -> None:
    data = _load(flavour="prostate", slices_per_case=6, images_per_site=[24, 18, 18])
    assert data.case_level == "volume" and data.structures == {"prostate": [1]}
    for s in data.sites:
        assert len(s.cases) == len(s) // 6
        for case in s.cases:
            idx = [i for i, c in enumerate(s.case_ids) if c == case]
            assert [s.slice_index[i] for i in idx] == list(range(6))
            masks = s.labels[idx] > 0
            areas = masks.flatten(1).sum(1).float()
            assert float(areas.min()) > 0
            for a, b in zip(masks[:-1], masks[1:], strict=True):
                iou = float((a & b).sum()) / float((a | b).sum())
                assert iou > 0.5
            # the organ is largest in the middle of the volume
            assert float(areas[2:4].max()) >= float(areas[[0, -1]].max())


def test_empty_fraction_gives_empty_images() -> None:
    data = _load(flavour="polyp", empty_fraction=0.4, images_per_site=[40] * 4)
    rates = [float((s.labels.flatten(1).amax(1) == 0).float().mean()) for s in data.sites]
    assert 0.2 < float(np.mean(rates)) < 0.6
    assert _load(flavour="polyp")  # default: no empty image
    none = [int((s.labels.flatten(1).amax(1) == 0).sum()) for s in _load(flavour="polyp").sites]
    assert sum(none) == 0
    pro = _load(flavour="prostate", empty_fraction=0.3, slices_per_case=6, images_per_site=[60] * 3)
    for s in pro.sites:
        empty = (s.labels.flatten(1).amax(1) == 0).tolist()
        assert any(empty)
        # empty slices sit at the ends of a volume: never a middle slice while an end has the organ
        for c in range(len(s) // 6):
            e = empty[c * 6 : (c + 1) * 6]
            if e[2] or e[3]:
                assert e[0] and e[-1]


# ---- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_same_seed_same_data_bitwise(flavour: str) -> None:
    a, b = _load(flavour=flavour, seed=3), _load(flavour=flavour, seed=3)
    assert a.fingerprint() == b.fingerprint()
    for sa, sb in zip(a.sites, b.sites, strict=True):
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
        assert sa.case_ids == sb.case_ids and sa.slice_index == sb.slice_index
    c = _load(flavour=flavour, seed=4)
    assert c.fingerprint() != a.fingerprint()
    assert not torch.equal(a.sites[0].labels, c.sites[0].labels)
    assert not torch.equal(a.sites[0].images, c.sites[0].images)


def test_shift_families_use_independent_streams() -> None:
    # appearance knob: labels are bitwise unchanged
    a0, a1 = _load(appearance_shift=0.0), _load(appearance_shift=1.5)
    for s0, s1 in zip(a0.sites, a1.sites, strict=True):
        assert torch.equal(s0.labels, s1.labels)
        assert not torch.equal(s0.images, s1.images)
    # label knob: acquisition chains are unchanged
    l0, l1 = Synthetic(label_shift=0.0), Synthetic(label_shift=1.0)
    assert l0.site_designs()[1] == l1.site_designs()[1]
    assert l0.site_designs()[0] != l1.site_designs()[0]


def test_options_round_trip() -> None:
    ds = Synthetic(flavour="polyp", sites=3, size=48, seed=2)
    opts = ds.options()
    assert opts == {
        "flavour": "polyp",
        "sites": 3,
        "size": 48,
        "images_per_site": None,
        "slices_per_case": 4,
        "appearance_shift": 1.0,
        "label_shift": 0.5,
        "annotation_shift": 0.0,
        "empty_fraction": 0.0,
        "seed": 2,
        "cache_dir": None,
    }
    again = Synthetic(**opts)
    assert again.cache_key() == ds.cache_key()
    assert len(again.load().sites) == 3


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"flavour": "retina"}, "flavour"),
        ({"size": 8}, "size"),
        ({"size": 32.0}, "size"),
        ({"sites": 0}, "sites"),
        ({"sites": 3, "images_per_site": [10, 10]}, "images_per_site"),
        ({"images_per_site": [10, 2]}, "images_per_site"),
        ({"images_per_site": []}, "images_per_site"),
        ({"images_per_site": [10, "x"]}, "images_per_site"),
        ({"flavour": "prostate", "images_per_site": [16, 10, 12]}, "images_per_site"),
        ({"flavour": "prostate", "slices_per_case": 0}, "slices_per_case"),
        ({"appearance_shift": -0.1}, "appearance_shift"),
        ({"appearance_shift": float("nan")}, "appearance_shift"),
        ({"label_shift": "big"}, "label_shift"),
        ({"label_shift": 10}, "label_shift"),
        ({"empty_fraction": 1.0}, "empty_fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"cache_dir": ""}, "cache_dir"),
    ],
)
def test_option_validation_names_the_option(kw: dict, option: str) -> None:
    with pytest.raises(DataError) as err:
        Synthetic(**kw)
    assert option in str(err.value)


def test_sites_and_counts_resolution() -> None:
    assert [len(s) for s in _load(sites=6).sites] == [12, 18, 30, 30, 12, 18]
    assert [len(s) for s in _load(images_per_site=[5, 6, 7]).sites] == [5, 6, 7]
    pro = _load(flavour="prostate")
    assert [len(s) for s in pro.sites] == [32, 32, 24, 20, 16, 16]
    assert [len(s.cases) for s in pro.sites] == [8, 8, 6, 5, 4, 4]


# ---- the two shift families ----------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_appearance_shift_is_measurable_only_when_on(flavour: str) -> None:
    def spreads(shift: float) -> tuple[float, float, float]:
        data = _load(
            flavour=flavour, appearance_shift=shift, label_shift=0.0, images_per_site=[40] * 4
        )
        means = [float(s.images.mean()) for s in data.sites]
        stds = [float(s.images.std()) for s in data.sites]
        lf = [float(_lf_amplitude(s.images).mean()) for s in data.sites]
        return float(np.ptp(means)), float(np.ptp(stds)), _rel_spread(lf)

    m0, s0, lf0 = spreads(0.0)
    m1, s1, lf1 = spreads(1.0)
    assert m0 < 0.015 and s0 < 0.01 and lf0 < 0.06
    assert m1 > 0.08 and s1 > 0.04 and lf1 > 0.15
    assert m1 > 5 * m0 and lf1 > 3 * lf0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_label_shift_is_measurable_only_when_on(flavour: str) -> None:
    def spread(shift: float) -> float:
        data = _load(
            flavour=flavour, appearance_shift=1.0, label_shift=shift, images_per_site=[40] * 4
        )
        return _rel_spread([float((s.labels > 0).float().mean()) for s in data.sites])

    off, on = spread(0.0), spread(1.0)
    assert off < 0.25 and on > 0.5 and on > 3 * off


def test_label_shift_moves_cup_to_disc_ratio() -> None:
    def ratios(shift: float) -> list[float]:
        data = _load(flavour="fundus", label_shift=shift, images_per_site=[30] * 4)
        return [float((s.labels == 2).sum() / (s.labels >= 1).sum()) for s in data.sites]

    assert np.ptp(ratios(0.0)) < 0.05
    assert np.ptp(ratios(1.0)) > 0.15


def _dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = (pred & target).flatten(1).sum(1).float()
    den = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).float()
    return float(torch.where(den > 0, 2 * inter / den.clamp(min=1), torch.ones_like(den)).mean())


def _train_and_score(appearance_shift: float) -> tuple[float, list[float]]:
    """A 2-layer conv net trained on site1 (2/3 of it) for the disc; Dice on site1's rest and
    on every other site."""
    data = _load(
        flavour="fundus",
        appearance_shift=appearance_shift,
        label_shift=0.5,
        images_per_site=[24] * 4,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        a = data.sites[0]
        x, y = a.images[:16], (a.labels[:16] > 0).float()[:, None]
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 1, 3, padding=1),
        )
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(60):
            opt.zero_grad()
            z = net(x)
            p = torch.sigmoid(z)
            dice_loss = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + dice_loss
            loss.backward()
            opt.step()
        with torch.no_grad():
            own = _dice(net(a.images[16:])[:, 0] > 0, a.labels[16:] > 0)
            others = [_dice(net(s.images)[:, 0] > 0, s.labels > 0) for s in data.sites[1:]]
    finally:
        torch.set_num_threads(threads)
    return own, others


def test_a_model_trained_on_one_site_scores_lower_on_the_others() -> None:
    own, others = _train_and_score(1.0)
    assert own > 0.85  # the task is learnable on the site itself
    assert min(others) < own - 0.2
    assert float(np.mean(others)) < own - 0.1
    # control: without appearance shift the other sites score like the own held-out images
    own0, others0 = _train_and_score(0.0)
    assert own0 > 0.85
    assert abs(float(np.mean(others0)) - own0) < 0.05


def test_amplitude_transfer_removes_low_frequency_shift_not_label_shift() -> None:
    data = _load(
        flavour="fundus", size=64, appearance_shift=1.0, label_shift=1.0, images_per_site=[24] * 4
    )
    a, b = data.sites[0], data.sites[1]
    lf_b = _lf_amplitude(b.images)
    target = amplitude_phase(b.images)[0].mean(0)  # site B's mean style, C×H×W
    moved = spectral_transfer(a.images, target, beta=0.05, lam=1.0)
    transferred = SiteData(name="site1->site2", images=moved, labels=a.labels, case_ids=a.case_ids)

    def lf_gap(x: torch.Tensor) -> float:
        return float((_lf_amplitude(x) - lf_b).norm() / lf_b.norm())

    before, after = lf_gap(a.images), lf_gap(transferred.images)
    assert after < 0.5 * before
    assert float(moved.min()) >= 0 and float(moved.max()) <= 1
    # labels (hence every label statistic) are untouched, so the label shift to B remains
    assert transferred.labels is a.labels

    def area(s: SiteData) -> float:
        return float((s.labels > 0).float().mean())

    assert area(transferred) == area(a)
    assert abs(area(transferred) - area(b)) > 0.02


# ---- acquisition chain (public API) ---------------------------------------------------------


def test_identity_acquisition_and_shapes() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((3, 20, 20)).astype(np.float32)
    out = apply_acquisition(img, AcquisitionParams(), np.random.default_rng(1))
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    batch = rng.random((2, 1, 19, 21)).astype(np.float32)
    for modality in ("mri", "camera"):
        p = site_acquisition(1, 3, 1.5, np.random.default_rng(0), modality)
        o = apply_acquisition(batch, p, np.random.default_rng(2))
        assert o.shape == batch.shape and o.dtype == np.float32
        assert o.min() >= 0 and o.max() <= 1
        o2 = apply_acquisition(batch, p, np.random.default_rng(2))
        np.testing.assert_array_equal(o, o2)
    cam = site_acquisition(0, 3, 1.5, np.random.default_rng(0), "camera")
    rgb = apply_acquisition(rng.random((3, 19, 21)), cam, np.random.default_rng(0))
    assert rgb.shape == (3, 19, 21)


def test_site_acquisition_design() -> None:
    def sites(strength: float, modality: str) -> list[AcquisitionParams]:
        return [
            site_acquisition(k, 4, strength, np.random.default_rng(7), modality) for k in range(4)
        ]

    for modality in ("mri", "camera"):
        base = sites(0.0, modality)
        assert all(p == base[0] for p in base)  # no shift: every site the same
        shifted = sites(1.0, modality)
        # a Latin hypercube over the sites: all sites differ in every drawn parameter
        for field in ("gamma", "contrast", "brightness", "blur", "noise_sigma"):
            assert len({getattr(p, field) for p in shifted}) == 4
        assert shifted[0].noise == ("rician" if modality == "mri" else "poisson-gaussian")
    with pytest.raises(ValueError, match="modality"):
        site_acquisition(0, 2, 1.0, np.random.default_rng(0), "xray")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=2"):
        site_acquisition(2, 2, 1.0, np.random.default_rng(0), "mri")
    with pytest.raises(ValueError, match="strength"):
        site_acquisition(0, 2, -1.0, np.random.default_rng(0), "mri")


def test_rician_noise_is_positive_biased_on_dark_images() -> None:
    p = AcquisitionParams(modality="mri", noise="rician", noise_sigma=0.05)
    dark = np.zeros((1, 64, 64), dtype=np.float32)
    out = apply_acquisition(dark, p, np.random.default_rng(0))
    # Rayleigh on a zero signal: mean σ·sqrt(π/2)
    assert abs(float(out.mean()) - 0.05 * np.sqrt(np.pi / 2)) < 0.005


def test_source_records_site_parameters() -> None:
    data = _load()
    sites = data.source["sites"]
    assert set(sites) == set(data.site_names)
    assert {"label", "acquisition"} <= set(sites["site1"])
    assert data.source["flavour"] == "fundus" and data.source["seed"] == 0


# ---- cache and speed ------------------------------------------------------------------------


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Synthetic(flavour="prostate", size=32, cache_dir=str(tmp_path))
    first = ds.load()
    assert not ds.loaded_from_cache
    files = list(tmp_path.glob("*.npz"))
    assert files == [ds.cache_path()]

    def boom(self: Synthetic) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(Synthetic, "_generate", boom)
    again = Synthetic(flavour="prostate", size=32, cache_dir=str(tmp_path))
    second = again.load()
    assert again.loaded_from_cache
    assert second.fingerprint() == first.fingerprint()
    for s1, s2 in zip(first.sites, second.sites, strict=True):
        assert torch.equal(s1.images, s2.images) and torch.equal(s1.labels, s2.labels)
        assert s1.case_ids == s2.case_ids and s1.slice_index == s2.slice_index
    assert second.case_level == "volume"
    # other options → another key
    assert (
        Synthetic(flavour="prostate", size=32, seed=1, cache_dir=str(tmp_path)).cache_path()
        != ds.cache_path()
    )
    # the cache location is not part of the key
    assert Synthetic(flavour="prostate", size=32).cache_key() == ds.cache_key()


def test_unwritable_cache_dir_only_warns(tmp_path: Path) -> None:
    """As for the real datasets: the data are still generated; only the cache is skipped."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ds = Synthetic(size=16, cache_dir=str(blocker / "cache"))
    with pytest.warns(UserWarning, match=r"could not write the dataset cache .*a-file"):
        data = ds.load()
    assert data.fingerprint() == Synthetic(size=16).load().fingerprint()
    assert not ds.loaded_from_cache and blocker.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # no temporary file left behind


def test_corrupt_cache_is_regenerated(tmp_path: Path) -> None:
    ds = Synthetic(size=32, cache_dir=str(tmp_path))
    path = ds.cache_path()
    assert path is not None
    path.write_bytes(b"not an npz")
    data = ds.load()
    assert not ds.loaded_from_cache
    assert data.fingerprint() == Synthetic(size=32).load().fingerprint()
    Synthetic(size=32, cache_dir=str(tmp_path)).load()
    reread = Synthetic(size=32, cache_dir=str(tmp_path))
    reread.load()
    assert reread.loaded_from_cache


def test_default_fundus_is_fast() -> None:
    Synthetic().load()  # warm up imports
    t = time.perf_counter()
    data = Synthetic().load()
    elapsed = time.perf_counter() - t
    assert data.sites[0].images.shape[-1] == 64
    assert elapsed < 1.0, f"default fundus federation took {elapsed:.2f}s"


def test_jpeg_like_quantisation_grows_as_quality_drops() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((3, 37, 40)).astype(np.float32)  # not a multiple of 8: padded blocks
    errors = []
    for quality in (100, 75, 30):
        p = AcquisitionParams(jpeg_quality=quality)
        out = apply_acquisition(img, p, np.random.default_rng(0))
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        errors.append(float(np.abs(out - img).mean()))
    assert errors[0] < 0.01 and errors[0] < errors[1] < errors[2]


# --------------------------------------------------------------------------- annotation shift


def _syn(**kw):
    from pflbench.datasets.synthetic import Synthetic

    base = dict(flavour="prostate", size=24, images_per_site=[4] * 6, slices_per_case=1, seed=3)
    return Synthetic(**{**base, **kw})


def test_annotation_shift_moves_only_the_boundaries_of_each_sites_labels():
    from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure

    plain, shifted = _syn(), _syn(annotation_shift=2.0)
    offsets = shifted.annotation_offsets()
    assert max(offsets) > 0 > min(offsets) and max(map(abs, offsets)) <= 2
    cross = generate_binary_structure(2, 1)[None]
    a, b = plain.load(), shifted.load()
    for sa, sb, off in zip(a.sites, b.sites, offsets, strict=True):
        assert torch.equal(sa.images, sb.images)  # images untouched: a pure P(label | image) shift
        lab = sa.labels.numpy() >= 1
        if off > 0:
            want = binary_dilation(lab, structure=cross, iterations=off)
        elif off < 0:
            want = binary_erosion(lab, structure=cross, iterations=-off)
        else:
            want = lab
        np.testing.assert_array_equal(sb.labels.numpy(), want.astype(np.int64))


def test_no_annotation_shift_leaves_data_and_cache_key_as_before():
    a, b = _syn(), _syn(annotation_shift=0.0)
    assert a.cache_key() == b.cache_key() and "annotation_shift" not in a._resolved()
    assert a.load().fingerprint() == b.load().fingerprint()
    assert _syn(annotation_shift=1.0).cache_key() != a.cache_key()


def test_annotation_shift_keeps_nested_structures_nested():
    from pflbench.datasets.synthetic import _annotate

    lab = np.zeros((1, 9, 9), dtype=np.int64)
    lab[0, 2:7, 2:7] = 1
    lab[0, 4, 4] = 2  # a one-pixel cup inside the disc
    grown = _annotate(lab, 1)
    assert grown[0, 3:6, 4].tolist() == [2, 2, 2] and grown[0, 1, 4] == 1 and grown[0, 0, 4] == 0
    shrunk = _annotate(lab, -1)
    assert (shrunk == 2).sum() == 0 and (shrunk == 1).sum() == 9  # 5×5 disc → 3×3, cup gone
    assert ((grown == 2) <= (grown >= 1)).all()


def test_annotation_shift_out_of_range_is_refused():
    from pflbench.data import DataError

    with pytest.raises(DataError, match="'annotation_shift' must be a number of pixels in"):
        _syn(annotation_shift=9)
