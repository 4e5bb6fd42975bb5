"""Real multi-site dataset loaders (prostate, fundus, polyp, vessel, gland) on small fixture trees."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_data import (
    FUNDUS_BG,
    FUNDUS_CUP,
    FUNDUS_DISC,
    Tree,
    fundus_mask,
    make_fundus_tree,
    make_gland_tree,
    make_polyp_tree,
    make_prostate_tree,
    make_vessel_tree,
    polyp_mask,
    truncate,
    write_garbage,
    write_nifti,
    write_pillow,
)

from pflbench.data import DataError, make_splits
from pflbench.dataset import CheckReport, Dataset
from pflbench.datasets import _io
from pflbench.datasets.fundus import Fundus
from pflbench.datasets.gland import Gland
from pflbench.datasets.polyp import Polyp
from pflbench.datasets.prostate import Prostate
from pflbench.datasets.vessel import Vessel


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never write to the user's cache: the default cache folder points into tmp_path."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("PFLBENCH_CACHE", str(cache))
    return cache


# Per loader: class, fixture builder, options, and a mask value its encoding does not expect.
LOADERS: dict[str, tuple[type[_io.FolderDataset], Callable[[Path], Tree], dict[str, Any], int]] = {
    "prostate": (Prostate, make_prostate_tree, {"size": 32, "crop": 32}, 7),
    "fundus": (Fundus, make_fundus_tree, {"size": 32}, 64),
    "polyp": (Polyp, make_polyp_tree, {"size": 32}, 77),
    "vessel": (Vessel, make_vessel_tree, {"size": 32}, 50),
    "gland": (Gland, make_gland_tree, {"size": 32}, 50),
}


def build(name: str, tmp_path: Path, **opts: Any) -> tuple[_io.FolderDataset, Tree]:
    cls, maker, defaults, _ = LOADERS[name]
    tree = maker(tmp_path / "data")
    return cls(root=str(tree.root), **{**defaults, **opts}), tree


class CountReads:
    """Wraps ``_io.read_file`` and counts the calls (every loader reads through it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Path] = []
        real = _io.read_file

        def counted(path: Path, kind: _io.Kind):
            self.calls.append(Path(path))
            return real(path, kind)

        monkeypatch.setattr(_io, "read_file", counted)


def rewrite_mask(mask: Path, transform: Callable[[np.ndarray], np.ndarray]) -> Path:
    """Rewrite ``mask`` in its own format with ``transform`` applied to its array."""
    if mask.name.endswith(".nii.gz"):
        import nibabel as nib

        arr = np.asarray(nib.load(str(mask)).dataobj)
        return write_nifti(mask, transform(arr).astype(np.uint8))
    from PIL import Image

    with Image.open(mask) as im:
        arr = np.asarray(im.convert("L"))
    return write_pillow(mask, transform(arr))


def a_lossless_pair(tree: Tree, site_index: int, case_index: int) -> tuple[Path, Path]:
    """A pair whose mask is lossless (PNG / NIfTI), so planted values survive."""
    sites = [s for s, f in tree.files.items() if f[0][1].suffix.lower() not in (".jpg", ".gif")]
    return tree.files[sites[site_index]][case_index]


def rel(tree: Tree, path: Path) -> str:
    return path.relative_to(tree.root).as_posix()


# ------------------------------------------------------------------------------------------
# Common behaviour of every loader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOADERS))
def test_plugin_contract(name: str) -> None:
    cls = LOADERS[name][0]
    assert issubclass(cls, Dataset)
    assert cls.name == name
    assert cls.description and cls.expected_tree
    ds = cls(root="/nonexistent")
    opts = ds.options()
    default = inspect.signature(cls.__init__).parameters["size"].default
    assert opts["root"] == "/nonexistent" and opts["size"] == _io.output_size(default, name)
    assert "cache_dir" in opts


@pytest.mark.parametrize("name", list(LOADERS))
def test_load_counts_shapes_and_values(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    data = ds.load()
    assert data.site_names == list(tree.cases)
    for site in data.sites:
        assert sorted(site.cases) == sorted(tree.cases[site.name])
        assert len(site) == tree.images[site.name]
        assert site.images.dtype == torch.float32 and site.labels.dtype == torch.int64
        assert site.images.shape[1:] == (ds.channels, 32, 32)
        assert site.labels.shape[1:] == (32, 32)
        assert float(site.images.min()) >= 0.0 and float(site.images.max()) <= 1.0
        assert set(torch.unique(site.labels).tolist()) <= set(range(data.num_classes))
        assert int(site.labels.max()) >= 1  # foreground survived decoding
    assert data.classes[0] == "background"


@pytest.mark.parametrize("name", list(LOADERS))
def test_splits_by_case_and_stable(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path, cache=False)
    data = ds.load()
    splits = make_splits(data, seed=0)
    for site in data.sites:
        parts = splits[site.name]
        assert set(parts) == {"train", "val", "test"}
        flat = [c for ids in parts.values() for c in ids]
        assert len(flat) == len(set(flat)), "a case is in two splits"
        assert sorted(flat) == sorted(site.cases)
        assert all(parts[k] for k in ("train", "test"))
    again = type(ds)(**ds.options()).load()
    assert make_splits(again, seed=0) == splits
    assert again.fingerprint() == data.fingerprint()


@pytest.mark.parametrize("name", list(LOADERS))
def test_check_clean_tree_passes(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    report = ds.check()
    assert isinstance(report, CheckReport)
    assert report.problems == [] and report.ok
    assert list(report.sites) == list(tree.cases)
    for site, stats in report.sites.items():
        assert stats["cases"] == len(tree.cases[site])
        assert stats["images"] == tree.images[site]
        assert stats["sizes"] and stats["label_values"]
    text = _io.format_check_text(report)
    assert "no problems" in text and list(tree.cases)[0] in text


@pytest.mark.parametrize("name", list(LOADERS))
def test_check_lists_every_planted_problem(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    bad_value = LOADERS[name][3]
    img_missing, mask_missing = a_lossless_pair(tree, 0, 0)
    mask_missing.unlink()
    _, mask_small = a_lossless_pair(tree, 0, 1)
    rewrite_mask(mask_small, lambda a: a[:-3])
    img_garbage, _ = a_lossless_pair(tree, 1, 0)
    write_garbage(img_garbage)
    _, mask_value = a_lossless_pair(tree, 1, 1)
    rewrite_mask(mask_value, lambda a: np.where(a == a.max(), bad_value, a))

    report = ds.check()
    problems = report.problems
    assert not report.ok

    def one(path: Path, words: str) -> str:
        hits = [p for p in problems if rel(tree, path) in p and words in p]
        assert hits, f"no problem naming {rel(tree, path)} with {words!r} in {problems}"
        return hits[0]

    one(img_missing, "missing mask")
    one(mask_small, "size mismatch")
    one(img_garbage, "unreadable")
    assert str(bad_value) in one(mask_value, "unexpected label value")
    assert len(problems) == 4, problems
    text = _io.format_check_text(report, width=200)
    assert "4 problem(s)" in text and rel(tree, img_garbage) in text


@pytest.mark.parametrize("name", list(LOADERS))
def test_missing_root_prints_expected_tree(name: str, tmp_path: Path) -> None:
    cls = LOADERS[name][0]
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        cls(root=str(missing)).load()
    msg = str(err.value)
    assert name in msg and str(missing) in msg
    assert cls.expected_tree.splitlines()[1].strip() in msg
    report = cls(root=str(missing)).check()
    assert not report.ok and str(missing) in report.problems[0]
    assert cls.expected_tree.splitlines()[1].strip() in report.expected_tree


@pytest.mark.parametrize("name", list(LOADERS))
def test_missing_site_folder_is_malformed(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    first = next(iter(tree.cases))
    site_dir = tree.folder(first)
    site_dir.rename(tree.root / f"{first}-moved")
    with pytest.raises(DataError) as err:
        ds.load()
    msg = str(err.value)
    assert str(site_dir) in msg and "Expected layout" in msg
    report = ds.check()
    assert any(str(site_dir) in p for p in report.problems)
    # the layout is printed once, after the problems, never inside one of them
    assert not any("Expected layout" in p for p in report.problems)
    assert report.expected_tree.startswith("Expected layout")


@pytest.mark.parametrize("name", list(LOADERS))
def test_corrupt_image_during_load_names_the_file(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    img, _ = a_lossless_pair(tree, 1, 2)
    truncate(img)
    with pytest.raises(DataError) as err:
        ds.load()
    assert str(img) in str(err.value)


@pytest.mark.parametrize("name", list(LOADERS))
def test_wrong_size_mask_during_load_names_the_file(name: str, tmp_path: Path) -> None:
    ds, tree = build(name, tmp_path)
    _, mask = a_lossless_pair(tree, 0, 2)
    rewrite_mask(mask, lambda a: a[:, :-2])
    with pytest.raises(DataError) as err:
        ds.load()
    assert str(mask) in str(err.value)


@pytest.mark.parametrize("name", list(LOADERS))
def test_cache_round_trip(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    ds, tree = build(name, tmp_path, cache_dir=str(cache))
    counter = CountReads(monkeypatch)
    first = ds.load()
    n_files = sum(len(f) for f in tree.files.values())
    assert len(counter.calls) == 2 * n_files
    assert len(list((cache / "datasets").glob(f"{name}-*.pt"))) == 1

    counter.calls.clear()
    second = type(ds)(**ds.options()).load()
    assert counter.calls == [], "the second load must read the cache, not the files"
    assert second.fingerprint() == first.fingerprint()
    assert make_splits(second) == make_splits(first)
    assert second.classes == first.classes and second.structures == first.structures
    assert second.case_level == first.case_level
    assert second.predefined_splits == first.predefined_splits
    for a, b in zip(first.sites, second.sites, strict=True):
        assert a.slice_index == b.slice_index and a.spacing == b.spacing

    # A changed source file (size / mtime) or option gives another key: the data are rebuilt.
    _, mask = a_lossless_pair(tree, 0, 0)
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    type(ds)(**ds.options()).load()
    assert len(counter.calls) == 2 * n_files
    assert len(list((cache / "datasets").glob("*.pt"))) == 1  # the stale copy was replaced
    counter.calls.clear()
    type(ds)(**{**ds.options(), "size": 16}).load()
    assert len(counter.calls) == 2 * n_files
    assert len(list((cache / "datasets").glob("*.pt"))) == 2  # another size: another slot

    # cache=False always reads the files.
    counter.calls.clear()
    type(ds)(**{**ds.options(), "cache": False}).load()
    assert len(counter.calls) == 2 * n_files


def test_default_cache_dir_is_pflbench_cache(tmp_path: Path, _cache_in_tmp: Path) -> None:
    ds, _ = build("polyp", tmp_path)
    ds.load()
    assert list((_cache_in_tmp / "datasets").glob("polyp-*.pt"))
    assert _io.default_cache_dir() == _cache_in_tmp


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    ds, _ = build("fundus", tmp_path, cache_dir=str(tmp_path / "c"))
    first = ds.load()
    (path,) = (tmp_path / "c" / "datasets").glob("*.pt")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = type(ds)(**ds.options()).load()
    assert again.fingerprint() == first.fingerprint()


# ------------------------------------------------------------------------------------------
# Fed-Prostate
# ------------------------------------------------------------------------------------------


def test_prostate_foreground_slices_and_keep_empty(tmp_path: Path) -> None:
    tree = make_prostate_tree(tmp_path / "p", shape=(40, 40, 5), fg_slices=(1, 2, 3))
    data = Prostate(root=str(tree.root), size=32, crop=32, cache=False).load()
    assert data.case_level == "volume" and data.split_fractions == (0.7, 0.1, 0.2)
    assert data.classes == ["background", "prostate"] and data.structures == {"prostate": [1]}
    site = data.sites[0]
    assert site.slice_index[:3] == [1, 2, 3]
    assert set(torch.unique(site.labels).tolist()) == {0, 1}  # the 2s became 1
    assert all(bool(site.labels[i].any()) for i in range(len(site)))
    assert site.spacing == (0.5, 0.5)
    full = Prostate(root=str(tree.root), size=32, crop=32, keep_empty=True, cache=False).load()
    assert len(full.sites[0]) == 3 * 5
    assert full.sites[0].slice_index[:5] == [0, 1, 2, 3, 4]


def test_prostate_intensity_normalised_per_volume(tmp_path: Path) -> None:
    tree = make_prostate_tree(tmp_path / "p", sites={"RUNMC": 3}, fg_slices=(0, 1, 2, 3, 4))
    data = Prostate(root=str(tree.root), size=40, crop=40, sites=["RUNMC"], cache=False).load()
    site = data.sites[0]
    for case in site.cases:
        vol = site.images[[i for i, c in enumerate(site.case_ids) if c == case]]
        assert float(vol.min()) == 0.0 and float(vol.max()) == pytest.approx(1.0)
        # the 4000 outlier was clipped at the 99th percentile: the bulk is not squashed to ~0
        assert float(vol.mean()) > 0.2


def test_prostate_other_sizes_crop_pad_resize(tmp_path: Path) -> None:
    tree = make_prostate_tree(
        tmp_path / "p",
        sites={"RUNMC": 3, "UCL": 3},
        other_shapes={"UCL": (24, 28, 5)},
    )
    data = Prostate(
        root=str(tree.root), size=16, crop=32, sites=["RUNMC", "UCL"], cache=False
    ).load()
    assert [s.name for s in data.sites] == ["RUNMC", "UCL"]
    for s in data.sites:
        assert s.images.shape[1:] == (1, 16, 16)
    assert data.sites[0].spacing == (1.0, 1.0)  # 0.5 mm × 32 / 16


def test_prostate_sites_option_and_unknown_site(tmp_path: Path) -> None:
    tree = make_prostate_tree(tmp_path / "p", sites={"BMC": 3, "HK": 4})
    data = Prostate(root=str(tree.root), size=32, crop=32, sites=["HK", "BMC"]).load()
    assert data.site_names == ["HK", "BMC"] and len(data.sites[0].cases) == 4
    with pytest.raises(DataError, match="RUNMC"):
        Prostate(root=str(tree.root), size=32, crop=32).load()  # default: all six sites


def test_prostate_check_reports_published_counts(tmp_path: Path) -> None:
    tree = make_prostate_tree(tmp_path / "p")
    report = Prostate(root=str(tree.root), size=32, crop=32).check()
    assert report.ok
    assert report.sites["RUNMC"]["published"] == 30 and report.sites["HK"]["published"] == 12
    assert report.sites["RUNMC"]["sizes"] == {"40×40×5": 3}
    assert report.sites["RUNMC"]["label_values"] == [0, 1, 2]


def test_prostate_orphan_mask_and_ignored_files(tmp_path: Path) -> None:
    tree = make_prostate_tree(tmp_path / "p")
    orphan = tree.root / "RUNMC" / "Case09_segmentation.nii.gz"
    write_nifti(orphan, np.zeros((40, 40, 5), np.uint8))
    (tree.root / "RUNMC" / "notes.txt").write_text("hello")
    report = Prostate(root=str(tree.root), size=32, crop=32).check()
    assert report.problems == [
        "RUNMC/Case09_segmentation.nii.gz: mask without an image (Case09.nii.gz)"
    ]
    assert report.sites["RUNMC"]["ignored files"] == 1


# ------------------------------------------------------------------------------------------
# Fed-Fundus
# ------------------------------------------------------------------------------------------


def test_fundus_decoding_255_128_0(tmp_path: Path) -> None:
    tree = make_fundus_tree(tmp_path / "f")
    data = Fundus(root=str(tree.root), size=32, cache=False).load()
    assert data.classes == ["background", "disc", "cup"]
    assert data.structures == {"disc": [1, 2], "cup": [2]}
    site = data.sites[0]
    raw = fundus_mask(32, 0, 0)
    i = site.case_ids.index(tree.cases["Domain1"][0])
    lab = site.labels[i].numpy()
    assert (lab[raw == FUNDUS_BG] == 0).all()
    assert (lab[raw == FUNDUS_DISC] == 1).all()
    assert (lab[raw == FUNDUS_CUP] == 2).all()


def test_fundus_official_splits(tmp_path: Path) -> None:
    tree = make_fundus_tree(tmp_path / "f", counts={f"Domain{k}": (6, 3) for k in range(1, 5)})
    data = Fundus(root=str(tree.root), size=32, val_fraction=0.2, cache=False).load()
    assert data.predefined_splits is not None
    splits = make_splits(data, seed=123)
    for site in data.site_names:
        s = splits[site]
        assert s["test"] == tree.groups[site]["test"]
        assert sorted(s["train"] + s["val"]) == sorted(tree.groups[site]["train"])
        assert len(s["val"]) == 1 and len(s["train"]) == 5
    other = Fundus(root=str(tree.root), size=32, val_fraction=0.2, split_seed=5, cache=False)
    assert make_splits(other.load()) != splits  # the val draw follows split_seed


def test_fundus_encodings_and_nested_root(tmp_path: Path) -> None:
    tree = make_fundus_tree(tmp_path / "outer" / "Fundus")
    for _, mask in (p for ps in tree.files.values() for p in ps):
        rewrite_mask(mask, lambda a: np.select([a == 255, a == 128], [0, 1], 2).astype(np.uint8))
    with pytest.raises(DataError, match="unknown encoding 'nope'.*dofe"):
        Fundus(root=str(tmp_path / "outer"), encoding="nope")
    ds = Fundus(root=str(tmp_path / "outer"), size=32, encoding="class-ids", cache=False)
    assert ds.check().ok
    data = ds.load()
    assert set(torch.unique(data.sites[0].labels).tolist()) == {0, 1, 2}
    # the same files read as DoFE: 0/1/2 are not 255/128/0 → every value flagged
    dofe = Fundus(root=str(tmp_path / "outer"), size=32).check()
    assert dofe.problems and all("unexpected label value" in p for p in dofe.problems)


def test_fundus_check_counts_train_and_test(tmp_path: Path) -> None:
    tree = make_fundus_tree(tmp_path / "f")
    report = Fundus(root=str(tree.root)).check()
    st = report.sites["Domain2"]
    assert st["train"] == 4 and st["test"] == 2 and st["published"] == "99+60"
    assert st["label_values"] == [0, 128, 255] and st["sizes"] == {"32×32": 6}


# ------------------------------------------------------------------------------------------
# Fed-Polyp
# ------------------------------------------------------------------------------------------


def test_polyp_jpeg_masks_thresholded_at_128(tmp_path: Path) -> None:
    tree = make_polyp_tree(tmp_path / "p", image_ext=".jpg", mask_ext=".jpg", size=(32, 32))
    data = Polyp(root=str(tree.root), size=32, cache=False).load()
    assert data.classes == ["background", "polyp"]
    site = data.sites[0]
    for i, case in enumerate(site.case_ids):
        truth = polyp_mask(32, 32, 0, int(case) - 1) > 127
        agree = (site.labels[i].numpy() == truth).mean()
        assert agree > 0.98
    assert Polyp(root=str(tree.root), size=32).check().ok  # JPEG masks: any grey value allowed


def test_polyp_4site_layout_aliases_and_tif(tmp_path: Path) -> None:
    tree = make_polyp_tree(
        tmp_path / "p",
        sites={"Kvasir-SEG": 4, "ETIS": 3, "CVC-ColonDB": 3, "ClinicDB": 5},
        per_site_ext={"ClinicDB": (".tif", ".tif"), "Kvasir-SEG": (".jpg", ".jpg")},
    )
    data = Polyp(root=str(tree.root), layout="4site", size=32, cache=False).load()
    assert data.site_names == ["Kvasir", "ETIS", "ColonDB", "ClinicDB"]
    assert [len(s) for s in data.sites] == [4, 3, 3, 5]
    with pytest.raises(DataError, match="CVC-300"):
        Polyp(root=str(tree.root), size=32).load()  # the 5-site layout is not there
    with pytest.raises(DataError, match="unknown layout"):
        Polyp(root=str(tree.root), layout="3site")


def test_polyp_ambiguous_and_orphan_files(tmp_path: Path) -> None:
    tree = make_polyp_tree(tmp_path / "p")
    site = tree.root / "CVC-300"
    write_pillow(site / "images" / "1.jpg", np.zeros((32, 40, 3), np.uint8))
    write_pillow(site / "masks" / "99.png", np.zeros((32, 40), np.uint8))
    problems = Polyp(root=str(tree.root)).check().problems
    assert any("CVC-300/images/1.jpg" in p and "several images" in p for p in problems)
    assert any("CVC-300/masks/99.png: mask without an image" in p for p in problems)


# ------------------------------------------------------------------------------------------
# Fed-Vessel
# ------------------------------------------------------------------------------------------


def test_vessel_names_labels_and_splits(tmp_path: Path) -> None:
    tree = make_vessel_tree(tmp_path / "v")
    data = Vessel(root=str(tree.root), size=32, cache=False).load()
    assert data.site_names == list(tree.cases)
    drive = data.sites[data.site_names.index("DRIVE")]
    assert "21_training" in drive.cases and "01_test" in drive.cases  # paired with _manual1.gif
    assert set(torch.unique(drive.labels).tolist()) == {0, 1}
    splits = make_splits(data)
    for site in data.site_names:
        assert splits[site]["test"] == tree.groups[site]["test"]
        assert len(splits[site]["train"]) == 4 and len(splits[site]["val"]) == 1  # 80/20


def test_vessel_threshold_100(tmp_path: Path) -> None:
    tree = make_vessel_tree(tmp_path / "v", sites={"HRF": (3, 1)}, size=(32, 32))
    img, mask = tree.files["HRF"][0]
    lab = np.zeros((32, 32), np.uint8)
    lab[:, :8], lab[:, 8:16], lab[:, 16:24] = 100, 101, 255
    write_pillow(mask, lab)
    data = Vessel(root=str(tree.root), sites=["HRF"], size=32, cache=False).load()
    got = data.sites[0].labels[0].numpy()
    assert (got[:, :8] == 0).all() and (got[:, 8:24] == 1).all() and (got[:, 24:] == 0).all()
    report = Vessel(root=str(tree.root), sites=["HRF"]).check()
    assert report.problems == [
        f"{rel(tree, mask)}: unexpected label value(s) 100, 101 (the vessel encoding expects 0/255)"
    ]


# ------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------


def test_read_file_formats(tmp_path: Path) -> None:
    rgb = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    for ext in (".png", ".bmp", ".ppm", ".tif"):
        arr, _ = _io.read_file(write_pillow(tmp_path / f"a{ext}", rgb), "image")
        np.testing.assert_array_equal(arr, rgb)
    np.save(tmp_path / "b.npy", rgb)
    assert _io.as_image(_io.read_file(tmp_path / "b.npy", "image")[0], 3).shape == (3, 6, 5)
    grey = (np.arange(30).reshape(6, 5) * 8).astype(np.uint8)
    arr, _ = _io.read_file(write_pillow(tmp_path / "g.gif", grey), "mask")
    np.testing.assert_array_equal(arr, grey)
    img = _io.as_image(_io.read_file(tmp_path / "g.gif", "image")[0], 3)
    assert img.shape == (3, 6, 5) and np.allclose(img[0], grey / 255.0)
    import tifffile

    tifffile.imwrite(tmp_path / "w.tif", (np.arange(30).reshape(6, 5) * 100).astype(np.uint16))
    img = _io.as_image(_io.read_file(tmp_path / "w.tif", "image")[0], 1)
    assert img.min() == 0.0 and img.max() == 1.0  # 16-bit: min–max per image
    arr, zooms = _io.read_file(write_nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 2))), "image")
    assert arr.shape == (4, 4, 2) and zooms == (0.5, 0.5, 3.0)
    with pytest.raises(ValueError, match="unsupported"):
        _io.read_file(tmp_path / "x.xyz", "image")


def test_decoding_nearest_value_and_threshold() -> None:
    dec = _io.Decoding(
        "t", "test", values=((255, 0), (128, 1), (0, 2)), expected=frozenset({0, 128, 255})
    )
    raw = np.array([0, 10, 60, 70, 128, 180, 200, 255])
    np.testing.assert_array_equal(dec.decode(raw), [2, 2, 2, 1, 1, 1, 0, 0])
    assert dec.unexpected({0, 128, 255, 3}) == [3]
    thr = _io.Decoding("b", "binary", threshold=127)
    np.testing.assert_array_equal(thr.decode(np.array([0, 127, 128, 255])), [0, 0, 1, 1])
    assert thr.unexpected({5, 6}) == []


def test_crop_or_pad_and_carve_val() -> None:
    a = np.arange(36).reshape(6, 6, 1)
    np.testing.assert_array_equal(_io.crop_or_pad(a, 2)[:, :, 0], [[14, 15], [20, 21]])
    padded = _io.crop_or_pad(np.ones((2, 3, 1)), 4)
    assert padded.shape == (4, 4, 1) and padded.sum() == 6
    train, val = _io.carve_val([f"c{i}" for i in range(10)], 0.2, 0, "s")
    assert len(val) == 2 and sorted(train + val) == sorted(f"c{i}" for i in range(10))
    assert _io.carve_val([f"c{i}" for i in range(10)], 0.2, 0, "s") == (train, val)
    assert _io.carve_val(["a"], 0.5, 0, "s") == (["a"], [])


def test_name_pairing_drops_release_tags(tmp_path: Path) -> None:
    imgs = [tmp_path / n for n in ("21_training.tif", "Image_01L.jpg", "1_glaucoma.jpg")]
    masks = [
        tmp_path / n
        for n in ("21_manual1.gif", "Image_01L_1stHO.png", "1_glaucoma_manual_orig.png")
    ]
    pairs, problems = _io.pair_files(imgs, masks, lambda p: p.name, tmp_path)
    assert problems == [] and [(i.name, m.name) for i, m in pairs] == [
        (i.name, m.name) for i, m in zip(imgs, masks, strict=True)
    ]


# ------------------------------------------------------------------------------------------
# Meibomian gland (MGD-1K + CAMG)
# ------------------------------------------------------------------------------------------


def test_gland_layout_names_and_non_square_size(tmp_path: Path) -> None:
    tree = make_gland_tree(tmp_path / "g", size=(24, 40))
    data = Gland(root=str(tree.root), size=[16, 32], cache=False).load()
    assert data.site_names == ["MGD-1K", "CAMG"]
    mgd, camg = data.sites
    assert sorted(mgd.cases) == [f"mgd_{i:02d}" for i in range(6)]  # .JPG, .jpg; a .tif mask
    assert sorted(camg.cases) == [f"CAMG_Image_{i:02d}" for i in range(6)]  # Image -> Seg
    for site in data.sites:
        assert site.images.shape[1:] == (3, 16, 32) and site.labels.shape[1:] == (16, 32)
        assert set(torch.unique(site.labels).tolist()) == {0, 1}
    splits = make_splits(data)
    assert [len(splits["CAMG"][k]) for k in ("train", "val", "test")] == [4, 1, 1]  # 70/10/20
    assert Gland(root="/x").options()["size"] == [192, 384]  # the benchmark's H×W


def test_gland_threshold_100_and_mgd_without_subset(tmp_path: Path) -> None:
    tree = make_gland_tree(tmp_path / "g", sites={"MGD-1K": 3}, size=(32, 32))
    _, mask = tree.files["MGD-1K"][0]
    lab = np.zeros((32, 32), np.uint8)
    lab[:, :8], lab[:, 8:16], lab[:, 16:24] = 100, 101, 255
    write_pillow(mask, lab)
    subset = tree.root / "MGD1k" / "Subset"
    for child in subset.iterdir():  # MGD1k/Original is accepted as well as MGD1k/Subset/Original
        child.rename(tree.root / "MGD1k" / child.name)
    subset.rmdir()
    ds = Gland(root=str(tree.root), sites=["MGD-1K"], size=32, cache=False)
    got = ds.load().sites[0].labels[0].numpy()
    assert (got[:, :8] == 0).all() and (got[:, 8:24] == 1).all() and (got[:, 24:] == 0).all()
    assert ds.check().problems == [
        "MGD1k/Meibomian_Gland_Labels/mgd_00.png: unexpected label value(s) 100, 101 "
        "(the gland encoding expects 0/255)"
    ]


def test_gland_camg_mask_must_follow_the_seg_rule(tmp_path: Path) -> None:
    tree = make_gland_tree(tmp_path / "g", sites={"CAMG": 4})
    _, mask = tree.files["CAMG"][2]
    mask.rename(mask.with_name("CAMG_Mask_02_other.png"))
    problems = Gland(root=str(tree.root), sites=["CAMG"]).check().problems
    assert problems == [
        "CAMG/Original/CAMG_Image_02.png: missing mask (no file named CAMG_Seg_02.* in "
        "CAMG/Meibomian_Gland_Labels)",
        "CAMG/Meibomian_Gland_Labels/CAMG_Mask_02_other.png: mask without an image",
    ]


def test_data_check_gland_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pflbench.cli import main

    tree = make_gland_tree(tmp_path / "g")
    ok = CliRunner().invoke(main, ["data", "check", "gland", "--root", str(tree.root)])
    assert ok.exit_code == 0, ok.output
    assert "MGD-1K" in ok.output and "CAMG" in ok.output and "no problems found" in ok.output
    tree.files["CAMG"][0][1].unlink()
    write_garbage(tree.files["MGD-1K"][0][0])
    bad = CliRunner().invoke(main, ["data", "check", "gland", "--root", str(tree.root)])
    assert bad.exit_code == 1
    assert "CAMG/Original/CAMG_Image_00.png: missing mask" in bad.output
    assert "MGD1k/Subset/Original/mgd_00.JPG: unreadable image" in bad.output
    assert "2 problem(s):" in bad.output


# ------------------------------------------------------------------------------------------
# Non-square output sizes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fundus", "polyp", "vessel", "gland"])
def test_size_h_w_gives_non_square_images(name: str, tmp_path: Path) -> None:
    ds, _ = build(name, tmp_path, size=[16, 32], cache=False)
    for site in ds.load().sites:
        assert site.images.shape[2:] == (16, 32) and site.labels.shape[1:] == (16, 32)


@pytest.mark.parametrize("bad", [0, [16], [16, 0], [16, 32, 3], "256", True, [16.5, 32]])
def test_bad_size_is_refused_with_the_option_named(bad: Any) -> None:
    with pytest.raises(
        DataError, match=r"vessel: option size must be a positive integer or \[H, W\]"
    ):
        Vessel(root="/x", size=bad)


def test_prostate_size_stays_square() -> None:
    with pytest.raises(DataError, match="prostate: option size must be one integer"):
        Prostate(root="/x", size=[192, 384])
