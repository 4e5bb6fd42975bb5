"""Small fixture trees in the real datasets' layouts and file formats, for the loader tests.

Every builder writes real files (``.nii.gz`` via nibabel; PNG / JPEG / TIFF / GIF via Pillow) of a
few tiny images into a folder and returns what it wrote, so tests can count and compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FUNDUS_BG, FUNDUS_DISC, FUNDUS_CUP = 255, 128, 0


@dataclass
class Tree:
    """What a builder wrote: ``cases[site]`` = case ids, ``files[site]`` = (image, mask) paths."""

    root: Path
    cases: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[tuple[Path, Path]]] = field(default_factory=dict)
    groups: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # 2-D images load() should make
    folders: dict[str, Path] = field(default_factory=dict)  # site folder, where not root/site

    def folder(self, site: str) -> Path:
        return self.folders.get(site, self.root / site)

    def add(self, site: str, case: str, image: Path, mask: Path, group: str | None = None) -> None:
        self.cases.setdefault(site, []).append(case)
        self.files.setdefault(site, []).append((image, mask))
        if group is not None:
            self.groups.setdefault(site, {}).setdefault(group, []).append(case)


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


def write_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...] = (0.5, 0.5, 3.0)) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.diag([*zooms[:3], 1.0]))
    img.header.set_zooms(zooms[: array.ndim])
    nib.save(img, str(path))
    return path


def write_pillow(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    """Write a uint8 H×W or H×W×3 array with Pillow; the format follows the extension."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 95)
    im.save(str(path), **save_kwargs)
    return path


def write_garbage(path: Path) -> Path:
    """Overwrite ``path`` with bytes no reader accepts (an unreadable file)."""
    path.write_bytes(b"this is not an image file\x00\x01\x02" * 8)
    return path


def truncate(path: Path) -> Path:
    """Cut a file in half (a corrupt, half-written image)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(1234, spawn_key=key))


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def rgb_image(h: int, w: int, *key: int) -> np.ndarray:
    rng = _rng(*key)
    base = rng.integers(30, 220, size=(h, w, 3))
    return base.astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Fed-Prostate: <root>/<SITE>/CaseNN.nii.gz + CaseNN_segmentation.nii.gz
# ------------------------------------------------------------------------------------------


def prostate_case(
    shape: tuple[int, int, int], fg_slices: list[int], *key: int
) -> tuple[np.ndarray, np.ndarray]:
    """A T2-like volume (int16) and its mask (uint8; 1 in the centre, 2 in part of it)."""
    rng = _rng(*key)
    vol = rng.normal(300, 60, size=shape).clip(0, None).astype(np.int16)
    vol[0, 0, :] = 4000  # a bright outlier: the 99th-percentile clip must tame it
    mask = np.zeros(shape, dtype=np.uint8)
    disc = _disc(shape[0], shape[1], shape[0] / 2, shape[1] / 2, min(shape[:2]) / 6)
    for z in fg_slices:
        mask[:, :, z][disc] = 1
        mask[: shape[0] // 2, :, z][disc[: shape[0] // 2]] = 2
        vol[:, :, z][disc] += 200
    return vol, mask


def make_prostate_tree(
    root: Path,
    sites: dict[str, int] | None = None,
    shape: tuple[int, int, int] = (40, 40, 5),
    fg_slices: tuple[int, ...] = (1, 2, 3),
    other_shapes: dict[str, tuple[int, int, int]] | None = None,
) -> Tree:
    """``sites`` maps site → number of cases (default: all six sites, 3 cases each).

    Masks are ``CaseNN_segmentation.nii.gz``, except BIDMC and HK: ``CaseNN_Segmentation.nii.gz``
    (both spellings occur in the release). ``other_shapes`` gives some sites another volume shape.
    """
    sites = sites or {s: 3 for s in ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")}
    tree = Tree(root=root)
    for si, (site, n) in enumerate(sites.items()):
        shp = (other_shapes or {}).get(site, shape)
        suffix = "_Segmentation" if site in ("BIDMC", "HK") else "_segmentation"
        for i in range(n):
            case = f"Case{i:02d}"
            vol, mask = prostate_case(shp, list(fg_slices), si, i)
            img = write_nifti(root / site / f"{case}.nii.gz", vol)
            msk = write_nifti(root / site / f"{case}{suffix}.nii.gz", mask)
            tree.add(site, case, img, msk)
        tree.images[site] = n * len(fg_slices)
    return tree


# ------------------------------------------------------------------------------------------
# Fed-Fundus: <root>/Domain{k}/{train,test}/ROIs/{image,mask}/<name>.png
# ------------------------------------------------------------------------------------------


def fundus_mask(size: int, *key: int) -> np.ndarray:
    """255 background, 128 disc rim, 0 cup."""
    rng = _rng(*key)
    c = size / 2 + rng.uniform(-2, 2, size=2)
    mask = np.full((size, size), FUNDUS_BG, dtype=np.uint8)
    mask[_disc(size, size, c[0], c[1], size * 0.3)] = FUNDUS_DISC
    mask[_disc(size, size, c[0], c[1], size * 0.15)] = FUNDUS_CUP
    return mask


def make_fundus_tree(
    root: Path, counts: dict[str, tuple[int, int]] | None = None, size: int = 32
) -> Tree:
    """``counts`` maps Domain → (train, test) images (default 4 domains, 4 + 2 each)."""
    counts = counts or {f"Domain{k}": (4, 2) for k in range(1, 5)}
    tree = Tree(root=root)
    for di, (site, (n_train, n_test)) in enumerate(counts.items()):
        for group, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                name = f"d{di + 1}_{group}_{i:03d}"
                base = root / site / group / "ROIs"
                img = write_pillow(base / "image" / f"{name}.png", rgb_image(size, size, di, i))
                msk = write_pillow(base / "mask" / f"{name}.png", fundus_mask(size, di, i))
                tree.add(site, name, img, msk, group)
        tree.images[site] = n_train + n_test
    return tree


# ------------------------------------------------------------------------------------------
# Fed-Polyp: <root>/<site>/{images,masks}/<name>.png|jpg|tif
# ------------------------------------------------------------------------------------------


def polyp_mask(h: int, w: int, *key: int) -> np.ndarray:
    rng = _rng(*key)
    return np.where(
        _disc(h, w, h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3), min(h, w) / 4),
        255,
        0,
    ).astype(np.uint8)


def make_polyp_tree(
    root: Path,
    sites: dict[str, int] | None = None,
    image_ext: str = ".png",
    mask_ext: str = ".png",
    size: tuple[int, int] = (32, 40),
    per_site_ext: dict[str, tuple[str, str]] | None = None,
) -> Tree:
    """``sites`` maps folder name → images (default: the five FL-MedSegBench sites, 5 each)."""
    sites = sites or {
        s: 5 for s in ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "EndoTect", "ETIS-LaribPolypDB")
    }
    tree = Tree(root=root)
    for si, (site, n) in enumerate(sites.items()):
        iext, mext = (per_site_ext or {}).get(site, (image_ext, mask_ext))
        for i in range(n):
            name = f"{i + 1}"
            img = write_pillow(root / site / "images" / f"{name}{iext}", rgb_image(*size, si, i))
            msk = write_pillow(root / site / "masks" / f"{name}{mext}", polyp_mask(*size, si, i))
            tree.add(site, name, img, msk)
        tree.images[site] = n
    return tree


# ------------------------------------------------------------------------------------------
# Fed-Vessel: <root>/<site>/{Train,Test}/Original/{Images,Labels}/<name>
# ------------------------------------------------------------------------------------------

VESSEL_SITES = ("ChaseDB", "DR-Hagis", "DRIVE", "HRF", "LES-AV", "ORVS")


def vessel_label(h: int, w: int, *key: int) -> np.ndarray:
    rng = _rng(*key)
    lab = np.zeros((h, w), dtype=np.uint8)
    for _ in range(3):
        r = int(rng.integers(2, h - 2))
        lab[r - 1 : r + 1, :] = 255
        c = int(rng.integers(2, w - 2))
        lab[:, c - 1 : c + 1] = 255
    return lab


def make_vessel_tree(
    root: Path,
    sites: dict[str, tuple[int, int]] | None = None,
    size: tuple[int, int] = (36, 40),
) -> Tree:
    """``sites`` maps folder → (train, test) images (default: six sites, 5 + 2 each).

    DRIVE uses the release's own names (``21_training.tif`` / ``21_manual1.gif``), ChaseDB
    (``Image_01L.jpg`` / ``Image_01L_1stHO.png``); the others share names (``.png``).
    """
    sites = sites or {s: (5, 2) for s in VESSEL_SITES}
    tree = Tree(root=root)
    for si, (site, (n_train, n_test)) in enumerate(sites.items()):
        for group, folder, n in (("train", "Train", n_train), ("test", "Test", n_test)):
            base = root / site / folder / "Original"
            for i in range(n):
                if site == "DRIVE":
                    num = 21 + i if group == "train" else 1 + i
                    stem = f"{num:02d}_{'training' if group == 'train' else 'test'}"
                    iname, lname = f"{stem}.tif", f"{num:02d}_manual1.gif"
                elif site == "ChaseDB":
                    stem = f"Image_{i + 1 + (0 if group == 'train' else 50):02d}L"
                    iname, lname = f"{stem}.jpg", f"{stem}_1stHO.png"
                else:
                    stem = f"{group}{i:02d}"
                    iname, lname = f"{stem}.png", f"{stem}.png"
                img = write_pillow(base / "Images" / iname, rgb_image(*size, si, i, 7))
                lab = write_pillow(base / "Labels" / lname, vessel_label(*size, si, i))
                tree.add(site, stem, img, lab, group)
        tree.images[site] = n_train + n_test
    return tree


# ------------------------------------------------------------------------------------------
# Meibomian gland (MGD-1K + CAMG, FL-MedSegBench layout)
# ------------------------------------------------------------------------------------------


def gland_label(h: int, w: int, *key: int) -> np.ndarray:
    """A few vertical gland-like bars, 0/255."""
    rng = _rng(*key)
    lab = np.zeros((h, w), dtype=np.uint8)
    for _ in range(4):
        c = int(rng.integers(2, w - 3))
        top, bottom = int(rng.integers(1, h // 3)), int(rng.integers(2 * h // 3, h - 1))
        lab[top:bottom, c : c + 2] = 255
    return lab


def make_gland_tree(
    root: Path, sites: dict[str, int] | None = None, size: tuple[int, int] = (24, 40)
) -> Tree:
    """``sites`` maps MGD-1K / CAMG → images (default 6 each), in the benchmark's layout.

    MGD-1K: ``MGD1k/Subset/Original/mgd_NN.JPG`` (one ``.jpg``) with PNG masks of the same name,
    the last one a ``.tif`` as in the release; CAMG: ``CAMG/Original/CAMG_Image_NN.png`` with
    masks ``CAMG/Meibomian_Gland_Labels/CAMG_Seg_NN.png``.
    """
    sites = sites or {"MGD-1K": 6, "CAMG": 6}
    tree = Tree(root=root)
    for si, (site, n) in enumerate(sites.items()):
        if site == "MGD-1K":
            folder = root / "MGD1k"
            base = folder / "Subset"
        else:
            folder = base = root / site
        tree.folders[site] = folder
        for i in range(n):
            if site == "MGD-1K":
                case = f"mgd_{i:02d}"
                iname = f"{case}.jpg" if i == 1 else f"{case}.JPG"
                mname = f"{case}.tif" if i == n - 1 else f"{case}.png"
            else:
                case = f"CAMG_Image_{i:02d}"
                iname, mname = f"{case}.png", f"CAMG_Seg_{i:02d}.png"
            img_path = write_pillow(base / "Original" / iname, rgb_image(*size, 40 + si, i))
            mask = write_pillow(base / "Meibomian_Gland_Labels" / mname, gland_label(*size, si, i))
            tree.add(site, case, img_path, mask)
        tree.images[site] = n
    return tree


# ------------------------------------------------------------------------------------------
# nnU-Net v2 raw: DatasetNNN_<Name>/{dataset.json, imagesTr/CASE_XXXX<ext>, labelsTr/CASE<ext>}
# ------------------------------------------------------------------------------------------

NNUNET_BINARY = {"background": 0, "prostate": 1}
NNUNET_MULTI = {"background": 0, "zone": 1, "core": 2}


def write_nnunet_dataset(
    folder: Path,
    cases: list[str],
    *,
    ending: str = ".nii.gz",
    channels: tuple[str, ...] = ("T2",),
    labels: dict[str, int] | None = None,
    shape: tuple[int, int, int] = (20, 24, 4),
    fg_slices: tuple[int, ...] = (1, 2),
    rgb_png: bool = False,
    key: int = 0,
) -> dict[str, tuple[list[Path], Path]]:
    """One nnU-Net v2 raw dataset folder in the real formats; returns case → (channel files, label).

    NIfTI cases are X×Y×Z volumes with foreground on ``fg_slices``; 2-D endings (``.png``,
    ``.tif``) write H×W images of ``shape[:2]``. ``rgb_png``: one RGB ``.png`` holds all
    ``channels`` (3), as nnU-Net's natural-image datasets do. With two foreground labels the
    mask holds 1 in a disc and 2 in its upper half; with one, the whole disc is 1.
    """
    import tifffile

    labels = labels or NNUNET_BINARY
    multi = len(labels) > 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {str(i): n for i, n in enumerate(channels)},
                "labels": labels,
                "numTraining": len(cases),
                "file_ending": ending,
            }
        )
    )
    out: dict[str, tuple[list[Path], Path]] = {}
    for ci, case in enumerate(cases):
        vol, mask = prostate_case(shape, list(fg_slices), 70 + key, ci)
        if not multi:
            mask = (mask > 0).astype(np.uint8)
        files: list[Path] = []
        label = folder / "labelsTr" / f"{case}{ending}"
        if ending in (".nii.gz", ".nii"):
            for c in range(len(channels)):
                files.append(write_nifti(folder / "imagesTr" / f"{case}_{c:04d}{ending}", vol + c))
            write_nifti(label, mask)
        else:
            z = fg_slices[0]
            img2d = np.clip(vol[:, :, z] / 4, 0, 255).astype(np.uint8)
            if rgb_png:
                rgb = np.stack([img2d, 255 - img2d, img2d // 2], axis=-1)
                files.append(write_pillow(folder / "imagesTr" / f"{case}_0000{ending}", rgb))
            for c in range(0 if rgb_png else len(channels)):
                path = folder / "imagesTr" / f"{case}_{c:04d}{ending}"
                if ending in (".tif", ".tiff"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(str(path), (img2d.astype(np.uint16) + c) * 200)
                    files.append(path)
                else:
                    files.append(write_pillow(path, img2d + c))
            if ending in (".tif", ".tiff"):
                label.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(str(label), mask[:, :, z])
            else:
                write_pillow(label, mask[:, :, z])
        out[case] = (files, label)
    return out


def make_nnunet_tree(
    root: Path,
    sites: dict[str, int] | None = None,
    *,
    layout: str = "csv",
    **kwargs,
) -> Tree:
    """An nnU-Net v2 raw tree with ``sites`` (site → cases, default A: 3, B: 4).

    ``layout="csv"``: one ``Dataset010_Pooled`` folder (the tree's root) with ``sites.csv``
    (case,site); ``layout="folders"``: ``root/Dataset00k_<site>`` per site. Keyword arguments go
    to :func:`write_nnunet_dataset`. ``files`` holds (the first channel's file, the label).
    """
    sites = sites or {"A": 3, "B": 4}
    volume = kwargs.get("ending", ".nii.gz") in (".nii.gz", ".nii")
    per_case = len(kwargs.get("fg_slices", (1, 2))) if volume else 1
    if layout == "csv":
        folder = root / "Dataset010_Pooled"
        cases = {s: [f"{s.lower()}{i:03d}" for i in range(n)] for s, n in sites.items()}
        written = write_nnunet_dataset(folder, [c for cs in cases.values() for c in cs], **kwargs)
        rows = ["case,site"] + [f"{c},{s}" for s, cs in cases.items() for c in cs]
        (folder / "sites.csv").write_text("\n".join(rows) + "\n")
        tree = Tree(root=folder)
        for s, cs in cases.items():
            for c in cs:
                tree.add(s, c, written[c][0][0], written[c][1])
            tree.images[s] = len(cs) * per_case
        return tree
    tree = Tree(root=root)
    for k, (s, n) in enumerate(sites.items(), 1):
        folder = root / f"Dataset{k:03d}_{s}"
        tree.folders[s] = folder
        written = write_nnunet_dataset(folder, [f"case{i:03d}" for i in range(n)], key=k, **kwargs)
        for c, (files, label) in written.items():
            tree.add(s, c, files[0], label)
        tree.images[s] = n * per_case
    return tree
