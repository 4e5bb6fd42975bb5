"""Fed-Fundus: optic disc and cup segmentation, 4 sites (DoFE / FedDG distribution).

Masks decode to classes {0 background, 1 disc rim, 2 cup}; the reported structures are the optic
disc (rim and cup, classes 1 and 2) and the optic cup (class 2). The release's own train / test
folders are kept: test is the official test set, val is carved from the official train set by
case (seeded), see ``FederatedData.predefined_splits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pflbench.data import DataError, FederatedData, SiteData

from . import _io

#: Sites: folder → (source, published train + test images).
SITES: dict[str, tuple[str, int, int]] = {
    "Domain1": ("Drishti-GS", 50, 51),
    "Domain2": ("RIM-ONE-r3", 99, 60),
    "Domain3": ("REFUGE train", 320, 80),
    "Domain4": ("REFUGE val", 320, 80),
}

#: Mask decodings, explicit per source (raw grey value → class id; nearest listed value wins).
ENCODINGS: dict[str, _io.Decoding] = {
    "dofe": _io.Decoding(
        name="dofe",
        description="DoFE/FedDG ROIs: 255 background, 128 disc rim, 0 cup",
        values=((255, 0), (128, 1), (0, 2)),
        expected=frozenset({0, 128, 255}),
    ),
    "refuge": _io.Decoding(
        name="refuge",
        description="REFUGE challenge masks: 255 background, 128 disc rim, 0 cup",
        values=((255, 0), (128, 1), (0, 2)),
        expected=frozenset({0, 128, 255}),
    ),
    "class-ids": _io.Decoding(
        name="class-ids",
        description="class ids stored directly: 0 background, 1 disc rim, 2 cup",
        values=((0, 0), (1, 1), (2, 2)),
        expected=frozenset({0, 1, 2}),
    ),
}


class Fundus(_io.FolderDataset):
    name: ClassVar[str] = "fundus"
    description: ClassVar[str] = (
        "Fed-Fundus: optic disc and cup in colour fundus ROIs, 4 sites (Drishti-GS, RIM-ONE-r3, "
        "REFUGE train, REFUGE val; DoFE layout), official train/test kept, val carved from train"
    )
    expected_tree: ClassVar[str] = """\
<root>/                      (the Fundus folder itself, or a folder holding Fundus/)
  Domain1/                   Drishti-GS   50 train + 51 test
    train/ROIs/image/<name>.png
    train/ROIs/mask/<name>.png      (same name; 255 background, 128 disc rim, 0 cup)
    test/ROIs/image/<name>.png
    test/ROIs/mask/<name>.png
  Domain2/ ...               RIM-ONE-r3   99 train + 60 test
  Domain3/ ...               REFUGE train 320 train + 80 test
  Domain4/ ...               REFUGE val   320 train + 80 test"""
    channels: ClassVar[int] = 3
    source: ClassVar[str] = (
        "colour fundus regions of interest with optic disc and cup masks from four public sets "
        "(Drishti-GS, RIM-ONE-r3, REFUGE train, REFUGE val) as prepared for DoFE and used by FedDG"
    )
    homepage: ClassVar[str] = "https://github.com/emma-sjwang/Dofe"
    access: ClassVar[str] = (
        "download the fundus collection linked from the DoFE repository; it unpacks to "
        "`Fundus/Domain1..4`"
    )
    citation: ClassVar[str] = (
        "S. Wang, L. Yu, K. Li, X. Yang, C.-W. Fu, P.-A. Heng, *DoFE: Domain-oriented Feature "
        "Embedding for Generalizable Fundus Image Segmentation on Unseen Datasets*, IEEE TMI "
        "2020; and the four source sets (Drishti-GS, RIM-ONE-r3, REFUGE)"
    )

    def __init__(
        self,
        *,
        root: str,
        size: int | list[int] = 256,
        encoding: str = "dofe",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)
        self.encoding = str(encoding)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        if self.encoding not in ENCODINGS:
            raise DataError(
                f"{self.name}: unknown encoding {encoding!r}; choose one of "
                + ", ".join(f"{k} ({v.description})" for k, v in ENCODINGS.items())
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"{self.name}: val_fraction must be in [0, 1) (got {val_fraction})")

    def root_path(self) -> Path:
        root = super().root_path()
        nested = root / "Fundus"
        if not (root / "Domain1").is_dir() and nested.is_dir():
            return nested
        return root

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        for site in self.sites if self.sites is not None else list(SITES):
            folder = _io.find_child(root, [site])
            if folder is None:
                self.missing(inv, root / site)
                continue
            counts = {}
            for group in ("train", "test"):
                rois = _io.find_child(_io.find_child(folder, [group]), ["ROIs"])
                img_dir = _io.find_child(rois, ["image", "images"])
                mask_dir = _io.find_child(rois, ["mask", "masks"])
                want = (folder / group / "ROIs" / "image", folder / group / "ROIs" / "mask")
                counts[group] = self.add_pairs(inv, site, img_dir, mask_dir, want, group)
            info = {"train": counts["train"], "test": counts["test"]}
            if site in SITES:
                src, n_train, n_test = SITES[site]
                info["source"] = src
                info["published"] = f"{n_train}+{n_test}"
            inv.info[site] = info
        return inv

    def decoding(self, mask: Path) -> _io.Decoding:
        return ENCODINGS[self.encoding]

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        splits = _io.official_splits(
            inv, [s.name for s in sites], self.val_fraction, self.split_seed
        )
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=["background", "disc", "cup"],
            structures={"disc": [1, 2], "cup": [2]},
            case_level="image",
            predefined_splits=splits,
            source={
                "encoding": self.encoding,
                "decoding": ENCODINGS[self.encoding].description,
                "val_fraction": self.val_fraction,
                "split_seed": self.split_seed,
            },
        )
