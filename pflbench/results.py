"""Tidy results on disk: the only thing reports, statistics and the regression gate read.

Layout of one finished run (``<out>/results/<run_key>/``)::

    rounds.parquet   one row per round × client × split × structure × metric (evaluation rounds)
                     columns: round, client, split, structure, metric, value
                     structure "mean" is the mean over structures; metrics: dice, iou, loss
    comm.parquet     one row per round × client: round, client, bytes_up, bytes_down, sampled
    cases.parquet    one row per selection × client × split × case × structure
                     columns: selection ("best" | "last"), round, client, split, case_id,
                              structure, dice, iou, hd95, assd, surface_failure
    qualitative.npz  (optional) the selected round's predicted masks of a few fixed test cases per
                     site, with their image slice and ground truth, for the report's qualitative
                     figure (:mod:`pflbench.qualitative`); runs written before it, tuning runs
                     and runs with ``protocol.qualitative_cases: 0`` have none
    manifest.json    the run's configuration and provenance (run_key, dataset, method, params,
                     seed, label, protocol, model, data fingerprint, git, versions, processor, threads,
                     device, timings, peak memory, budget, bytes, partition sizes of the
                     method's base partition and of each client's own)
    DONE             written last; a folder without it is an unfinished run and is ignored

The manifest's ``files`` records each table's row count and SHA-256 (and the size and SHA-256 of
``qualitative.npz``); readers check them, so a truncated or rewritten file is an error naming the
file, never a silently different result.
A run whose manifest says ``status: diverged`` is kept on disk but left out of the tables by
default (:func:`load_results`); :func:`diverged_runs` lists them with round and reason.

Several processes may work on one folder: :func:`claim` is a per-run lock (``flock`` on
``results/.locks/<run_key>``, released by the kernel when its holder dies), so a cell is run once,
and :func:`write_run` never replaces a folder that has DONE.

The run columns (run_key, dataset, method, label, seed) are added when tables are read back with
:func:`load_results`, so files stay small and the manifest stays the one source of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pflbench import qualitative

TABLES = ("rounds", "comm", "cases")
RUN_COLUMNS = ("run_key", "dataset", "method", "label", "seed")
#: Column types of each table, applied to an empty table so that an empty run (diverged in round
#: 1) is written with numeric columns, not ``object`` ones that break every reader.
TABLE_TYPES: dict[str, dict[str, str]] = {
    "rounds": {
        "round": "int64",
        "client": "object",
        "split": "object",
        "structure": "object",
        "metric": "object",
        "value": "float64",
    },
    "comm": {
        "round": "int64",
        "client": "object",
        "bytes_up": "int64",
        "bytes_down": "int64",
        "sampled": "bool",
    },
    "cases": {
        "selection": "object",
        "round": "int64",
        "client": "object",
        "split": "object",
        "case_id": "object",
        "structure": "object",
        "dice": "float64",
        "iou": "float64",
        "hd95": "float64",
        "assd": "float64",
    },
}
LOCKS = ".locks"


class ResultsError(ValueError):
    """A finished run whose files are unreadable or differ from what its manifest recorded."""


@dataclass
class RunRecords:
    """The tables of one run before they are written."""

    rounds: pd.DataFrame
    comm: pd.DataFrame
    cases: pd.DataFrame
    manifest: dict[str, Any]
    #: the content of ``qualitative.npz`` (:func:`pflbench.qualitative.to_bytes`), or None
    qualitative: bytes | None = None


def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def is_done(out: str | Path, run_key: str) -> bool:
    return (results_dir(out) / run_key / "DONE").exists()


def _typed(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """An empty table gets its declared column types (see :data:`TABLE_TYPES`)."""
    if not df.empty:
        return df
    types = {c: t for c, t in TABLE_TYPES[name].items() if c in df.columns}
    return df.astype(types)


def _fsync(path: Path) -> None:
    """Flush a file or folder to the disk: DONE must never outlive its data after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim(out: str | Path, run_key: str, wait: bool = True) -> Iterator[bool]:
    """Hold the run's lock while running and writing it; yields False (without waiting) when
    another process holds it and ``wait`` is False. Another process's cell is then either
    finished (DONE) when the lock comes free, or left to be retried after its holder died."""
    locks = results_dir(out) / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / run_key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _leftovers(base: Path, run_key: str) -> None:
    """Remove temporary folders of earlier attempts at this run that crashed mid-write. Only
    called under the run's :func:`claim`, so no live writer owns them."""
    for d in base.glob(f".{run_key}.*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def write_run(out: str | Path, run_key: str, records: RunRecords) -> Path:
    """Write a run atomically: everything, DONE included, goes to a temporary folder that is
    fsynced and renamed into place.

    A crash at any point leaves either no folder or a complete one; a half-written temporary folder
    is ignored by readers (and removed by :func:`clean_leftovers`). A folder that already has DONE
    is never replaced: a racing writer of the same run keeps the first result and drops its own.
    """
    base = results_dir(out)
    base.mkdir(parents=True, exist_ok=True)
    final = base / run_key
    if (final / "DONE").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_key}.", dir=base))
    try:
        files = {}
        for name in TABLES:
            buf = io.BytesIO()
            table = _typed(getattr(records, name), name)
            table.to_parquet(buf, index=False)
            blob = buf.getvalue()
            _write_file(tmp / f"{name}.parquet", blob)
            files[f"{name}.parquet"] = {
                "rows": len(table),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
        if records.qualitative is not None:
            (tmp / qualitative.FILE).write_bytes(records.qualitative)
            files[qualitative.FILE] = {
                "bytes": len(records.qualitative),
                "sha256": hashlib.sha256(records.qualitative).hexdigest(),
            }
        manifest = {**records.manifest, "files": files}
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
        _write_file(tmp / "DONE", str(records.manifest.get("finished_at", "")).encode())
        for f in tmp.iterdir():
            _fsync(f)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: collaborators could not read it
        _fsync(tmp)
        if final.exists() and not (final / "DONE").exists():
            shutil.rmtree(final)  # an unfinished folder of an older layout
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "DONE").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a peer finished the same run first
            return final
        _fsync(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_file(path: Path, data: bytes) -> None:
    """Every file of a run is written here (one place where a full disk shows up)."""
    path.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_leftovers(out: str | Path) -> int:
    """Remove the temporary folders crashed writers left behind; returns how many. A folder is
    removed only while its run's lock can be taken, so a live writer's folder stays."""
    base = results_dir(out)
    if not base.exists():
        return 0
    keys = {d.name[1:].rsplit(".", 1)[0] for d in base.glob(".*.*") if d.is_dir()}
    n = 0
    for key in sorted(keys):
        with claim(out, key, wait=False) as mine:
            if mine:
                n += len([d for d in base.glob(f".{key}.*") if d.is_dir()])
                _leftovers(base, key)
    return n


def _repair_hint(d: Path) -> str:
    return f"delete {d} and run the suite again to recompute that run"


def _manifest(d: Path) -> dict[str, Any]:
    path = d / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: unreadable manifest ({exc}); {_repair_hint(d)}") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{path}: a manifest must be a JSON object; {_repair_hint(d)}")
    return manifest


def read_manifest(out: str | Path, run_key: str) -> dict[str, Any]:
    return _manifest(results_dir(out) / run_key)


def read_table(d: Path, table: str, manifest: dict[str, Any]) -> pd.DataFrame:
    """One table of a finished run, checked against the row count and hash in its manifest."""
    path = d / f"{table}.parquet"
    want = (manifest.get("files") or {}).get(path.name)
    blob = _checked_bytes(d, path, want)
    try:
        df = pd.read_parquet(io.BytesIO(blob))
    except Exception as exc:
        raise ResultsError(
            f"{path}: not a readable Parquet file ({exc}); {_repair_hint(d)}"
        ) from None
    if want is not None and len(df) != want.get("rows"):
        raise ResultsError(
            f"{path}: {len(df)} rows, the manifest recorded {want.get('rows')}; {_repair_hint(d)}"
        )
    return _typed(df, table)


def read_qualitative(
    d: Path, manifest: dict[str, Any]
) -> tuple[list[qualitative.Case], list[str]] | None:
    """The stored cases and class names of a finished run's ``qualitative.npz``, checked against
    its manifest like the tables; None for a run that stores none (older results, tuning runs)."""
    blob = _qualitative_blob(d, manifest)
    if blob is None:
        return None
    try:
        return qualitative.from_bytes(blob)
    except Exception as exc:  # numpy raises several kinds on a damaged archive
        raise ResultsError(
            f"{d / qualitative.FILE}: not a readable qualitative file ({exc}); {_repair_hint(d)}"
        ) from None


def _qualitative_blob(d: Path, manifest: dict[str, Any]) -> bytes | None:
    """The checked bytes of a run's ``qualitative.npz``, or None when it has none."""
    path = d / qualitative.FILE
    want = (manifest.get("files") or {}).get(path.name)
    if want is None and not path.exists():
        return None
    return _checked_bytes(d, path, want)


def _checked_bytes(d: Path, path: Path, want: dict[str, Any] | None) -> bytes:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{path}: unreadable ({exc.strerror}); {_repair_hint(d)}") from None
    if want is not None and hashlib.sha256(blob).hexdigest() != want.get("sha256"):
        raise ResultsError(
            f"{path}: content differs from what the run wrote (hash mismatch: truncated or "
            f"edited); {_repair_hint(d)}"
        )
    return blob


def write_alias(out: str | Path, run_key: str, alias_key: str, **updates: Any) -> Path:
    """A finished run again under ``alias_key`` with its manifest updated (label, trial, …).

    For a tuned configuration that equals the default one: the same configuration and seed give
    the same bits, so the run is copied, not repeated, and each label keeps its own rows.
    """
    src = results_dir(out) / run_key
    original = read_manifest(out, run_key)
    tables = {name: read_table(src, name, original) for name in TABLES}
    manifest = {**original, **updates}
    manifest.update(run_key=alias_key, alias_of=run_key)
    blob = _qualitative_blob(src, original)
    return write_run(out, alias_key, RunRecords(**tables, manifest=manifest, qualitative=blob))


def iter_runs(out: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Finished runs under ``out`` (folders with DONE), with their manifests, in key order."""
    base = results_dir(out)
    if not base.exists():
        return
    for d in sorted(base.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / "DONE").exists():
            yield d, _manifest(d)


def is_diverged(manifest: dict[str, Any]) -> bool:
    return manifest.get("status") == "diverged"


def load_results(out: str | Path, table: str = "cases", diverged: bool = False) -> pd.DataFrame:
    """One tidy table over every finished run, with the run columns prepended.

    Diverged runs are left out unless ``diverged``: their rows are those of a model that broke
    down mid-training, and averaging them in would report a breakdown as a (poor) result."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    frames = []
    for d, manifest in iter_runs(out):
        if is_diverged(manifest) and not diverged:
            continue
        df = read_table(d, table, manifest)
        for col in reversed(RUN_COLUMNS):
            df.insert(0, col, manifest.get(col))
        if manifest.get("held_out"):  # unseen-site runs (issue 19); older folders have none
            df["held_out"] = "+".join(manifest["held_out"])
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def load_manifests(out: str | Path) -> list[dict[str, Any]]:
    """Every finished run's manifest, diverged ones included."""
    return [m for _, m in iter_runs(out)]


def diverged_runs(out: str | Path) -> pd.DataFrame:
    """The diverged runs, one row each: dataset, method, label, seed, round (the round that
    broke down), reason and run_key."""
    rows = [
        {
            "dataset": m.get("dataset"),
            "method": m.get("method"),
            "label": m.get("label"),
            "seed": m.get("seed"),
            "round": int(m.get("rounds_done") or 0) + 1,
            "reason": str(m.get("error") or "non-finite loss"),
            "run_key": m.get("run_key"),
        }
        for m in load_manifests(out)
        if is_diverged(m)
    ]
    cols = ["dataset", "method", "label", "seed", "round", "reason", "run_key"]
    return pd.DataFrame(rows, columns=cols)
