"""Fed-Prostate: 6 sites of T2 prostate MRI in the SAML / MS-Net distribution.

Preprocessing as in the target paper's benchmark: per volume clip at the 99th percentile and
min–max to [0, 1]; centre crop (or zero-pad) in-plane to ``crop``×``crop`` (256: the volumes are
384×384), then resize to ``size``; 2-D slices along the volume's last (acquisition) axis, keeping
slices with foreground unless ``keep_empty``; labels > 0 → 1 (some files hold 2). A case is a
volume (patient); the split is 70/10/20 by patient.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pflbench.data import DataError, FederatedData, SiteData

from . import _io

#: Sites and their published cases (SAML release).
SITES: dict[str, list[str]] = {
    "RUNMC": [f"Case{i:02d}" for i in range(30)],
    "BMC": [f"Case{i:02d}" for i in range(30)],
    "I2CVB": [f"Case{i:02d}" for i in range(19)],
    "UCL": ["Case01"] + [f"Case{i:02d}" for i in range(26, 38)],
    "BIDMC": [f"Case{i:02d}" for i in range(13) if i != 2],
    "HK": [f"Case{i:02d}" for i in range(38, 50)],
}

#: Masks: background 0, prostate > 0 (some releases mark zones with 2).
DECODING = _io.Decoding(
    name="saml",
    description="SAML/MS-Net prostate: 0 background, >0 prostate (1, some files 2)",
    threshold=0,
    expected=frozenset({0, 1, 2}),
)

_VOLUME = re.compile(r"^(case\d+)(_segmentation)?\.nii(\.gz)?$", re.IGNORECASE)


class Prostate(_io.FolderDataset):
    name: ClassVar[str] = "prostate"
    description: ClassVar[str] = (
        "Fed-Prostate: T2 prostate MRI from 6 sites (RUNMC, BMC, I2CVB, UCL, BIDMC, HK; SAML "
        "layout), 2-D axial slices, binary prostate masks, split 70/10/20 by patient"
    )
    expected_tree: ClassVar[str] = """\
<root>/
  RUNMC/  Case00.nii.gz, Case00_segmentation.nii.gz, ... Case29   (30 cases)
  BMC/    Case00.nii.gz, Case00_segmentation.nii.gz, ... Case29   (30 cases)
  I2CVB/  Case00 ... Case18                                       (19 cases)
  UCL/    Case01, Case26 ... Case37                               (13 cases)
  BIDMC/  Case00 ... Case12 without Case02                        (12 cases)
  HK/     Case38 ... Case49                                       (12 cases)
(mask names: CaseNN_segmentation.nii.gz or CaseNN_Segmentation.nii.gz; .nii also accepted)"""
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True
    source: ClassVar[str] = (
        "T2 prostate MRI of six sites as collected for SAML and MS-Net: RUNMC and BMC from "
        "NCI-ISBI 2013, I2CVB, and UCL, BIDMC and HK from PROMISE12, re-released with masks"
    )
    homepage: ClassVar[str] = (
        "https://github.com/liuquande/SAML (SAML's paper: code and dataset are available there)"
    )
    licence: ClassVar[str] = (
        "see the project page (the cases come from NCI-ISBI 2013, I2CVB and PROMISE12, whose "
        "own terms apply)"
    )
    access: ClassVar[str] = (
        "download the preprocessed six-site collection linked from the project page; each site "
        "is a folder of `CaseNN.nii.gz` volumes with their masks"
    )
    citation: ClassVar[str] = (
        "Q. Liu, Q. Dou, P.-A. Heng, *Shape-aware Meta-learning for Generalizing Prostate MRI "
        "Segmentation to Unseen Domains*, MICCAI 2020; Q. Liu, Q. Dou, L. Yu, P.-A. Heng, "
        "*MS-Net: Multi-Site Network for Improving Prostate Segmentation with Heterogeneous MRI "
        "Data*, IEEE TMI 2020"
    )

    def __init__(
        self,
        *,
        root: str,
        size: int = 256,
        crop: int = 256,
        keep_empty: bool = False,
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)
        self.crop = int(crop)
        self.keep_empty = bool(keep_empty)
        if not isinstance(self.size, int):
            raise DataError(
                f"{self.name}: option size must be one integer (slices are centre-cropped square "
                f"to crop×crop), got {size!r}"
            )
        if self.crop < 1:
            raise DataError(f"{self.name}: crop must be positive (got {crop})")

    def site_names(self) -> list[str]:
        return self.sites if self.sites is not None else list(SITES)

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        for site in self.site_names():
            folder = _io.find_child(root, [site])
            if folder is None:
                self.missing(inv, root / site)
                continue
            images: dict[str, Path] = {}
            masks: dict[str, Path] = {}
            ignored = 0
            for p in sorted(folder.iterdir(), key=lambda p: p.name):
                m = _VOLUME.match(p.name)
                if not m or not p.is_file():
                    ignored += not p.name.startswith(".")
                    continue
                case = "Case" + m.group(1)[4:]
                target = masks if m.group(2) else images
                if case in target:
                    inv.problems.append(
                        f"{self.rel(p)}: duplicate of {self.rel(target[case])} (same case)"
                    )
                    continue
                target[case] = p
            items = []
            for case, img in images.items():
                if case not in masks:
                    inv.problems.append(
                        f"{self.rel(img)}: missing mask ({case}_segmentation.nii.gz not in "
                        f"{self.rel(folder)})"
                    )
                    continue
                items.append(_io.Item(case_id=case, image=img, mask=masks[case]))
            for case, m in masks.items():
                if case not in images:
                    inv.problems.append(f"{self.rel(m)}: mask without an image ({case}.nii.gz)")
            if not images:
                inv.problems.append(f"{self.rel(folder)}: no CaseNN.nii.gz volumes")
            inv.sites[site] = items
            info: dict[str, Any] = {}
            if site in SITES:
                info["published"] = len(SITES[site])
            if ignored:
                info["ignored files"] = ignored
            inv.info[site] = info
        return inv

    def decoding(self, mask: Path) -> _io.Decoding:
        return DECODING

    def pixel_spacing(self, spacing: tuple[float, ...] | None) -> tuple[float, float] | None:
        if not spacing or len(spacing) < 2:
            return None
        scale = self.crop / self.size
        return (float(spacing[0]) * scale, float(spacing[1]) * scale)

    def _keep(self, label: np.ndarray) -> np.ndarray:
        """Indices of the slices (last axis) that ``load()`` keeps, given the cropped label."""
        if self.keep_empty:
            return np.arange(label.shape[-1])
        return np.flatnonzero(label.reshape(-1, label.shape[-1]).any(axis=0))

    def images_in(self, label: np.ndarray) -> int:
        return int(len(self._keep(_io.crop_or_pad(label, self.crop))))

    def preprocess(
        self,
        item: _io.Item,
        image: np.ndarray,
        label: np.ndarray,
        spacing: tuple[float, ...] | None,
    ) -> list[_io.Sample]:
        vol = _io.crop_or_pad(_io.normalize_volume(image, 99.0), self.crop)
        lab = _io.crop_or_pad(label, self.crop)
        out: list[_io.Sample] = []
        for z in self._keep(lab):
            img = _io.resize_image(vol[None, :, :, z], self.size)
            out.append((img, _io.resize_label(lab[:, :, z], self.size), int(z)))
        return out

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=["background", "prostate"],
            structures={"prostate": [1]},
            case_level="volume",
            split_fractions=(0.7, 0.1, 0.2),
            source={"decoding": DECODING.description, "crop": self.crop, "size": self.size},
        )
