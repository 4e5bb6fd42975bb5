"""nnU-Net v2 raw datasets as a federation: any task already prepared for nnU-Net, split into sites.

nnU-Net v2's ``nnUNet_raw`` layout is read as it is (``dataset.json`` with ``channel_names``,
``labels``, ``numTraining`` and ``file_ending``; ``imagesTr/CASE_XXXX<ext>`` with one file per
channel; ``labelsTr/CASE<ext>``). nnU-Net has no notion of a site, so the sites come from one of
two places, chosen by what ``root`` holds:

- ``root`` is one dataset folder (it holds ``dataset.json``) and ``sites_csv`` names a CSV with
  columns ``case,site`` (relative paths are relative to ``root``): every case needs a site;
- ``root`` holds several ``DatasetNNN_<Name>`` folders: each is a site, named ``<Name>``; their
  ``dataset.json`` must declare the same channels and labels.

Labels are the class ids of ``dataset.json``'s ``labels`` (background 0, consecutive ids as
nnU-Net requires): one foreground label is a binary task, several a multi-class one with one
structure per label. Region-based labels (a list of ids) become nested structures, as the fundus
loader's disc = {rim, cup}. One channel is used (option ``channel``: index or name, default 0).

Preprocessing: 3-D volumes (``.nii.gz`` / ``.nii``, 3-D ``.tif``) are clipped at their 99th
percentile and min–max scaled to [0, 1] per volume, then cut into 2-D slices along the last axis
(NIfTI; the first axis of a Z×H×W TIFF stack), keeping slices with foreground unless
``keep_empty``, as the prostate loader does; 2-D images are scaled to [0, 1] (uint8 / 255, other
types min–max). Every slice is zero-padded to a square and resized to ``size`` (bilinear image,
nearest label). A case is a volume (or an image); the split is 70/10/20 by case, seeded per site.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pflbench.data import DataError, FederatedData, SiteData

from . import _io

#: ``file_ending`` values nnU-Net v2's readers accept and this loader reads.
FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".png", ".bmp", ".tif", ".tiff")
#: Endings whose files are 2-D images that may hold all channels in one file (RGB ``.png``).
NATURAL_2D = (".png", ".bmp", ".tif", ".tiff")

_DATASET_DIR = re.compile(r"^Dataset(\d{3})_(.+)$")
_CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")


class ChannelMismatch(ValueError):
    """A file holds another number of channels than ``dataset.json`` declares."""


@dataclass(frozen=True)
class Spec:
    """What one ``dataset.json`` declares, checked."""

    path: Path
    channel_names: tuple[str, ...]
    classes: tuple[str, ...]
    structures: dict[str, list[int]]
    num_training: int
    file_ending: str

    @property
    def values(self) -> frozenset[int]:
        return frozenset(range(len(self.classes)))

    def channels_text(self) -> str:
        return ", ".join(f"{i}: {n}" for i, n in enumerate(self.channel_names))

    def same_task(self, other: Spec) -> bool:
        return (self.channel_names, self.classes, self.structures) == (
            other.channel_names,
            other.classes,
            other.structures,
        )


def read_spec(path: Path, shown: str) -> Spec:
    """Parse ``dataset.json``; :class:`DataError` naming the file (as ``shown``) and the key."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{shown}: not a readable JSON file ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{shown}: expected a JSON object with channel_names, labels, ...")
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in raw]
    if missing:
        raise DataError(f"{shown}: missing key(s) {', '.join(missing)} (nnU-Net v2 dataset.json)")
    return Spec(
        path=path,
        channel_names=_channel_names(raw["channel_names"], shown),
        **_labels(raw["labels"], shown),
        num_training=_num_training(raw["numTraining"], shown),
        file_ending=_file_ending(raw["file_ending"], shown),
    )


def _channel_names(value: Any, shown: str) -> tuple[str, ...]:
    want = 'channel_names must map "0", "1", ... to names, e.g. {"0": "T2"}'
    if not isinstance(value, dict) or not value:
        raise DataError(f"{shown}: {want} (got {value!r})")
    if sorted(value, key=str) != sorted(str(i) for i in range(len(value))):
        raise DataError(f"{shown}: {want} (got keys {sorted(value)})")
    return tuple(str(value[str(i)]) for i in range(len(value)))


def _labels(value: Any, shown: str) -> dict[str, Any]:
    """Classes (index = id) and structures from ``labels``: name → id, or name → [ids] (region)."""
    if not isinstance(value, dict) or value.get("background") != 0:
        raise DataError(
            f'{shown}: labels must map names to ids with "background": 0 (got {value!r})'
        )
    if "ignore" in value:
        raise DataError(
            f"{shown}: labels.ignore is nnU-Net's ignore label (sparse annotation); pflbench "
            "trains and scores every pixel, so it cannot use such a dataset"
        )
    ids: dict[str, list[int]] = {}
    for name, v in value.items():
        vs = v if isinstance(v, list) else [v]
        if not vs or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vs):
            raise DataError(
                f"{shown}: labels.{name} must be a class id or a list of ids (got {v!r})"
            )
        ids[name] = sorted(set(vs))
    plain = [v for v in value.values() if not isinstance(v, list)]
    if len(plain) != len(set(plain)):
        raise DataError(f"{shown}: labels gives one id to several names ({value})")
    found = sorted({i for vs in ids.values() for i in vs})
    if found != list(range(len(found))):
        raise DataError(
            f"{shown}: label ids must be consecutive from 0 (nnU-Net's rule), got {found}"
        )
    names = {v: n for n, v in value.items() if isinstance(v, int)}
    classes = tuple(names.get(i, f"label {i}") for i in found)
    structures = {n: vs for n, vs in ids.items() if n != "background"}
    if not structures:
        raise DataError(f"{shown}: labels declares no structure besides background")
    return {"classes": classes, "structures": structures}


def _num_training(value: Any, shown: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{shown}: numTraining must be a count of cases (got {value!r})")
    return value


def _file_ending(value: Any, shown: str) -> str:
    if value not in FILE_ENDINGS:
        raise DataError(
            f"{shown}: file_ending {value!r} is not one this loader reads ({', '.join(FILE_ENDINGS)})"
        )
    return str(value)


@dataclass
class Case(_io.Item):
    """A case: ``image`` is the file of the chosen channel; ``inner`` the channel's index inside
    that file when one 2-D file holds every channel (an RGB ``.png``), else ``None``."""

    inner: int | None = None
    channels: int = 1  # channels the file should hold


class NNUNet(_io.FolderDataset):
    name: ClassVar[str] = "nnunet"
    description: ClassVar[str] = (
        "nnU-Net v2 raw dataset(s): one dataset folder + a case→site CSV, or one DatasetNNN_* "
        "folder per site; labels from dataset.json; split 70/10/20 by case"
    )
    expected_tree: ClassVar[str] = """\
<root>/                           one nnU-Net v2 raw dataset, sites from a CSV (option sites_csv)
  dataset.json                    {"channel_names": {"0": "T2"}, "labels": {"background": 0,
                                   "prostate": 1}, "numTraining": N, "file_ending": ".nii.gz"}
  imagesTr/<CASE>_0000<ext>       one file per channel: <CASE>_0000 ... <CASE>_XXXX
  labelsTr/<CASE><ext>            class ids as in dataset.json's labels
  sites.csv                       columns case,site; one row per case (the sites_csv option)
or
<root>/                           one dataset folder per site (no sites_csv)
  Dataset001_<SiteA>/             dataset.json, imagesTr/, labelsTr/ as above
  Dataset002_<SiteB>/             ... (every dataset.json: same channels and labels)
<ext> = file_ending: .nii.gz .nii (3-D, sliced along the last axis), .png .bmp (2-D; RGB in one
file), .tif .tiff (2-D, or a Z×H×W stack)"""
    source: ClassVar[str] = (
        "any dataset in nnU-Net v2's raw format (e.g. a Medical Segmentation Decathlon task once "
        "converted), split into sites by a case→site CSV or given as one dataset folder per site"
    )
    homepage: ClassVar[str] = (
        "https://github.com/MIC-DKFZ/nnUNet (documentation/dataset_format.md: the layout)"
    )
    licence: ClassVar[str] = "that of the dataset you bring"
    access: ClassVar[str] = (
        "convert your data to nnU-Net v2's raw format (nnU-Net's dataset_conversion scripts and "
        "documentation/convert_msd_dataset.md) and add a case,site CSV; nothing is downloaded"
    )
    citation: ClassVar[str] = (
        "F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen, K. H. Maier-Hein, *nnU-Net: a "
        "self-configuring method for deep learning-based biomedical image segmentation*, "
        "Nature Methods 2021; and the dataset you bring"
    )
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True  # every case is read as H×W×Z (2-D images: Z = 1)

    def __init__(
        self,
        *,
        root: str,
        sites_csv: str | None = None,
        channel: int | str = 0,
        size: int | list[int] = 256,
        keep_empty: bool = False,
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)
        self.sites_csv = None if sites_csv is None else str(sites_csv)
        self.keep_empty = bool(keep_empty)
        if isinstance(channel, bool) or not isinstance(channel, (int, str)) or channel == "":
            raise DataError(f"{self.name}: option channel must be an index or a channel name")
        if isinstance(channel, int) and channel < 0:
            raise DataError(f"{self.name}: option channel must be ≥ 0 (got {channel})")
        self.channel = channel
        self._spec: Spec | None = None
        self._meta: list[Path] = []
        self._by_image: dict[Path, Case] = {}  # a case's file → how to take its channel

    # -- the folder -----------------------------------------------------------------------------

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        self._meta = []
        if (root / "dataset.json").is_file():
            self._scan_one(inv, root)
        else:
            self._scan_many(inv, root)
        self._by_image = {
            it.image: it for items in inv.sites.values() for it in items if isinstance(it, Case)
        }
        return inv

    def _spec_of(self, inv: _io.Inventory, folder: Path) -> Spec | None:
        path = folder / "dataset.json"
        if not path.is_file():
            self.missing(inv, path, "file")
            return None
        self._meta.append(path)
        try:
            spec = read_spec(path, self.rel(path))
        except DataError as exc:
            inv.problems.append(str(exc))
            return None
        if self._spec is None:
            self._spec = spec
        elif not self._spec.same_task(spec):
            inv.problems.append(
                f"{self.rel(path)}: channels or labels differ from {self.rel(self._spec.path)} "
                "(every site must be the same task)"
            )
            return None
        return spec

    def _scan_one(self, inv: _io.Inventory, root: Path) -> None:
        """``root`` is one dataset folder; the sites come from ``sites_csv``."""
        self._spec = None
        spec = self._spec_of(inv, root)
        if self.sites_csv is None:
            inv.problems.append(
                f"{self.rel(root / 'dataset.json')}: one dataset folder has no sites; give the "
                "option sites_csv (a CSV with columns case,site), or point root at a folder "
                "holding one DatasetNNN_<Site> folder per site"
            )
            return
        if spec is None:
            return
        cases, found = self._cases(inv, root, spec)
        csv_path = Path(self.sites_csv).expanduser()
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        mapping = self._read_sites_csv(inv, csv_path)
        if mapping is None:
            return
        shown = self.rel(csv_path)
        for case, (_site, line) in mapping.items():
            if case not in found:
                inv.problems.append(
                    f"{shown} line {line}: case {case!r} has no image (no "
                    f"{self.rel(root / 'imagesTr')}/{case}_0000{spec.file_ending})"
                )
        for case in sorted(found - set(mapping)):
            inv.problems.append(
                f"{self.rel(root / 'imagesTr')}/{case}_XXXX{spec.file_ending}: case {case!r} "
                f"has no site in {shown} (every case needs a row case,site)"
            )
        found = list(dict.fromkeys(site for site, _ in mapping.values()))
        for site in self._chosen(inv, found, f"sites in {shown}"):
            inv.sites[site] = [
                cases[c] for c, (s, _) in mapping.items() if s == site and c in cases
            ]
            inv.info[site] = {"channel": self._channel_text(spec)}

    def _scan_many(self, inv: _io.Inventory, root: Path) -> None:
        """``root`` holds one ``DatasetNNN_<Site>`` folder per site."""
        self._spec = None
        folders: dict[str, Path] = {}
        for p in sorted(root.iterdir(), key=lambda p: p.name):
            m = _DATASET_DIR.match(p.name)
            if m and p.is_dir():
                if m.group(2) in folders:
                    inv.problems.append(
                        f"{self.rel(p)}: site {m.group(2)!r} also in {self.rel(folders[m.group(2)])}"
                    )
                    continue
                folders[m.group(2)] = p
        if not folders:
            inv.problems.append(
                f"missing file {root / 'dataset.json'}: {root} is neither an nnU-Net dataset "
                "folder nor a folder of DatasetNNN_<Site> folders"
            )
            inv.missing_folder = True
            return
        if self.sites_csv is not None:
            inv.problems.append(
                f"{root}: holds {len(folders)} dataset folders, each a site; the option "
                "sites_csv is for one dataset folder (point root at it)"
            )
            return
        for site in self._chosen(inv, list(folders), f"DatasetNNN_<Site> folders in {root}"):
            spec = self._spec_of(inv, folders[site])
            if spec is None:
                continue
            inv.sites[site] = list(self._cases(inv, folders[site], spec)[0].values())
            inv.info[site] = {"folder": folders[site].name, "channel": self._channel_text(spec)}

    def _chosen(self, inv: _io.Inventory, found: list[str], where: str) -> list[str]:
        """The sites to use (option ``sites``, in its order); unknown names are problems."""
        if self.sites is None:
            return found
        for s in self.sites:
            if s not in found:
                inv.problems.append(f"site {s!r} (option sites) is not one of the {where}: {found}")
        return [s for s in self.sites if s in found]

    def _channel_index(self, spec: Spec) -> int:
        if isinstance(self.channel, int):
            if self.channel >= len(spec.channel_names):
                raise DataError(
                    f"option channel={self.channel}: {self.rel(spec.path)} declares "
                    f"{len(spec.channel_names)} channel(s): {spec.channels_text()}"
                )
            return self.channel
        if self.channel not in spec.channel_names:
            raise DataError(
                f"option channel={self.channel!r}: not a channel of {self.rel(spec.path)} "
                f"({spec.channels_text()})"
            )
        return spec.channel_names.index(self.channel)

    def _channel_text(self, spec: Spec) -> str:
        try:
            i = self._channel_index(spec)
        except DataError:
            return "?"
        return f"{i} ({spec.channel_names[i]}) of {len(spec.channel_names)}"

    def _cases(
        self, inv: _io.Inventory, folder: Path, spec: Spec
    ) -> tuple[dict[str, Case], set[str]]:
        """The usable cases of one dataset folder (case id → its chosen channel's file and its
        label), and the ids of every case with a channel file (usable or not)."""
        images, labels = folder / "imagesTr", folder / "labelsTr"
        for d in (images, labels):
            if not d.is_dir():
                self.missing(inv, d)
        if not images.is_dir() or not labels.is_dir():
            return {}, set()
        try:
            want = self._channel_index(spec)
        except DataError as exc:
            inv.problems.append(str(exc))
            return {}, set()
        end, n = spec.file_ending, len(spec.channel_names)
        files: dict[str, dict[int, Path]] = {}
        for p in sorted(images.iterdir(), key=lambda p: p.name):
            if p.name.startswith(".") or not p.is_file() or not p.name.endswith(end):
                continue
            m = _CHANNEL_FILE.match(p.name[: -len(end)])
            if not m:
                inv.problems.append(
                    f"{self.rel(p)}: not named <CASE>_XXXX{end} (a 4-digit channel suffix)"
                )
                continue
            files.setdefault(m.group(1), {})[int(m.group(2))] = p
        out: dict[str, Case] = {}
        for case, chans in files.items():
            one_file = n > 1 and set(chans) == {0} and end in NATURAL_2D
            if set(chans) != set(range(n)) and not one_file:
                got = ", ".join(f"_{i:04d}" for i in sorted(chans))
                inv.problems.append(
                    f"{self.rel(images)}/{case}_XXXX{end}: channel files {got} but "
                    f"{self.rel(spec.path)} declares {n} channel(s) ({spec.channels_text()})"
                )
                continue
            label = labels / f"{case}{end}"
            image = chans[0] if one_file else chans[want]
            if not label.is_file():
                inv.problems.append(f"{self.rel(image)}: missing mask (no {self.rel(label)})")
                continue
            out[case] = Case(
                case_id=case,
                image=image,
                mask=label,
                inner=want if one_file else None,
                channels=n if one_file else 1,
            )
        for p in sorted(labels.iterdir(), key=lambda p: p.name):
            if p.is_file() and p.name.endswith(end) and p.name[: -len(end)] not in files:
                inv.problems.append(f"{self.rel(p)}: mask without an image (no channel files)")
        if len(files) != spec.num_training:
            inv.problems.append(
                f"{self.rel(spec.path)}: numTraining is {spec.num_training} but "
                f"{self.rel(images)} holds {len(files)} case(s)"
            )
        if not files:
            inv.problems.append(f"{self.rel(images)}: no <CASE>_0000{end} files")
        return out, set(files)

    def _read_sites_csv(self, inv: _io.Inventory, path: Path) -> dict[str, tuple[str, int]] | None:
        """case → (site, line number) from the CSV; ``None`` (with a problem) when unusable."""
        shown = self.rel(path)
        if not path.is_file():
            inv.problems.append(
                f"missing file {path} (option sites_csv; a relative path is relative to root)"
            )
            inv.missing_folder = True
            return None
        self._meta.append(path)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "case" not in cols or "site" not in cols:
                inv.problems.append(
                    f"{shown}: expected a header with columns case,site (got {reader.fieldnames})"
                )
                return None
            out: dict[str, tuple[str, int]] = {}
            for row in reader:
                line = reader.line_num
                case = (row.get(cols["case"]) or "").strip()
                site = (row.get(cols["site"]) or "").strip()
                if not case or not site:
                    inv.problems.append(f"{shown} line {line}: empty case or site")
                elif case in out:
                    inv.problems.append(
                        f"{shown} line {line}: case {case!r} already on line {out[case][1]}"
                    )
                else:
                    out[case] = (site, line)
        if not out:
            inv.problems.append(f"{shown}: no rows (expected one row case,site per case)")
            return None
        return out

    # -- reading one case ----------------------------------------------------------------------

    def decoding(self, mask: Path) -> _io.Decoding:
        spec = self._spec
        assert spec is not None, "scan() first"
        text = ", ".join(f"{i} {n}" for i, n in enumerate(spec.classes))
        return _io.Decoding(
            name="dataset.json",
            description=f"class ids from dataset.json's labels: {text}",
            values=tuple((i, i) for i in sorted(spec.values)),
            expected=spec.values,
        )

    def read_image(self, path: Path) -> tuple[np.ndarray, Any]:
        """The chosen channel of a case as H×W×Z, raw (2-D images: Z = 1); intensities are
        scaled in :meth:`preprocess`, so that `data check` does not pay for it."""
        try:
            arr, spacing = _io.read_file(path, "image")
        except Exception as exc:
            raise DataError(f"{self.name}: cannot read image {path}: {exc}") from exc
        item = self._by_image.get(path)
        inner, channels = (item.inner, item.channels) if item is not None else (None, 1)
        try:
            grid = _grid_of(np.asarray(arr), _io.suffix(path), channels, inner)
        except ChannelMismatch as exc:
            raise DataError(f"{self.name}: image {path}: {exc}") from exc
        return grid, spacing

    def read_mask(self, path: Path) -> np.ndarray:
        try:
            arr, _ = _io.read_file(path, "mask")
            return _grid_of(np.asarray(arr), _io.suffix(path), 1, None)
        except Exception as exc:
            raise DataError(f"{self.name}: cannot read mask {path}: {exc}") from exc

    def _grid(self, image: np.ndarray) -> tuple[int, ...]:
        return tuple(image.shape)

    def _keep(self, label: np.ndarray) -> np.ndarray:
        """The slices (last axis) ``load()`` keeps: all of a 2-D image; of a volume, those with
        foreground unless ``keep_empty``."""
        if self.keep_empty or label.shape[-1] == 1:
            return np.arange(label.shape[-1])
        return np.flatnonzero(label.reshape(-1, label.shape[-1]).any(axis=0))

    def images_in(self, label: np.ndarray) -> int:
        return int(len(self._keep(label)))

    def preprocess(
        self, item: _io.Item, image: np.ndarray, label: np.ndarray, spacing: Any
    ) -> list[_io.Sample]:
        if _io.suffix(item.image) in _io.NIFTI_EXTS or image.shape[-1] > 1:  # a volume
            image = _io.normalize_volume(image, 99.0)
        else:
            image = _io.to_unit(image)
        vol, lab = _io.pad_square(image), _io.pad_square(label)
        return [
            (
                _io.resize_image(vol[None, :, :, z], self.hw),
                _io.resize_label(lab[:, :, z], self.hw),
                int(z),
            )
            for z in self._keep(lab)
        ]

    def load_item(self, item: _io.Item) -> tuple[list[_io.Sample], tuple[float, float] | None]:
        """As the shared loader, with the image's channel chosen and undeclared label values an
        error (the nearest-value decoding would otherwise hide them)."""
        image, spacing = self.read_image(item.image)
        raw = self.read_mask(item.mask)
        if raw.shape != image.shape:
            raise DataError(
                f"{self.name}: mask {item.mask} is {_io._shape(raw.shape)} but its image "
                f"{item.image} is {_io._shape(image.shape)}"
            )
        dec = self.decoding(item.mask)
        n = len(dec.expected or ())
        clean = (
            raw.size == 0
            or (float(raw.min()) >= 0 and float(raw.max()) < n)
            and (np.issubdtype(raw.dtype, np.integer) or bool(np.all(raw == np.round(raw))))
        )
        bad = [] if clean else dec.unexpected(_io.label_values(raw))
        if bad:
            raise DataError(
                f"{self.name}: mask {item.mask} holds label value(s) {bad[:10]} that "
                f"{self._spec.path if self._spec else 'dataset.json'} does not declare "
                f"(expected {dec.expected_text()})"
            )
        label = raw.astype(np.int64)  # the values are the class ids, checked above
        return self.preprocess(item, image, label, spacing), self._spacing(spacing, image.shape)

    def _spacing(self, spacing: Any, shape: tuple[int, ...]) -> tuple[float, float] | None:
        """In-plane spacing of the output: the header's, scaled by the padded side / size."""
        if not spacing or len(spacing) < 2:
            return None
        side = max(shape[0], shape[1])
        return (float(spacing[0]) * side / self.hw[0], float(spacing[1]) * side / self.hw[1])

    def cache_path(self, files: list[Path]) -> Path:
        # dataset.json and the sites CSV decide labels and sites: their change rebuilds the cache
        return super().cache_path([*files, *self._meta])

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        spec = self._spec
        assert spec is not None
        volume = spec.file_ending in _io.NIFTI_EXTS or any(
            max(s.slice_index, default=0) > 0 for s in sites
        )
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=list(spec.classes),
            structures={k: list(v) for k, v in spec.structures.items()},
            case_level="volume" if volume else "image",
            split_fractions=(0.7, 0.1, 0.2),
            source={
                "decoding": self.decoding(spec.path).description,
                "channel": self._channel_text(spec),
                "file_ending": spec.file_ending,
                "sites_csv": self.sites_csv,
                "size": list(self.hw),
            },
        )


def _grid_of(arr: np.ndarray, ext: str, channels: int, inner: int | None) -> np.ndarray:
    """A raw array → H×W×Z of one channel.

    NIfTI: X×Y×Z as stored. 2-D files: H×W, or H×W×C when one file holds ``channels`` > 1
    channels (``inner`` picks one). TIFF: a 3-D array whose last axis is not a channel axis is a
    Z×H×W stack, moved to H×W×Z.
    """
    if ext in _io.NIFTI_EXTS:
        return _io.as_volume(arr)
    if arr.ndim == 3 and arr.shape[-1] <= 4 < arr.shape[0]:  # H×W×C
        if arr.shape[-1] != channels:
            want = f"{channels} channel(s) in one file" if channels > 1 else "one channel a file"
            raise ChannelMismatch(f"the file holds {arr.shape[-1]} channels; expected {want}")
        return arr[..., inner or 0][..., None]
    if channels > 1:
        raise ChannelMismatch(f"the file holds one channel; expected {channels} in one file")
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim == 3 and ext in _io.TIFF_EXTS:
        return np.moveaxis(arr, 0, -1)
    raise ValueError(f"not a 2-D image or a 3-D volume: array of shape {arr.shape}")
