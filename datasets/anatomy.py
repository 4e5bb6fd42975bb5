"""Real anatomy, synthetic sites: real images with real masks that ship offline, made multi-site.

Sources (``reference/data.md`` §1), found at their installed paths (override with ``image_path``
and ``mask_path``):

- ``brain-t1``: Debian ``insighttoolkit5-examples`` (Apache-2.0), ``KmeansTest_T1UCharRaw.nii.gz``
  (128×128×62 T1 MRI) with ``KmeansTest_T1RawSkullStrip.nii.gz`` (brain = > 0).
- ``colin27``: Debian ``mricron-data``, Colin27 ``ch2.nii.gz`` (181×217×181 T1) with
  ``ch2bet.nii.gz`` (brain = > 0).
- ``nuclei``: the ``stardist`` wheel (BSD-3), ``stardist/data/images/img2d.tif`` (512×512 nuclei,
  DSB2018) with ``mask2d.tif`` (instance labels; nucleus = > 0). Read with tifffile; stardist is
  never imported.

Cases are 2-D slices along the volume's last (acquisition) axis with at least 1 % foreground
(MRI; per volume 99th-percentile clip and min–max to [0, 1], zero-padded to a square, resized to
``size``) or non-overlapping ``crop``×``crop`` tiles with at least 1 % foreground (nuclei; resized
to ``size``). The cases are shuffled (``seed``) and dealt into ``sites`` disjoint, near-equal sets;
site k's images then pass through site k's acquisition chain
(:func:`pflbench.datasets.synthetic.site_acquisition` at strength ``appearance_shift``, modality
``mri`` or ``camera``). Labels are untouched: the sites differ in appearance, and in anatomy only
by which slices / tiles they hold.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pflbench.data import DataError, FederatedData, SiteData
from pflbench.dataset import CheckReport, Dataset

from . import _io

#: Smallest foreground fraction of a slice / tile kept as a case.
MIN_FOREGROUND = 0.01

# Random streams (SeedSequence spawn keys), separate from each other.
_STREAM_ASSIGN = 11
_STREAM_ACQ_DESIGN = 2  # the synthetic module's design stream: same seed → same site chains
_STREAM_ACQ_NOISE = 12

_ITK = "/usr/share/doc/insighttoolkit5-examples/examples/Data"
_MRICRON = "/usr/share/mricron/templates"


@dataclass(frozen=True)
class Source:
    package: str
    install: str
    image: str
    mask: str
    modality: str  # "mri" (volume, slices) or "camera" (2-D image, tiles)
    structure: str
    license: str
    decoding: _io.Decoding


SOURCES: dict[str, Source] = {
    "brain-t1": Source(
        package="insighttoolkit5-examples",
        install="apt-get install insighttoolkit5-examples",
        image=f"{_ITK}/KmeansTest_T1UCharRaw.nii.gz",
        mask=f"{_ITK}/KmeansTest_T1RawSkullStrip.nii.gz",
        modality="mri",
        structure="brain",
        license="Apache-2.0",
        decoding=_io.Decoding("skull-strip", "ITK skull-strip mask: >0 brain", threshold=0),
    ),
    "colin27": Source(
        package="mricron-data",
        install="apt-get install mricron-data",
        image=f"{_MRICRON}/ch2.nii.gz",
        mask=f"{_MRICRON}/ch2bet.nii.gz",
        modality="mri",
        structure="brain",
        license="see the package's copyright file, /usr/share/doc/mricron-data/copyright",
        decoding=_io.Decoding("bet", "Colin27 ch2bet (brain-extracted T1): >0 brain", threshold=0),
    ),
    "nuclei": Source(
        package="stardist",
        install="pip install --no-deps stardist",
        image="stardist/data/images/img2d.tif",
        mask="stardist/data/images/mask2d.tif",
        modality="camera",
        structure="nucleus",
        license="BSD-3-Clause",
        decoding=_io.Decoding("instances", "stardist instance labels: >0 nucleus", threshold=0),
    ),
}


def _wheel_file(relative: str) -> Path | None:
    """A file of the installed stardist distribution, located without importing stardist."""
    try:
        dist = importlib.metadata.distribution("stardist")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(relative)))
    return path if path.is_file() else None


class Anatomy(Dataset):
    name: ClassVar[str] = "anatomy"
    description: ClassVar[str] = (
        "Real anatomy, synthetic sites: an offline real image + mask (ITK brain T1, Colin27 T1, "
        "stardist nuclei) cut into slices / tiles, dealt into disjoint sites, each site passed "
        "through its own synthetic acquisition chain"
    )
    expected_tree: ClassVar[str] = """\
source brain-t1 (Debian insighttoolkit5-examples):
  /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz
  /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1RawSkullStrip.nii.gz
source colin27 (Debian mricron-data):
  /usr/share/mricron/templates/ch2.nii.gz
  /usr/share/mricron/templates/ch2bet.nii.gz
source nuclei (pip install --no-deps stardist):
  <site-packages>/stardist/data/images/img2d.tif
  <site-packages>/stardist/data/images/mask2d.tif
(or give image_path and mask_path)"""
    source: ClassVar[str] = (
        "real images with real masks that ship in packages (reference/data.md §1): ITK's example "
        "T1 brain MRI with its skull-strip mask, the Colin27 T1 template with its brain mask, "
        "and stardist's DSB2018 nuclei image with instance labels; the sites are synthetic "
        "acquisition chains over disjoint slices / tiles"
    )
    homepage: ClassVar[str] = "; ".join(
        f"`{k}`: "
        + (
            f"https://pypi.org/project/{s.package}/"
            if s.install.startswith("pip")
            else f"https://packages.debian.org/{s.package}"
        )
        for k, s in SOURCES.items()
    )
    licence: ClassVar[str] = "; ".join(f"`{k}`: {s.license}" for k, s in SOURCES.items())
    access: ClassVar[str] = (
        "; ".join(f"`{k}`: `{s.install}`" for k, s in SOURCES.items())
        + "; the loader finds the files at their installed paths"
    )
    citation: ClassVar[str] = (
        "J. C. Caicedo et al., *Nucleus segmentation across imaging experiments: the 2018 Data "
        "Science Bowl*, Nature Methods 2019 (nuclei); C. J. Holmes et al., J. Comput. Assist. "
        "Tomogr. 1998 (Colin27); the Insight Toolkit (brain-t1)"
    )

    def __init__(
        self,
        *,
        source: str = "brain-t1",
        sites: int = 4,
        size: int = 64,
        appearance_shift: float = 1.0,
        seed: int = 0,
        crop: int = 64,
        image_path: str | None = None,
        mask_path: str | None = None,
    ) -> None:
        self.source = str(source)
        self.sites = sites
        self.size = size
        self.appearance_shift = appearance_shift
        self.seed = seed
        self.crop = crop
        self.image_path = image_path
        self.mask_path = mask_path
        if self.source not in SOURCES:
            raise DataError(
                f"anatomy: option 'source' must be one of {', '.join(SOURCES)}; got {source!r}"
            )
        for opt, lo in (("sites", 1), ("size", 8), ("crop", 8), ("seed", 0)):
            v = getattr(self, opt)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise DataError(f"anatomy: option {opt!r} must be an integer ≥ {lo}; got {v!r}")
        s = self.appearance_shift
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 3:
            raise DataError(f"anatomy: option 'appearance_shift' must be in [0, 3]; got {s!r}")

    # -- files -------------------------------------------------------------------------------

    def paths(self) -> tuple[Path, Path]:
        """The image and mask files; :class:`DataError` naming the package when absent."""
        src = SOURCES[self.source]
        if src.package == "stardist":
            image = Path(self.image_path) if self.image_path else _wheel_file(src.image)
            mask = Path(self.mask_path) if self.mask_path else _wheel_file(src.mask)
        else:
            image = Path(self.image_path or src.image)
            mask = Path(self.mask_path or src.mask)
        missing = [
            str(p) if p is not None else f"<site-packages>/{rel}"
            for p, rel in ((image, src.image), (mask, src.mask))
            if p is None or not p.is_file()
        ]
        if missing:
            raise DataError(
                f"anatomy: source {self.source!r} needs the package {src.package!r} "
                f"({src.install}); missing: {', '.join(missing)}.\n"
                f"Expected files:\n{self.expected_tree}"
            )
        assert image is not None and mask is not None
        return image, mask

    def _read(self, path: Path, kind: _io.Kind) -> np.ndarray:
        try:
            arr, _ = _io.read_file(path, kind)
        except Exception as exc:
            raise DataError(f"anatomy: cannot read {path}: {exc}") from exc
        return np.asarray(arr)

    # -- cases -------------------------------------------------------------------------------

    def cases(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All candidate cases: ids, images N×1×size×size in [0, 1], labels N×size×size."""
        src = SOURCES[self.source]
        image_path, mask_path = self.paths()
        img = self._read(image_path, "image")
        raw = self._read(mask_path, "mask")
        if src.modality == "mri":
            img, raw = _io.as_volume(img), _io.as_volume(raw)
        else:
            img, raw = np.squeeze(img), _io.as_mask2d(raw)
            if img.ndim == 3:  # colour image: luminance
                img = _io.as_image(img, 1)[0]
        if img.shape != raw.shape:
            raise DataError(
                f"anatomy: mask {mask_path} has shape {raw.shape} but image {image_path} has "
                f"{img.shape}"
            )
        img = _io.normalize_volume(img, 99.0)
        lab = src.decoding.decode(raw)
        ids: list[str] = []
        slices: list[tuple[np.ndarray, np.ndarray]] = []
        if src.modality == "mri":
            for z in range(img.shape[-1]):
                ids.append(f"slice{z:03d}")
                slices.append((_io.pad_square(img[:, :, z]), _io.pad_square(lab[:, :, z])))
        else:
            c = int(self.crop)
            for r in range(img.shape[0] // c):
                for q in range(img.shape[1] // c):
                    ids.append(f"tile_r{r}c{q}")
                    win = (slice(r * c, (r + 1) * c), slice(q * c, (q + 1) * c))
                    slices.append((img[win], lab[win]))
        keep = [i for i, (_, la) in enumerate(slices) if la.mean() >= MIN_FOREGROUND]
        images = np.stack([_io.resize_image(slices[i][0][None], self.size) for i in keep])
        labels = np.stack([_io.resize_label(slices[i][1], self.size) for i in keep])
        return [ids[i] for i in keep], images.astype(np.float32), labels

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(int(self.seed), spawn_key=key))

    def load(self) -> FederatedData:
        from pflbench.datasets.synthetic import apply_acquisition, site_acquisition

        src = SOURCES[self.source]
        ids, images, labels = self.cases()
        k_all = int(self.sites)
        if len(ids) < 3 * k_all:
            raise DataError(
                f"anatomy: source {self.source!r} gives {len(ids)} cases at these options; "
                f"{k_all} sites need at least {3 * k_all} (3 per site for the split); "
                f"use at most {len(ids) // 3} sites"
                + (" or a smaller crop" if src.modality == "camera" else "")
            )
        order = self._rng(_STREAM_ASSIGN).permutation(len(ids))
        sites: list[SiteData] = []
        chains: dict[str, Any] = {}
        for k, chunk in enumerate(np.array_split(order, k_all)):
            idx = np.sort(chunk)
            params = site_acquisition(
                k, k_all, float(self.appearance_shift), self._rng(_STREAM_ACQ_DESIGN), src.modality
            )
            shifted = apply_acquisition(images[idx], params, self._rng(_STREAM_ACQ_NOISE, k))
            name = f"site{k + 1}"
            chains[name] = params.to_dict()
            sites.append(
                SiteData(
                    name=name,
                    images=torch.from_numpy(np.ascontiguousarray(shifted, dtype=np.float32)),
                    labels=torch.from_numpy(np.ascontiguousarray(labels[idx])),
                    case_ids=[ids[i] for i in idx],
                )
            )
        image_path, mask_path = self.paths()
        return FederatedData(
            name=f"anatomy-{self.source}",
            sites=sites,
            classes=["background", src.structure],
            structures={src.structure: [1]},
            case_level="image",
            split_fractions=(0.7, 0.1, 0.2),
            source={
                "loader": self.name,
                "source": self.source,
                "package": src.package,
                "license": src.license,
                "image": str(image_path),
                "mask": str(mask_path),
                "decoding": src.decoding.description,
                "options": self.options(),
                "acquisition": chains,
            },
        )

    def check(self) -> CheckReport:
        report = CheckReport(dataset=self.name, root=self.source)
        try:
            data = self.load()
        except DataError as exc:
            report.problems.append(str(exc))
            return report
        for s in data.sites:
            report.sites[s.name] = {
                "cases": len(s.cases),
                "images": len(s),
                "sizes": {"×".join(str(d) for d in s.images.shape[1:]): len(s)},
                "label_values": sorted(int(v) for v in torch.unique(s.labels).tolist()),
            }
        return report
