"""Meibomian gland segmentation in infrared meibography, 2 sites: MGD-1K and CAMG.

The layout FL-MedSegBench reads (its ``Meibomian_Gland`` task, the third task of pFL-ResFIM)::

    <root>/MGD1k/Subset/Original/<name>.JPG|jpg      masks: MGD1k/Subset/Meibomian_Gland_Labels/<name>.png
    <root>/CAMG/Original/<...Image...>.<ext>          masks: CAMG/Meibomian_Gland_Labels/<...Seg...>.<ext>

Each mask sits at its image's path with ``Original`` replaced by ``Meibomian_Gland_Labels``;
MGD-1K masks are PNG whatever the image's extension (one release mask is a ``.tif``: any
supported extension is accepted), CAMG mask names replace ``Image`` with ``Seg``. Masks are read
as grey and a gland is a grey value > 100. Images are RGB /255, resized to ``size`` = [H, W]
(192×384 by default, the benchmark's input); the split is 70/10/20 by image, seeded.

Sites are named MGD-1K and CAMG. pFL-ResFIM's results table (as extracted) calls the second site
"LFSC"; whether that is CAMG is unresolved, so this loader does not rename it.

Deviations from the benchmark's loader, both deliberate: images are resized bilinearly with
anti-aliasing (the benchmark uses nearest for images too; masks are nearest in both), and the
split seed is the dataset's ``split_seed`` rather than the run seed, so every seed of a run sees
one split (the benchmark reseeds its split with each run seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pflbench.data import FederatedData, SiteData

from . import _io

#: Sites: canonical name → (accepted folder names, sub-folders tried in order under the site).
SITES: dict[str, tuple[list[str], list[list[str]]]] = {
    "MGD-1K": (["MGD1k", "MGD-1K", "MGD1K", "MGD_1K"], [["Subset"], []]),
    "CAMG": (["CAMG"], [[]]),
}
IMAGES, LABELS = "Original", "Meibomian_Gland_Labels"

LOSSLESS = _io.Decoding(
    name="gland",
    description="gland masks: grey > 100 is gland (clean files hold 0/255)",
    threshold=100,
    expected=frozenset({0, 255}),
)
JPEG = _io.Decoding(
    name="gland-jpeg",
    description="JPEG gland masks: grey > 100 is gland (lossy, any grey value)",
    threshold=100,
)


def camg_mask_stem(image_stem: str) -> str:
    """CAMG names a mask after its image with ``Image`` replaced by ``Seg``."""
    return image_stem.replace("Image", "Seg")


class Gland(_io.FolderDataset):
    name: ClassVar[str] = "gland"
    description: ClassVar[str] = (
        "Meibomian glands in infrared meibography, 2 sites (MGD-1K, CAMG) in FL-MedSegBench's "
        "layout; split 70/10/20 by image; input 192×384"
    )
    expected_tree: ClassVar[str] = """\
<root>/
  MGD1k/Subset/Original/<name>.JPG|jpg|png
  MGD1k/Subset/Meibomian_Gland_Labels/<name>.png     (same name; .tif accepted)
  CAMG/Original/<...Image...>.png|jpg|tif
  CAMG/Meibomian_Gland_Labels/<...Seg...>.png        (the image's name, Image -> Seg)
labels: grey value > 100 is gland"""
    channels: ClassVar[int] = 3
    source: ClassVar[str] = (
        "infrared meibography with Meibomian gland masks from two sets, MGD-1K (1,000 images) "
        "and CAMG, in the layout of FL-MedSegBench's Meibomian gland task (Fed-MG), pFL-ResFIM's "
        "gland task"
    )
    homepage: ClassVar[str] = (
        "https://github.com/meiluzhu/FL-MedSegBench (docs/datasets/Fed-MG.md, a placeholder "
        "page when read)"
    )
    licence: ClassVar[str] = (
        "see the project page (none stated when read: FL-MedSegBench's Fed-MG page carried "
        "template text)"
    )
    access: ClassVar[str] = (
        "not stated publicly when read: obtain MGD-1K and CAMG from their releases or authors "
        "and arrange them as below"
    )
    citation: ClassVar[str] = (
        f"{_io.FL_MEDSEGBENCH}; M. Zhu et al., pFL-ResFIM, ISBI 2026 (arXiv 2603.14848); the MGD-1K and "
        "CAMG releases"
    )

    def __init__(
        self,
        *,
        root: str,
        size: int | list[int] | tuple[int, int] = (192, 384),
        sites: list[str] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        self._common_options(root, size, sites, cache_dir, cache)

    def scan(self, root: Path) -> _io.Inventory:
        inv = _io.Inventory(root=root)
        for site in self.sites if self.sites is not None else list(SITES):
            names, nestings = SITES.get(site, ([site], [[]]))
            folder = _io.find_child(root, names)
            if folder is None:
                self.missing(inv, root / names[0])
                continue
            base = folder
            for nesting in nestings:  # MGD1k/Subset/Original, or MGD1k/Original
                cand = folder
                for part in nesting:
                    cand = _io.find_child(cand, [part])
                if _io.find_child(cand, [IMAGES]) is not None:
                    base = cand
                    break
            want = (folder / "/".join(nestings[0])) if nestings[0] else folder
            n = self.add_pairs(
                inv,
                site,
                _io.find_child(base, [IMAGES]),
                _io.find_child(base, [LABELS]),
                (want / IMAGES, want / LABELS),
                mask_stem=camg_mask_stem if site == "CAMG" else None,
            )
            inv.info[site] = {"folder": base.relative_to(root).as_posix(), "pairs": n}
        return inv

    def decoding(self, mask: Path) -> _io.Decoding:
        return JPEG if _io.suffix(mask) in _io.LOSSY_EXTS else LOSSLESS

    def federate(self, inv: _io.Inventory, sites: list[SiteData]) -> FederatedData:
        return FederatedData(
            name=self.name,
            sites=sites,
            classes=["background", "gland"],
            structures={"gland": [1]},
            case_level="image",
            split_fractions=(0.7, 0.1, 0.2),
            source={
                "decoding": {"lossless": LOSSLESS.description, "jpeg": JPEG.description},
                "size": list(self.hw),
            },
        )
