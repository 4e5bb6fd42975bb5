"""Real anatomy, synthetic sites: offline real image + mask pairs dealt into acquisition-shifted sites.

The tests that need the packaged files (Debian insighttoolkit5-examples, mricron-data, the
stardist wheel) skip when they are absent; the others build their own small source files.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import write_nifti, write_pillow

from pflbench.data import DataError, make_splits
from pflbench.datasets import anatomy
from pflbench.datasets.anatomy import Anatomy

SOURCES = list(anatomy.SOURCES)


def need(source: str) -> None:
    try:
        Anatomy(source=source).paths()
    except DataError as exc:
        pytest.skip(f"source {source!r} not installed: {str(exc).splitlines()[0]}")


def brain_volume(tmp_path: Path) -> tuple[Path, Path]:
    """A 32×32×24 'head' with a spherical 'brain' in slices 4–19."""
    zz, yy, xx = np.mgrid[:24, :32, :32]
    zz, yy, xx = (a.transpose(1, 2, 0) for a in (zz, yy, xx))
    brain = ((yy - 16) ** 2 + (xx - 16) ** 2) / 100 + (zz - 12) ** 2 / 64 <= 1
    rng = np.random.default_rng(0)
    vol = (40 + 80 * brain + rng.normal(0, 5, brain.shape)).clip(0, 255).astype(np.int16)
    return (
        write_nifti(tmp_path / "head.nii.gz", vol, (1.0, 1.0, 1.0)),
        write_nifti(tmp_path / "brain.nii.gz", brain.astype(np.uint8), (1.0, 1.0, 1.0)),
    )


def nuclei_image(tmp_path: Path) -> tuple[Path, Path]:
    """A 128×128 grey TIF with bright disks and its instance-label TIF (Pillow)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    labels = np.zeros((128, 128), np.uint8)
    for i, (cy, cx) in enumerate(rng.uniform(6, 122, size=(60, 2)), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = i
    img = (20 + 150 * (labels > 0) + rng.normal(0, 8, labels.shape)).clip(0, 255).astype(np.uint8)
    return write_pillow(tmp_path / "img.tif", img), write_pillow(tmp_path / "mask.tif", labels)


def assert_valid(data, n_sites: int, size: int) -> None:
    assert data.site_names == [f"site{k + 1}" for k in range(n_sites)]
    seen: set[str] = set()
    for s in data.sites:
        assert len(s.cases) >= 3 and len(s.cases) == len(s)
        assert not seen & set(s.cases), "a slice / tile is in two sites"
        seen |= set(s.cases)
        assert s.images.dtype == torch.float32 and s.images.shape[1:] == (1, size, size)
        assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
        assert s.labels.dtype == torch.int64 and set(torch.unique(s.labels).tolist()) <= {0, 1}
        assert all(bool(s.labels[i].any()) for i in range(len(s)))
    splits = make_splits(data)
    for parts in splits.values():
        flat = [c for ids in parts.values() for c in ids]
        assert len(flat) == len(set(flat))


# ------------------------------------------------------------------------------------------
# The packaged sources (skip when absent)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_packaged_source_loads(source: str) -> None:
    need(source)
    had_stardist = "stardist" in sys.modules
    data = Anatomy(source=source).load()
    assert_valid(data, 4, 64)
    assert data.classes[0] == "background" and data.num_classes == 2
    assert data.source["source"] == source and Path(data.source["image"]).is_file()
    if not had_stardist:
        assert "stardist" not in sys.modules, "stardist must never be imported"


@pytest.mark.parametrize("source", SOURCES)
def test_packaged_source_is_deterministic(source: str) -> None:
    need(source)
    a = Anatomy(source=source, sites=3, size=32, seed=3).load()
    b = Anatomy(source=source, sites=3, size=32, seed=3).load()
    c = Anatomy(source=source, sites=3, size=32, seed=4).load()
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert [s.cases for s in a.sites] != [s.cases for s in c.sites]


def test_packaged_check_reports_sites() -> None:
    need("brain-t1")
    report = Anatomy(source="brain-t1", sites=2).check()
    assert report.ok and list(report.sites) == ["site1", "site2"]
    assert report.sites["site1"]["label_values"] == [0, 1]


# ------------------------------------------------------------------------------------------
# With source files given by path (always run)
# ------------------------------------------------------------------------------------------


def test_volume_from_paths(tmp_path: Path) -> None:
    image, mask = brain_volume(tmp_path)
    ds = Anatomy(source="brain-t1", image_path=str(image), mask_path=str(mask), sites=3, size=16)
    data = ds.load()
    assert_valid(data, 3, 16)
    import nibabel as nib

    brain = np.asarray(nib.load(str(mask)).dataobj) > 0
    kept = [f"slice{z:03d}" for z in range(brain.shape[2]) if brain[:, :, z].mean() >= 0.01]
    assert 10 < len(kept) < brain.shape[2]
    assert sorted(c for s in data.sites for c in s.cases) == kept  # slices with ≥ 1 % brain
    assert data.source["image"] == str(image)


def test_tiles_from_paths(tmp_path: Path) -> None:
    image, mask = nuclei_image(tmp_path)
    ds = Anatomy(source="nuclei", image_path=str(image), mask_path=str(mask), crop=32, size=32)
    data = ds.load()
    assert_valid(data, 4, 32)
    assert sum(len(s) for s in data.sites) == 16  # 4 × 4 tiles of 32 px
    assert data.classes == ["background", "nucleus"]


def test_appearance_shift_moves_images_not_labels(tmp_path: Path) -> None:
    image, mask = brain_volume(tmp_path)
    kw = {"image_path": str(image), "mask_path": str(mask), "sites": 3, "size": 16}
    flat = Anatomy(appearance_shift=0.0, **kw).load()
    shifted = Anatomy(appearance_shift=2.0, **kw).load()
    from pflbench.datasets.synthetic import AcquisitionParams, apply_acquisition

    probe = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(1, 16, 16)

    def through(chain: dict) -> np.ndarray:
        params = AcquisitionParams(**chain)
        return apply_acquisition(probe, params, np.random.default_rng(0))

    same = [through(c) for c in flat.source["acquisition"].values()]
    assert all(np.array_equal(o, same[0]) for o in same), "strength 0: one chain for all sites"
    moved = [through(c) for c in shifted.source["acquisition"].values()]
    assert not np.array_equal(moved[0], moved[1])
    for a, b in zip(flat.sites, shifted.sites, strict=True):
        assert a.cases == b.cases
        assert torch.equal(a.labels, b.labels)
        assert not torch.equal(a.images, b.images)
    # a stronger shift spreads the sites' mean intensities further apart
    spread = [
        float(torch.std(torch.stack([s.images.mean() for s in d.sites]))) for d in (flat, shifted)
    ]
    assert spread[1] > spread[0]


def test_too_many_sites(tmp_path: Path) -> None:
    image, mask = brain_volume(tmp_path)
    with pytest.raises(DataError, match="use at most 5 sites"):
        Anatomy(image_path=str(image), mask_path=str(mask), sites=6, size=16).load()


def test_mismatched_mask(tmp_path: Path) -> None:
    image, _ = brain_volume(tmp_path)
    bad = write_nifti(tmp_path / "bad.nii.gz", np.ones((8, 8, 8), np.uint8))
    with pytest.raises(DataError, match="bad.nii.gz"):
        Anatomy(image_path=str(image), mask_path=str(bad)).load()


def test_missing_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = dataclasses.replace(
        anatomy.SOURCES["colin27"], image=str(tmp_path / "ch2.nii.gz"), mask=str(tmp_path / "m")
    )
    monkeypatch.setitem(anatomy.SOURCES, "colin27", gone)
    with pytest.raises(DataError) as err:
        Anatomy(source="colin27").load()
    msg = str(err.value)
    assert "mricron-data" in msg and "apt-get install mricron-data" in msg
    assert str(tmp_path / "ch2.nii.gz") in msg
    report = Anatomy(source="colin27").check()
    assert not report.ok and "mricron-data" in report.problems[0]

    monkeypatch.setattr(anatomy, "_wheel_file", lambda rel: None)
    with pytest.raises(DataError, match=r"'stardist' \(pip install --no-deps stardist\)"):
        Anatomy(source="nuclei").load()


@pytest.mark.parametrize(
    "opts, word",
    [
        ({"source": "liver"}, "source"),
        ({"sites": 0}, "sites"),
        ({"size": 2}, "size"),
        ({"appearance_shift": -1.0}, "appearance_shift"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options(opts: dict, word: str) -> None:
    with pytest.raises(DataError, match=word):
        Anatomy(**opts)


def test_options_round_trip() -> None:
    ds = Anatomy(source="nuclei", sites=3, size=32, appearance_shift=0.5, seed=2)
    opts = ds.options()
    assert opts["source"] == "nuclei" and opts["sites"] == 3 and opts["appearance_shift"] == 0.5
    assert Anatomy(**opts).options() == opts
