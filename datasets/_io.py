"""Shared reading, preprocessing, caching and checking for the real-data loaders.

Every real loader (prostate, fundus, polyp, vessel) is a :class:`FolderDataset`: it lists the
folder into an :class:`Inventory` (one :class:`Item` per case: an image or volume plus its mask),
says how its masks are decoded (a :class:`Decoding`) and how one case is preprocessed. Everything
else lives here once: reading files, the load loop, the on-disk cache and ``check()``.

All file reads go through :func:`read_file`, the loaders' only door to the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pflbench.data import DataError, FederatedData, SiteData
from pflbench.dataset import CheckReport, Dataset

#: Bump when the cache file format or shared preprocessing changes: old cache files are ignored.
CACHE_VERSION = 1

PIL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm")
TIFF_EXTS = (".tif", ".tiff")
NIFTI_EXTS = (".nii", ".nii.gz")
NPY_EXTS = (".npy",)
IMAGE_EXTS = PIL_EXTS + TIFF_EXTS + NIFTI_EXTS + NPY_EXTS
LOSSY_EXTS = (".jpg", ".jpeg")

#: The benchmark whose layouts the polyp, vessel and gland loaders read (their citation).
FL_MEDSEGBENCH = (
    "M. Zhu, Z. Wang, A. Mao, Y. Li, X. Xing, Y. Yuan, E. Y. Lam, *FL-MedSegBench: A "
    "Comprehensive Benchmark for Federated Learning on Medical Image Segmentation*, "
    "arXiv 2603.11659"
)


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------


def suffix(path: Path) -> str:
    """The lower-case extension, ``.nii.gz`` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem(path: Path) -> str:
    """The file name without its extension (``.nii.gz`` counted as one)."""
    return path.name[: len(path.name) - len(suffix(path))] if suffix(path) else path.name


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and suffix(path) in IMAGE_EXTS


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name; hidden and other files skipped."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def find_child(folder: Path | None, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``folder`` whose name matches one of ``names`` (case-insensitive);
    ``None`` when there is none (or ``folder`` is ``None``)."""
    if folder is None or not folder.is_dir():
        return None
    children = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    for n in names:
        if n.lower() in children:
            return children[n.lower()]
    return None


#: Name parts that mark a mask (or an image) in the releases' file names; dropped when an image
#: and its mask do not share a stem (DRIVE ``21_training`` / ``21_manual1``, CHASE ``Image_01L``
#: / ``Image_01L_1stHO``, DR-HAGIS ``1_glaucoma`` / ``1_glaucoma_manual_orig``).
_NAME_TAGS = {
    "mask", "masks", "manual", "manual1", "orig", "1stho", "2ndho", "training", "train", "test",
    "label", "labels", "gt", "segmentation", "seg", "vessel", "vessels", "image", "img",
}  # fmt: skip


def _name_key(path: Path) -> str:
    parts = [t for t in re.split(r"[_\-\s.]+", stem(path).lower()) if t]
    kept = [t for t in parts if t not in _NAME_TAGS]
    return "_".join(kept or parts)


# --------------------------------------------------------------------------------------------
# Inventory of a folder
# --------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One case as found on disk: an image (2-D) or a volume, and its mask."""

    case_id: str
    image: Path
    mask: Path
    group: str | None = None  # the release's own split folder ("train", "test"), if any


@dataclass
class Inventory:
    """What a loader found under its root, before reading any file.

    ``problems`` are structural (a missing folder, an image without a mask, ...): ``load()`` refuses
    to go on with any, ``check()`` lists them all. ``info`` holds per-site facts for the report.
    """

    root: Path
    sites: dict[str, list[Item]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing_folder: bool = False

    def files(self) -> list[Path]:
        return [p for items in self.sites.values() for it in items for p in (it.image, it.mask)]


def pair_files(
    images: Sequence[Path],
    masks: Sequence[Path],
    rel: Callable[[Path], str],
    mask_dir: Path,
    mask_stem: Callable[[str], str] | None = None,
) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Pair images with masks: the release's own naming rule first (``mask_stem``: an image stem
    → its mask's stem, e.g. CAMG's ``Image`` → ``Seg``), then the same stem, then the same name
    once mask/image tags are dropped.

    Returns the pairs (in image order) and one problem per unpaired or ambiguous file.
    """
    problems: list[str] = []
    by_stem: dict[str, list[Path]] = {}
    by_key: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(stem(m), []).append(m)
        by_key.setdefault(_name_key(m), []).append(m)
    img_stems = Counter(stem(p) for p in images)
    used: set[Path] = set()
    pairs: list[tuple[Path, Path]] = []
    for img in images:
        if img_stems[stem(img)] > 1:
            problems.append(
                f"{rel(img)}: several images named {stem(img)!r} (different extensions)"
            )
            continue
        want = mask_stem(stem(img)) if mask_stem is not None else stem(img)
        cands = by_stem.get(want) or by_stem.get(stem(img)) or by_key.get(_name_key(img)) or []
        cands = [c for c in cands if c not in used]
        if not cands:
            problems.append(f"{rel(img)}: missing mask (no file named {want}.* in {rel(mask_dir)})")
        elif len(cands) > 1:
            names = ", ".join(rel(c) for c in cands)
            problems.append(f"{rel(img)}: several candidate masks ({names})")
            used.update(cands)
        else:
            pairs.append((img, cands[0]))
            used.add(cands[0])
    for m in masks:
        if m not in used:
            problems.append(f"{rel(m)}: mask without an image")
    return pairs, problems


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

Kind = Literal["image", "mask"]


def read_file(path: Path, kind: Kind) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read one file: the raw array and its pixel/voxel spacing when the header has one.

    The only function that touches image files. Pillow images are normalised by mode: for an image,
    palette / bilevel / RGBA → RGB and LA → L (16-bit and float modes stay numeric); for a mask the
    result is single-channel (palette and colour masks → the max over R, G, B). Raises whatever the
    reader raises; callers turn that into a :class:`DataError` naming the file.
    """
    ext = suffix(path)
    if ext in NIFTI_EXTS:
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        return np.asarray(data), zooms
    if ext in TIFF_EXTS:
        import tifffile

        return np.asarray(tifffile.imread(str(path))), None
    if ext in NPY_EXTS:
        return np.load(str(path), allow_pickle=False), None
    if ext in PIL_EXTS:
        from PIL import Image

        with Image.open(str(path)) as im:
            im.load()
            mode = im.mode
            if kind == "image":
                if mode in ("P", "PA", "1", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
                    im = im.convert("RGB")
                elif mode == "LA":
                    im = im.convert("L")
                return np.asarray(im), None
            if mode in ("P", "PA", "1", "RGBA", "CMYK", "YCbCr", "RGBX"):
                im = im.convert("RGB")
            elif mode == "LA":
                im = im.convert("L")
            arr = np.asarray(im)
            if arr.ndim == 3:
                arr = arr[..., :3].max(axis=-1)
            return arr, None
    raise ValueError(f"unsupported file type {ext!r}")


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """H×W×C for a 2-D array with channels first or last (C ≤ 4)."""
    if arr.ndim == 3 and arr.shape[0] <= 4 < min(arr.shape[1:]) and arr.shape[-1] > 4:
        return np.moveaxis(arr, 0, -1)
    return arr


def to_unit(arr: np.ndarray) -> np.ndarray:
    """Intensities to float32 [0, 1]: uint8 / 255, bool as 0/1, float already in [0, 1] kept,
    anything else min–max per image (16-bit photographs rarely use the full range)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool:
        return arr.astype(np.float32)
    out = arr.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return out
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def as_image(arr: np.ndarray, channels: int) -> np.ndarray:
    """A raw 2-D image array → float32 C×H×W in [0, 1] with ``channels`` channels (1 or 3)."""
    arr = np.squeeze(_channels_last(np.asarray(arr)))
    arr = _channels_last(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"not a 2-D image: array of shape {arr.shape}")
    arr = arr[..., : min(arr.shape[-1], 3)]  # drop alpha
    img = np.moveaxis(to_unit(arr), -1, 0)
    if img.shape[0] == channels:
        return np.ascontiguousarray(img)
    if channels == 3 and img.shape[0] == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=0))
    if channels == 1:
        return np.ascontiguousarray(img.mean(axis=0, keepdims=True))
    raise ValueError(f"cannot make {channels} channels from an image with {img.shape[0]}")


def as_mask2d(arr: np.ndarray) -> np.ndarray:
    """A raw mask array → H×W (colour masks: max over the channels)."""
    arr = np.squeeze(_channels_last(np.asarray(arr)))
    arr = _channels_last(arr)
    if arr.ndim == 3 and arr.shape[-1] <= 4:
        arr = arr[..., :3].max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"not a 2-D mask: array of shape {arr.shape}")
    return arr


def as_volume(arr: np.ndarray) -> np.ndarray:
    """A raw NIfTI array → X×Y×Z (trailing singleton dimensions dropped, 2-D → one slice)."""
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"not a 3-D volume: array of shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------
# Label decoding, explicit per source
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How one source's mask values become class ids.

    Either ``values`` (raw value → class id; every pixel takes the class of the nearest listed
    value, so slightly off values from resampling still decode) or ``threshold`` (raw > threshold
    → class 1, else 0). ``expected`` is the set of raw values a clean mask holds (``None``: any,
    e.g. JPEG masks); ``check()`` reports anything else.
    """

    name: str
    description: str
    values: tuple[tuple[int, int], ...] | None = None
    threshold: float | None = None
    expected: frozenset[int] | None = None

    def decode(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if self.threshold is not None:
            return (raw > self.threshold).astype(np.int64)
        assert self.values is not None
        keys = np.array(sorted(v for v, _ in self.values), dtype=np.float64)
        lut = dict(self.values)
        classes = np.array([lut[int(k)] for k in keys], dtype=np.int64)
        if len(keys) == 1:
            return np.full(raw.shape, classes[0], dtype=np.int64)
        mids = (keys[1:] + keys[:-1]) / 2.0
        return classes[np.searchsorted(mids, raw.astype(np.float64), side="left")]

    def unexpected(self, found: Iterable[float]) -> list[float]:
        if self.expected is None:
            return []
        return sorted(v for v in found if v not in self.expected)

    def expected_text(self) -> str:
        return "/".join(str(v) for v in sorted(self.expected or ()))


def label_values(raw: np.ndarray) -> set[float]:
    vals = np.unique(np.asarray(raw))
    return {int(v) if float(v).is_integer() else float(v) for v in vals.tolist()}


# --------------------------------------------------------------------------------------------
# Geometry and intensity
# --------------------------------------------------------------------------------------------


def resize_image(img: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """C×H×W float → C×size×size or C×H'×W' for ``size`` = (H', W') (bilinear, anti-aliased when
    shrinking), clipped to [0, 1]."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(img.shape[1:]) == hw:
        return np.ascontiguousarray(img, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    out = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0).numpy()


def resize_label(lab: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """H×W class ids → size×size or (H', W') (nearest), int64."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(lab.shape) == hw:
        return np.ascontiguousarray(lab, dtype=np.int64)
    t = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=hw, mode="nearest-exact")
    return out[0, 0].round().to(torch.int64).numpy()


def crop_or_pad(arr: np.ndarray, size: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Centre crop (or zero-pad) ``arr`` to size×size along ``axes``."""
    out = arr
    for ax in axes:
        n = out.shape[ax]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=ax)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[ax] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad)
    return out


def pad_square(arr: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Zero-pad the two ``axes`` to the larger of the two (centred)."""
    return crop_or_pad(arr, max(arr.shape[axes[0]], arr.shape[axes[1]]), axes)


def normalize_volume(vol: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Per volume: clip at the given upper percentile, then min–max to [0, 1] (float32)."""
    vol = vol.astype(np.float32)
    hi = float(np.percentile(vol, percentile))
    vol = np.minimum(vol, hi)
    lo, hi = float(vol.min()), float(vol.max())
    return (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)


# --------------------------------------------------------------------------------------------
# Splits carved from an official train set
# --------------------------------------------------------------------------------------------


def carve_val(
    cases: Sequence[str], fraction: float, seed: int, site: str
) -> tuple[list[str], list[str]]:
    """Split an official train list into (train, val) by case, seeded per site; order kept.

    At least one val case when there are two or more cases and ``fraction`` > 0.
    """
    cases = list(cases)
    n = len(cases)
    n_val = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, int(round(fraction * n))))
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{site}:val".encode()).digest()[:8], "little")
    chosen = set(np.random.default_rng(digest).permutation(n)[:n_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in chosen]
    val = [c for i, c in enumerate(cases) if i in chosen]
    return train, val


def official_splits(
    inv: Inventory, site_names: Iterable[str], val_fraction: float, seed: int
) -> dict[str, dict[str, list[str]]]:
    """Splits that keep a release's own train / test folders (``Item.group``): test is the
    official test set, val is carved from the official train set by case (seeded per site)."""
    splits: dict[str, dict[str, list[str]]] = {}
    for site in site_names:
        items = inv.sites[site]
        official = [it.case_id for it in items if it.group == "train"]
        train, val = carve_val(official, val_fraction, seed, site)
        test = [it.case_id for it in items if it.group == "test"]
        splits[site] = {"train": train, "val": val, "test": test}
    return splits


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("PFLBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pflbench"


def source_fingerprint(
    loader: str, version: int, options: dict[str, Any], files: Iterable[Path]
) -> str:
    """Hash of (loader, its version, its options, every source file with size and mtime)."""
    listing = []
    for p in sorted(set(files)):
        st = p.stat()
        listing.append([str(p), st.st_size, st.st_mtime_ns])
    payload = {
        "loader": loader,
        "version": version,
        "cache_version": CACHE_VERSION,
        "options": options,
        "files": listing,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_cache(path: Path, data: FederatedData) -> None:
    """Write ``data`` atomically; a cache that cannot be written only warns."""
    blob = {
        "cache_version": CACHE_VERSION,
        "name": data.name,
        "classes": list(data.classes),
        "structures": {k: list(v) for k, v in data.structures.items()},
        "case_level": data.case_level,
        "split_fractions": list(data.split_fractions),
        "predefined_splits": data.predefined_splits,
        "source": json.loads(json.dumps(data.source, default=str)),
        "sites": [
            {
                "name": s.name,
                "images": s.images.contiguous(),
                "labels": s.labels.contiguous(),
                "case_ids": list(s.case_ids),
                "slice_index": [int(i) for i in s.slice_index],
                "spacing": [float(x) for x in s.spacing],
            }
            for s in data.sites
        ],
    }
    write_cache_file(path, lambda f: torch.save(blob, f))


def write_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a cache file atomically (concurrent loaders never see a partial file); a cache
    folder that cannot be written only warns, since the data can always be rebuilt."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(
            f"could not write the dataset cache {path}: {exc} (the data are rebuilt next time)",
            stacklevel=3,
        )
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: Path) -> FederatedData | None:
    """The cached federation, or ``None`` when absent, unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("cache_version") != CACHE_VERSION:
            return None
        sites = [
            SiteData(
                name=s["name"],
                images=s["images"],
                labels=s["labels"],
                case_ids=list(s["case_ids"]),
                slice_index=list(s["slice_index"]),
                spacing=(float(s["spacing"][0]), float(s["spacing"][1])),
            )
            for s in blob["sites"]
        ]
        return FederatedData(
            name=blob["name"],
            sites=sites,
            classes=list(blob["classes"]),
            structures={k: list(v) for k, v in blob["structures"].items()},
            case_level=blob["case_level"],
            split_fractions=tuple(blob["split_fractions"]),
            predefined_splits=blob["predefined_splits"],
            source=dict(blob["source"]),
        )
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


# --------------------------------------------------------------------------------------------
# The shared loader
# --------------------------------------------------------------------------------------------

Sample = tuple[np.ndarray, np.ndarray, int]  # image C×H×W float32, label H×W int64, slice index


def output_size(size: Any, loader: str) -> int | list[int]:
    """A loader's ``size`` option checked: a positive integer, or [H, W] of positive integers."""
    if isinstance(size, bool):
        size = None
    if isinstance(size, (int, np.integer)) and size >= 1:
        return int(size)
    if (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size
        )
    ):
        return [int(size[0]), int(size[1])]
    raise DataError(
        f"{loader}: option size must be a positive integer or [H, W] of positive integers "
        f"(got {size!r})"
    )


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class FolderDataset(Dataset):
    """Base of the real loaders: folder → inventory → per-case read + preprocess → federation.

    Subclasses set ``name``, ``description``, ``expected_tree``, ``channels`` and ``volumetric``,
    store their options as attributes (at least ``root``, ``size``, ``cache_dir``, ``cache``) and
    implement :meth:`scan`, :meth:`decoding`, :meth:`preprocess` and :meth:`federate`.
    """

    #: Bump when this loader's preprocessing changes: cached results are then rebuilt.
    version: ClassVar[int] = 1
    channels: ClassVar[int] = 3
    volumetric: ClassVar[bool] = False

    root: str
    size: int | list[int]
    cache_dir: str | None
    cache: bool

    def _common_options(
        self,
        root: str,
        size: int | Sequence[int],
        sites: list[str] | None,
        cache_dir: str | None,
        cache: bool,
    ) -> None:
        """Store and check the options every folder loader has.

        ``size`` is one integer (square output) or [H, W] (e.g. the gland task's [192, 384]).
        """
        self.root = str(root)
        self.size = output_size(size, self.name)
        self.sites = list(sites) if sites is not None else None
        self.cache_dir = cache_dir
        self.cache = bool(cache)
        if self.sites is not None and (not self.sites or len(set(self.sites)) != len(self.sites)):
            raise DataError(f"{self.name}: option sites must list distinct site names")

    @property
    def hw(self) -> tuple[int, int]:
        """The output (H, W)."""
        return (
            (self.size, self.size) if isinstance(self.size, int) else (self.size[0], self.size[1])
        )
        if self.sites is not None and (not self.sites or len(set(self.sites)) != len(self.sites)):
            raise DataError(f"{self.name}: option sites must list distinct site names")

    # -- hooks ---------------------------------------------------------------------------------

    def scan(self, root: Path) -> Inventory:
        raise NotImplementedError

    def decoding(self, mask: Path) -> Decoding:
        raise NotImplementedError

    def preprocess(
        self, item: Item, image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...] | None
    ) -> list[Sample]:
        """2-D default: image (bilinear) and label (nearest) resized to ``size`` (H×W)."""
        return [(resize_image(image, self.hw), resize_label(label, self.hw), 0)]

    def federate(self, inv: Inventory, sites: list[SiteData]) -> FederatedData:
        raise NotImplementedError

    def pixel_spacing(self, spacing: tuple[float, ...] | None) -> tuple[float, float] | None:
        """The in-plane spacing of the output images given the file's header spacing (if any)."""
        return None

    def images_in(self, label: np.ndarray) -> int:
        """How many 2-D images ``load()`` makes of a case with this decoded label."""
        return 1

    # -- shared helpers ------------------------------------------------------------------------

    def root_path(self) -> Path:
        return Path(self.root).expanduser().absolute()

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root_path()).as_posix()
        except ValueError:
            return str(path)

    def tree_text(self) -> str:
        return f"Expected layout under {self.root_path()}:\n{self.expected_tree.strip(chr(10))}"

    def missing(self, inv: Inventory, path: Path, what: str = "folder") -> None:
        """Record a missing file or folder (a structural problem that prints the tree)."""
        inv.problems.append(f"missing {what} {path}")
        inv.missing_folder = True

    def add_pairs(
        self,
        inv: Inventory,
        site: str,
        image_dir: Path | None,
        mask_dir: Path | None,
        expected: tuple[Path, Path],
        group: str | None = None,
        mask_stem: Callable[[str], str] | None = None,
    ) -> int:
        """Pair the images of ``image_dir`` with the masks of ``mask_dir`` into site ``site``.

        ``None`` for a folder means it was not found: a structural problem naming the canonical
        path from ``expected``. A case id (image stem) seen twice in the site is a problem too.
        Returns the number of pairs.
        """
        items = inv.sites.setdefault(site, [])
        for found, want in zip((image_dir, mask_dir), expected, strict=True):
            if found is None:
                self.missing(inv, want)
        if image_dir is None or mask_dir is None:
            return 0
        images, masks = list_images(image_dir), list_images(mask_dir)
        if not images:
            inv.problems.append(f"{self.rel(image_dir)}: no image files")
        pairs, problems = pair_files(images, masks, self.rel, mask_dir, mask_stem)
        inv.problems.extend(problems)
        seen = {it.case_id: it for it in items}
        for img, mask in pairs:
            case = stem(img)
            if case in seen:
                inv.problems.append(
                    f"{self.rel(img)}: case {case!r} also in {self.rel(seen[case].image)}"
                )
                continue
            item = Item(case_id=case, image=img, mask=mask, group=group)
            items.append(item)
            seen[case] = item
        return len(pairs)

    def cache_options(self) -> dict[str, Any]:
        opts = self.options()
        opts.pop("cache_dir", None)
        opts.pop("cache", None)
        opts["root"] = str(self.root_path())
        return opts

    def cache_path(self, files: list[Path]) -> Path:
        """``<cache>/datasets/<name>-<options hash>-<fingerprint>.pt``.

        The fingerprint covers the loader, its version, its options (``cache_dir`` and ``cache``
        left out, ``root`` made absolute) and every source file with its size and mtime. The
        options hash alone names the slot: a rebuild after the files changed replaces the old
        file of the same slot instead of piling up copies.
        """
        base = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        opts = self.cache_options()
        slot = hashlib.sha256(json.dumps([self.name, opts], sort_keys=True, default=str).encode())
        fp = source_fingerprint(self.name, self.version, opts, files)
        return base / "datasets" / f"{self.name}-{slot.hexdigest()[:8]}-{fp}.pt"

    def inventory(self) -> Inventory:
        """Scan the root; raise :class:`DataError` (with the expected tree) on any problem."""
        root = self.root_path()
        if not root.is_dir():
            raise DataError(
                f"{self.name}: the root folder {root} does not exist or is not a folder.\n"
                f"{self.tree_text()}"
            )
        inv = self.scan(root)
        if inv.problems:
            listing = "\n".join(f"  - {p}" for p in inv.problems[:50])
            more = f"\n  ... and {len(inv.problems) - 50} more" if len(inv.problems) > 50 else ""
            tree = f"\n{self.tree_text()}" if inv.missing_folder else ""
            raise DataError(
                f"{self.name}: {root} is not a valid {self.name} folder "
                f"({len(inv.problems)} problem(s); `pflbench data check {self.name}` lists them):"
                f"\n{listing}{more}{tree}"
            )
        empty = [s for s, items in inv.sites.items() if not items]
        if empty or not inv.sites:
            raise DataError(f"{self.name}: no cases found for site(s) {empty}.\n{self.tree_text()}")
        return inv

    def read_image(self, path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
        """The image (C×H×W in [0, 1]) or volume (X×Y×Z raw float32) of ``path``."""
        try:
            arr, spacing = read_file(path, "image")
            if self.volumetric:
                return as_volume(arr).astype(np.float32), spacing
            return as_image(arr, self.channels), spacing
        except Exception as exc:
            raise DataError(f"{self.name}: cannot read image {path}: {exc}") from exc

    def read_mask(self, path: Path) -> np.ndarray:
        """The raw mask of ``path``: H×W, or X×Y×Z for volumes."""
        try:
            arr, _ = read_file(path, "mask")
            return as_volume(arr) if self.volumetric else as_mask2d(arr)
        except Exception as exc:
            raise DataError(f"{self.name}: cannot read mask {path}: {exc}") from exc

    def _grid(self, image: np.ndarray) -> tuple[int, ...]:
        return tuple(image.shape) if self.volumetric else tuple(image.shape[1:])

    def load_item(self, item: Item) -> tuple[list[Sample], tuple[float, float] | None]:
        image, spacing = self.read_image(item.image)
        raw = self.read_mask(item.mask)
        if tuple(raw.shape) != self._grid(image):
            raise DataError(
                f"{self.name}: mask {item.mask} is {_shape(raw.shape)} but its image "
                f"{item.image} is {_shape(self._grid(image))}"
            )
        label = self.decoding(item.mask).decode(raw)
        return self.preprocess(item, image, label, spacing), self.pixel_spacing(spacing)

    # -- Dataset API ---------------------------------------------------------------------------

    def load(self) -> FederatedData:
        inv = self.inventory()
        path = self.cache_path(inv.files()) if self.cache else None
        if path is not None:
            cached = load_cache(path)
            if cached is not None:
                return cached
        sites: list[SiteData] = []
        with ThreadPoolExecutor(_workers()) as pool:
            for site, items in inv.sites.items():
                images, labels, case_ids, slices, spacings = [], [], [], [], []
                for item, (samples, sp) in zip(items, pool.map(self.load_item, items), strict=True):
                    if sp is not None:
                        spacings.append(sp)
                    for img, lab, z in samples:
                        images.append(img)
                        labels.append(lab)
                        case_ids.append(item.case_id)
                        slices.append(z)
                if not images:
                    raise DataError(
                        f"{self.name}: site {site!r} has {len(items)} case(s) but no image to use "
                        "after preprocessing (e.g. no slice with foreground)"
                    )
                sites.append(
                    SiteData(
                        name=site,
                        images=torch.from_numpy(np.stack(images)),
                        labels=torch.from_numpy(np.stack(labels)),
                        case_ids=case_ids,
                        slice_index=slices,
                        spacing=_median_spacing(spacings),
                    )
                )
        data = self.federate(inv, sites)
        data.source.setdefault("loader", self.name)
        data.source.setdefault("root", str(self.root_path()))
        if path is not None:
            data.source["cache"] = str(path)
            save_cache(path, data)
            slot = path.name.rsplit("-", 1)[0]
            for old in path.parent.glob(f"{slot}-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)
        return data

    def inspect_item(self, item: Item) -> dict[str, Any]:
        """Read one case without stopping: its size, label values, image count and problems."""
        out: dict[str, Any] = {"size": None, "values": set(), "images": 0, "problems": []}
        image = raw = None
        try:
            image, _ = self.read_image(item.image)
            out["size"] = _shape(self._grid(image))
        except DataError as exc:
            out["problems"].append(f"{self.rel(item.image)}: unreadable image ({_cause(exc)})")
        try:
            raw = self.read_mask(item.mask)
        except DataError as exc:
            out["problems"].append(f"{self.rel(item.mask)}: unreadable mask ({_cause(exc)})")
        if raw is None:
            return out
        dec = self.decoding(item.mask)
        values = label_values(raw)
        out["values"] = values
        bad = dec.unexpected(values)
        if bad:
            shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
            out["problems"].append(
                f"{self.rel(item.mask)}: unexpected label value(s) {shown} "
                f"(the {dec.name} encoding expects {dec.expected_text()})"
            )
        if image is not None and tuple(raw.shape) != self._grid(image):
            out["problems"].append(
                f"{self.rel(item.mask)}: size mismatch, mask is {_shape(raw.shape)} but the image "
                f"{self.rel(item.image)} is {_shape(self._grid(image))}"
            )
        else:
            out["images"] = self.images_in(dec.decode(raw))
        return out

    def check(self) -> CheckReport:
        """Inspect every file; list every problem (never stops at the first)."""
        root = self.root_path()
        report = CheckReport(dataset=self.name, root=str(root))
        if not root.is_dir():
            report.problems.append(f"{root}: the root folder does not exist or is not a folder")
            report.expected_tree = self.tree_text()
            return report
        inv = self.scan(root)
        report.problems.extend(inv.problems)
        if inv.missing_folder:  # the expected layout, printed once after the problem list
            report.expected_tree = self.tree_text()
        with ThreadPoolExecutor(_workers()) as pool:
            for site, items in inv.sites.items():
                sizes: Counter[str] = Counter()
                values: set[float] = set()
                n_images = 0
                for res in pool.map(self.inspect_item, items):
                    if res["size"]:
                        sizes[res["size"]] += 1
                    values |= res["values"]
                    n_images += res["images"]
                    report.problems.extend(res["problems"])
                stats: dict[str, Any] = {
                    "cases": len(items),
                    "images": n_images,
                    "sizes": dict(sizes.most_common()),
                    "label_values": sorted(values)[:32],
                }
                if len(values) > 32:
                    stats["label_values_distinct"] = len(values)
                stats.update(inv.info.get(site, {}))
                report.sites[site] = stats
        return report


def _median_spacing(spacings: list[tuple[float, float]]) -> tuple[float, float]:
    if not spacings:
        return (1.0, 1.0)
    med = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    return (float(med[0]), float(med[1]))


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


# --------------------------------------------------------------------------------------------
# Report rendering for `pflbench data check`
# --------------------------------------------------------------------------------------------


def format_check(report: CheckReport) -> Any:
    """A rich renderable of a :class:`CheckReport`: one row per site, then every problem."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{report.dataset}: {report.root}", title_justify="left")
    for col in ("site", "cases", "images", "sizes", "label values", "notes"):
        table.add_column(col, justify="right" if col in ("cases", "images") else "left")
    for site, st in report.sites.items():
        sizes = st.get("sizes", {})
        shown = ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:3])
        if len(sizes) > 3:
            shown += f", +{len(sizes) - 3} more"
        vals = st.get("label_values", [])
        vtext = " ".join(str(v) for v in vals)
        if "label_values_distinct" in st:
            vtext += f" ... ({st['label_values_distinct']} distinct)"
        notes = ", ".join(
            f"{k}: {v}"
            for k, v in st.items()
            if k not in ("cases", "images", "sizes", "label_values", "label_values_distinct")
        )
        table.add_row(
            site, str(st.get("cases", "")), str(st.get("images", "")), shown, vtext, notes
        )
    parts: list[Any] = [table]
    if report.problems:
        parts.append(Text(f"{len(report.problems)} problem(s):", style="bold red"))
        parts.extend(Text(f"  - {p}") for p in report.problems)
        if report.expected_tree:
            parts.append(Text(report.expected_tree))
    else:
        parts.append(Text("no problems found", style="bold green"))
    return Group(*parts)


def format_check_text(report: CheckReport, width: int = 120) -> str:
    """:func:`format_check` rendered to plain text (for logs and tests)."""
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(format_check(report))
    return console.export_text()
