"""Fed-Vessel: retinal vessel segmentation, 6 sites, in the target paper's benchmark layout.

``<site>/{Train,Test}/Original/{Images,Labels}/<name>``; labels are vessel where the grey value is
> 100; images and labels are resized to ``size``×``size`` (256). The official Train set is split
80/20 into train / val by case (seeded), the official Test set is the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pflbench.data import DataError, FederatedData, SiteData

from . import _io

#: Sites: canonical folder name → accepted folder names.
SITES: dict[str, list[str]] = {
    "ChaseDB": ["ChaseDB", "CHASEDB1", "CHASE_DB1", "CHASE-DB1", "CHASE"],
    "DR-Hagis": ["DR-Hagis", "DRHagis", "DR_HAGIS", "DR-HAGIS"],
    "DRIVE": ["DRIVE"],
    "HRF": ["HRF"],
    "LES-AV": ["LES-AV", "LESAV", "LES_AV"],
    "ORVS": ["ORVS"],
}

#: Label decodings, explicit per source format: vessel where the grey value is > 100.
LOSSLESS = _io.Decoding(
    name="vessel",
    description="vessel labels: >100 vessel (clean files hold 0/255)",
    threshold=100,
    expected=frozenset({0, 255}),
)
JPEG = _io.Decoding(
    name="vessel-jpeg",
    description="JPEG vessel labels: >100 vessel (lossy, any grey value)",
    threshold=100,
)


class Vessel(_io.FolderDataset):
    name: ClassVar[str] = "vessel"
    description: ClassVar[str] = (
        "Fed-Vessel: retinal vessels in colour fundus photographs, 6 sites (ChaseDB, DR-Hagis, "
        "DRIVE, HRF, LES-AV, ORVS), official Train split 80/20 into train/val, official Test"
    )
    expected_tree: ClassVar[str] = """\
<root>/
  ChaseDB/ DR-Hagis/ DRIVE/ HRF/ LES-AV/ ORVS/      (one folder per site)
    Train/Original/Images/<name>.png|jpg|tif|gif
    Train/Original/Labels/<name>.png|jpg|tif|gif    (same name, or name + _manual1 / _1stHO ...)
    Test/Original/Images/<name>
    Test/Original/Labels/<name>
labels: grey value > 100 is vessel"""
    channels: ClassVar[int] = 3
    source: ClassVar[str] = (
        "retinal vessel masks of six public fundus sets (CHASE_DB1, DR HAGIS, DRIVE, HRF, "
        "LES-AV, ORVS) in the layout of FL-MedSegBench's Fed-Vessel task, pFL-ResFIM's vessel task"
    )
    homepage: ClassVar[str] = (
        "https://github.com/meiluzhu/FL-MedSegBench (docs/datasets/Fed-Vessel.md); DRIVE: "
        "https://drive.grand-challenge.org/; HRF: https://www5.cs.fau.de/research/data/fundus-images/"
    )
    licence: ClassVar[str] = (
        "see the project page of each source set (FL-MedSegBench's Fed-Vessel page carried "
        "template text, not these data's terms, when read)"
    )
    access: ClassVar[str] = (
        "FL-MedSegBench's Fed-Vessel page had no download link when read: get each set from its "
        "own release and arrange `<site>/{Train,Test}/Original/{Images,Labels}` with the set's "
        "official train / test split"
    )
    citation: ClassVar[str] = (
        f"{_io.FL_MEDSEGBENCH}; Staal et al., IEEE TMI 2004 (DRIVE); Fraz et al., IEEE TBME 2012 "
        "(CHASE_DB1); Budai et al., Int. J. Biomed. Imaging 2013 (HRF); Holm et al., J. Med. "
        "Imaging 2017 (DR HAGIS); Orlando et al., MICCAI OMIA 2018 (LES-AV); ORVS: see "
        "FL-MedSegBench"
    )

    def __init__(
        self,
        *,
        root: str,
        size: int | list[int] = 256,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"{self.name}: val_fraction must be in [0, 1) (got {val_fraction})")

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        for site in self.sites if self.sites is not None else list(SITES):
            folder = _io.find_child(root, SITES.get(site, [site]))
            if folder is None:
                self.missing(inv, root / site)
                continue
            counts = {}
            for group, folder_name in (("train", "Train"), ("test", "Test")):
                orig = _io.find_child(_io.find_child(folder, [folder_name]), ["Original"])
                want = folder / folder_name / "Original"
                counts[group] = self.add_pairs(
                    inv,
                    site,
                    _io.find_child(orig, ["Images"]),
                    _io.find_child(orig, ["Labels"]),
                    (want / "Images", want / "Labels"),
                    group,
                )
            inv.info[site] = {
                "folder": folder.name,
                "train": counts["train"],
                "test": counts["test"],
            }
        return inv

    def decoding(self, mask: Path) -> _io.Decoding:
        return JPEG if _io.suffix(mask) in _io.LOSSY_EXTS else LOSSLESS

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=["background", "vessel"],
            structures={"vessel": [1]},
            case_level="image",
            predefined_splits=_io.official_splits(
                inv, [s.name for s in sites], self.val_fraction, self.split_seed
            ),
            source={
                "decoding": {"lossless": LOSSLESS.description, "jpeg": JPEG.description},
                "val_fraction": self.val_fraction,
                "split_seed": self.split_seed,
            },
        )
