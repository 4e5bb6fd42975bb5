"""How long `pflbench data check` and a first load take per dataset (a measurement script, not a
test); its JSON feeds the timing lines of docs/datasets.md.

    python tests/benchmarks/dataset_timing.py [--write docs/dataset-timings.json]

No real dataset is on this machine, so each folder loader is timed on a fixture tree written in
its real layout and file format at a realistic file size (``TREES`` says which: e.g. prostate
volumes of 384×384×24 int16, the SAML in-plane size) with the loader's default options. Per
dataset it times ``check()`` (reads every file, as `data check` does), a first ``load()`` (read,
preprocess, write the cache) and a second ``load()`` (from the cache), each once, and reports
seconds per case: the number to scale by a real dataset's case count. ``synthetic`` and
``anatomy`` are timed on ``load()`` with their defaults (anatomy where its source is installed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fixtures_data as fx  # noqa: E402

from pflbench.registry import get_dataset  # noqa: E402

VOLUME = (384, 384, 24)
FG = tuple(range(4, 20))

#: dataset → (what the tree holds, builder(root) → (tree, extra loader options)).
TREES: dict[str, tuple[str, Callable[[Path], tuple[fx.Tree, dict[str, Any]]]]] = {
    "prostate": (
        "12 cases (2 per site) of 384×384×24 int16 .nii.gz, 16 foreground slices each",
        lambda r: (
            fx.make_prostate_tree(
                r, {s: 2 for s in ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")}, VOLUME, FG
            ),
            {},
        ),
    ),
    "fundus": (
        "12 images (2 train + 1 test per domain), 512×512 RGB .png",
        lambda r: (fx.make_fundus_tree(r, {f"Domain{k}": (2, 1) for k in range(1, 5)}, 512), {}),
    ),
    "polyp": (
        "10 images (2 per site, 5 sites), 480×576 RGB .png",
        lambda r: (
            fx.make_polyp_tree(
                r,
                {s: 2 for s in ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "EndoTect", "ETIS")},
                size=(480, 576),
            ),
            {},
        ),
    ),
    "vessel": (
        "12 images (1 train + 1 test per site), 584×565 RGB, DRIVE's .tif/.gif and .png",
        lambda r: (fx.make_vessel_tree(r, {s: (1, 1) for s in fx.VESSEL_SITES}, (584, 565)), {}),
    ),
    "gland": (
        "8 images (4 per site), 384×768 RGB .JPG/.png with .png masks",
        lambda r: (fx.make_gland_tree(r, {"MGD-1K": 4, "CAMG": 4}, (384, 768)), {}),
    ),
    "nnunet": (
        "12 cases (6 per site, sites from sites.csv) of 384×384×24 int16 .nii.gz",
        lambda r: (
            fx.make_nnunet_tree(r, {"A": 6, "B": 6}, shape=VOLUME, fg_slices=FG),
            {"sites_csv": "sites.csv"},
        ),
    ),
}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_folder_loader(name: str, tmp: Path) -> dict[str, Any]:
    what, build = TREES[name]
    tree, options = build(tmp / name)
    cls = get_dataset(name)
    opts = {"root": str(tree.root), "cache_dir": str(tmp / "cache"), **options}
    check_s, report = _timed(lambda: cls(**opts).check())
    assert report.ok, report.problems
    load_s, data = _timed(lambda: cls(**opts).load())
    cached_s, _ = _timed(lambda: cls(**opts).load())
    cases = sum(len(c) for c in tree.cases.values())
    return {
        "tree": what,
        "cases": cases,
        "images": sum(len(s) for s in data.sites),
        "check_s": round(check_s, 2),
        "load_s": round(load_s, 2),
        "cached_load_s": round(cached_s, 2),
        "check_ms_per_case": round(1000 * check_s / cases),
        "load_ms_per_case": round(1000 * load_s / cases),
    }


def time_generated(name: str, options: dict[str, Any]) -> dict[str, Any]:
    cls = get_dataset(name)
    try:
        load_s, data = _timed(lambda: cls(**options).load())
    except Exception as exc:  # anatomy without its source installed
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {
        "options": options,
        "images": sum(len(s) for s in data.sites),
        "load_s": round(load_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="write the JSON here (docs/dataset-timings.json)")
    ap.add_argument("--only", nargs="*", help="datasets to time (default: all)")
    args = ap.parse_args(argv)
    only = set(args.only or [*TREES, "synthetic", "anatomy"])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PFLBENCH_CACHE"] = str(Path(tmp) / "cache")
        for name in TREES:
            if name in only:
                results[name] = time_folder_loader(name, Path(tmp))
                print(name, results[name], flush=True)
    for name, opts in (("synthetic", {}), ("anatomy", {"source": "nuclei"})):
        if name in only:
            results[name] = time_generated(name, opts)
            print(name, results[name], flush=True)
    doc = {
        "command": "python tests/benchmarks/dataset_timing.py --write docs/dataset-timings.json",
        "measured": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f} at the end",
        "datasets": results,
    }
    if args.write:
        old = json.loads(args.write.read_text()) if args.write.is_file() else {}
        if args.only and old:  # a partial run updates its datasets only
            doc["datasets"] = {**old.get("datasets", {}), **results}
        args.write.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
