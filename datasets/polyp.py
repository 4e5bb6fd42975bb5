"""Fed-Polyp: polyp segmentation in colonoscopy frames, 5 sites (FL-MedSegBench) or 4 sites.

Common layout ``<site>/{images,masks}/<name>.png|jpg|tif`` with the mask named like its image.
Masks are binary: JPEG masks (lossy) are thresholded at 128 (≥ 128 → polyp), lossless masks
(PNG/TIF/BMP/...) take > 0 → polyp. A case is an image; the split is 70/10/20 by image.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pflbench.data import DataError, FederatedData, SiteData

from . import _io

#: Layouts: site → (accepted folder names, first = canonical; published image count).
LAYOUTS: dict[str, dict[str, tuple[list[str], int]]] = {
    "flmedsegbench5": {
        "CVC-300": (["CVC-300", "CVC300", "EndoScene"], 60),
        "CVC-ClinicDB": (["CVC-ClinicDB", "ClinicDB", "CVC-612"], 612),
        "CVC-ColonDB": (["CVC-ColonDB", "ColonDB"], 380),
        "EndoTect": (["EndoTect", "EndoTect2020"], 200),
        "ETIS-LaribPolypDB": (["ETIS-LaribPolypDB", "ETIS"], 196),
    },
    "4site": {
        "Kvasir": (["Kvasir", "Kvasir-SEG"], 1000),
        "ETIS": (["ETIS", "ETIS-LaribPolypDB"], 196),
        "ColonDB": (["ColonDB", "CVC-ColonDB"], 380),
        "ClinicDB": (["ClinicDB", "CVC-ClinicDB", "CVC-612"], 612),
    },
}

#: Mask decodings, explicit per source format.
LOSSLESS = _io.Decoding(
    name="binary",
    description="lossless binary masks (PNG/TIF/BMP/...): >0 polyp (0/255 or 0/1)",
    threshold=0,
    expected=frozenset({0, 1, 255}),
)
JPEG = _io.Decoding(
    name="jpeg",
    description="JPEG masks: thresholded at 128 (>=128 polyp)",
    threshold=127,
)


class Polyp(_io.FolderDataset):
    name: ClassVar[str] = "polyp"
    description: ClassVar[str] = (
        "Fed-Polyp: polyps in colonoscopy frames, 5 sites (FL-MedSegBench: CVC-300, CVC-ClinicDB, "
        "CVC-ColonDB, EndoTect, ETIS-LaribPolypDB) or 4 sites (Kvasir, ETIS, ColonDB, ClinicDB)"
    )
    expected_tree: ClassVar[str] = """\
<root>/
  <site>/images/<name>.png|jpg|tif
  <site>/masks/<name>.png|jpg|tif     (same name as the image; JPEG masks thresholded at 128)
sites, layout flmedsegbench5: CVC-300 (60), CVC-ClinicDB (612), CVC-ColonDB (380),
                              EndoTect (200), ETIS-LaribPolypDB (196)
sites, layout 4site:          Kvasir (1000), ETIS (196), ColonDB (380), ClinicDB (612)"""
    channels: ClassVar[int] = 3

    source: ClassVar[str] = (
        "colonoscopy frames with polyp masks from public sets: FL-MedSegBench's Fed-Polyp pools "
        "CVC-300 (EndoScene), CVC-ClinicDB, CVC-ColonDB, EndoTect 2020 and ETIS-LaribPolypDB as "
        "five clients; the 4-site layout takes Kvasir-SEG, ETIS, CVC-ColonDB and CVC-ClinicDB"
    )
    homepage: ClassVar[str] = (
        "https://github.com/meiluzhu/FL-MedSegBench (docs/datasets/Fed-Polyp.md); Kvasir-SEG: "
        "https://datasets.simula.no/kvasir-seg/"
    )
    licence: ClassVar[str] = "see the project page of each source set"
    access: ClassVar[str] = (
        "FL-MedSegBench's Fed-Polyp page links a download of its five-client collection; for "
        "the 4-site layout get each set from its own release and arrange `<site>/{images,masks}`"
    )
    citation: ClassVar[str] = (
        f"{_io.FL_MEDSEGBENCH}; Vázquez et al., J. Healthc. Eng. 2017 (CVC-300); Bernal et al., Comput. Med. "
        "Imaging Graph. 2015 (CVC-ClinicDB); Bernal et al., Pattern Recognit. 2012 "
        "(CVC-ColonDB); Hicks et al., ICPR 2021 (EndoTect); Silva et al., IJCARS 2014 "
        "(ETIS-LaribPolypDB); Jha et al., MMM 2020 (Kvasir-SEG)"
    )

    def __init__(
        self,
        *,
        root: str,
        size: int | list[int] = 256,
        layout: str = "flmedsegbench5",
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)
        self.layout = str(layout)
        if self.layout not in LAYOUTS:
            raise DataError(
                f"{self.name}: unknown layout {layout!r}; choose one of {list(LAYOUTS)}"
            )

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        known = LAYOUTS[self.layout]
        for site in self.sites if self.sites is not None else list(known):
            names, published = known.get(site, ([site], 0))
            folder = _io.find_child(root, names)
            if folder is None:
                self.missing(inv, root / site)
                continue
            n = self.add_pairs(
                inv,
                site,
                _io.find_child(folder, ["images", "image"]),
                _io.find_child(folder, ["masks", "mask"]),
                expected=(folder / "images", folder / "masks"),
            )
            info: dict[str, object] = {"folder": folder.name, "paired": n}
            if published:
                info["published"] = published
            inv.info[site] = info
        return inv

    def decoding(self, mask: Path) -> _io.Decoding:
        return JPEG if _io.suffix(mask) in _io.LOSSY_EXTS else LOSSLESS

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=["background", "polyp"],
            structures={"polyp": [1]},
            case_level="image",
            split_fractions=(0.7, 0.1, 0.2),
            source={
                "layout": self.layout,
                "decoding": {"lossless": LOSSLESS.description, "jpeg": JPEG.description},
            },
        )
