"""Tidy results on disk: the only thing reports, statistics and the regression gate read.

Layout of one finished run (``<out>/results/<run_key>/``)::

    rounds.parquet   one row per round × client × split × structure × metric (evaluation rounds)
                     columns: round, client, split, structure, metric, value
                     structure "mean" is the mean over structures; metrics: dice, iou, loss
    comm.parquet     one row per round × client: round, client, bytes_up, bytes_down, sampled
    cases.parquet    one row per selection × client × split × case × structure
                     columns: selection ("best" | "last"), round, client, split, case_id,
                              structure, dice, iou, hd95, assd, surface_failure
    manifest.json    the run's configuration and provenance (run_key, dataset, method, params,
                     seed, label, protocol, model, data fingerprint, git, versions, threads,
                     device, timings, peak memory, budget, bytes, partition sizes of the
                     method's base partition and of each client's own)
    DONE             written last; a folder without it is an unfinished run and is ignored

The run columns (run_key, dataset, method, label, seed) are added when tables are read back with
:func:`load_results`, so files stay small and the manifest stays the one source of them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

TABLES = ("rounds", "comm", "cases")
RUN_COLUMNS = ("run_key", "dataset", "method", "label", "seed")


@dataclass
class RunRecords:
    """The tables of one run before they are written."""

    rounds: pd.DataFrame
    comm: pd.DataFrame
    cases: pd.DataFrame
    manifest: dict[str, Any]


def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def is_done(out: str | Path, run_key: str) -> bool:
    return (results_dir(out) / run_key / "DONE").exists()


def write_run(out: str | Path, run_key: str, records: RunRecords) -> Path:
    """Write a run atomically: everything goes to a temporary folder renamed into place, DONE last.

    A crash at any point leaves either no folder or a complete one; a half-written temporary folder
    is ignored by readers and cleaned up by the next write of the same run.
    """
    base = results_dir(out)
    base.mkdir(parents=True, exist_ok=True)
    final = base / run_key
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_key}.", dir=base))
    try:
        for name in TABLES:
            getattr(records, name).to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "manifest.json").write_text(json.dumps(records.manifest, indent=2, default=str))
        if final.exists():  # an unfinished earlier attempt (no DONE): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        done_tmp = final / ".DONE.tmp"
        done_tmp.write_text(records.manifest.get("finished_at", ""))
        os.replace(done_tmp, final / "DONE")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(out: str | Path, run_key: str) -> dict[str, Any]:
    return json.loads((results_dir(out) / run_key / "manifest.json").read_text())


def write_alias(out: str | Path, run_key: str, alias_key: str, **updates: Any) -> Path:
    """A finished run again under ``alias_key`` with its manifest updated (label, trial, …).

    For a tuned configuration that equals the default one: the same configuration and seed give
    the same bits, so the run is copied, not repeated, and each label keeps its own rows.
    """
    src = results_dir(out) / run_key
    manifest = {**read_manifest(out, run_key), **updates}
    manifest.update(run_key=alias_key, alias_of=run_key)
    tables = {name: pd.read_parquet(src / f"{name}.parquet") for name in TABLES}
    return write_run(out, alias_key, RunRecords(**tables, manifest=manifest))


def iter_runs(out: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Finished runs under ``out`` (folders with DONE), with their manifests, in key order."""
    base = results_dir(out)
    if not base.exists():
        return
    for d in sorted(base.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / "DONE").exists():
            yield d, json.loads((d / "manifest.json").read_text())


def load_results(out: str | Path, table: str = "cases") -> pd.DataFrame:
    """One tidy table over every finished run, with the run columns prepended."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    frames = []
    for d, manifest in iter_runs(out):
        df = pd.read_parquet(d / f"{table}.parquet")
        for col in reversed(RUN_COLUMNS):
            df.insert(0, col, manifest.get(col))
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def load_manifests(out: str | Path) -> list[dict[str, Any]]:
    return [m for _, m in iter_runs(out)]
