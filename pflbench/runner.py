"""From a suite to finished runs: the plan (dataset × method × seed), run keys, resume.

A run's key hashes its semantic configuration, so a run whose key is DONE is never repeated and a
killed sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from pflbench import __version__, qualitative
from pflbench.configs import flatten
from pflbench.data import FederatedData, make_splits, splits_fingerprint
from pflbench.engine import EvalCallback, Federation, RoundCallback, build_method
from pflbench.params import resolve_params
from pflbench.registry import get_dataset, get_method, registry
from pflbench.results import (
    RunRecords,
    claim,
    clean_leftovers,
    is_done,
    read_manifest,
    results_dir,
    write_alias,
    write_run,
)
from pflbench.suite import DatasetSpec, Evaluation, MethodSpec, ModelSpec, Protocol, Suite

#: Dataset options that say where things are on this machine, not what the data is.
LOCAL_OPTIONS = frozenset({"cache_dir", "cache", "root", "image_path", "mask_path"})


@dataclass(frozen=True)
class RunSpec:
    """One cell of a suite: everything that determines a run's result."""

    dataset: DatasetSpec
    method: MethodSpec
    seed: int
    protocol: Protocol
    model: ModelSpec
    label: Literal["fixed", "tuned", "default"] = "fixed"
    mode: Literal["final", "tune"] = "final"
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: Sites kept out of the federation and scored as newcomers (``evaluation.unseen``).
    held_out: tuple[str, ...] = ()
    evaluation: Evaluation | None = None

    def unseen_dict(self) -> dict[str, Any] | None:
        """What the unseen evaluation adds to the run key (None without held-out sites, so the
        keys of every other run stay what they were)."""
        if not self.held_out:
            return None
        ev = self.evaluation or Evaluation()
        return {
            "held_out": list(self.held_out),
            "regimes": list(ev.regimes),
            "few_shot_steps": ev.few_shot_steps,
            "newcomer_personal": ev.newcomer_personal,
        }

    def semantic(self, data_fingerprint: str) -> dict[str, Any]:
        cls = get_method(self.method.name)
        params = resolve_params(cls.params, self.method.params, f"method {self.method.name}")
        return {
            "dataset": {
                "name": self.dataset.name,
                "options": self.dataset.options,
                "split_seed": self.dataset.split_seed,
            },
            "data_fingerprint": data_fingerprint,
            "method": self.method.name.partition("@")[0],  # the class is in "plugins"
            "params": params,
            "seed": self.seed,
            "protocol": self.protocol.key_dict(),
            "model": self.model.model_dump(mode="json"),
            "mode": self.mode,
            "version": __version__,
            **({"unseen": unseen} if (unseen := self.unseen_dict()) else {}),
            # a plugin from another distribution: its name and version (a shadowing plugin
            # never shares a run key with the built-in it shadows)
            **({"plugins": plugins} if (plugins := self.foreign_plugins()) else {}),
        }

    def plugins(self) -> dict[str, dict[str, Any]]:
        """Distribution, version and object path of the method, dataset and model classes."""
        return {
            "method": registry("methods").provenance(self.method.name),
            "dataset": registry("datasets").provenance(self.dataset.name),
            "model": registry("models").provenance(self.model.name),
        }

    def foreign_plugins(self) -> dict[str, dict[str, Any]]:
        """:meth:`plugins` without pflbench's own (their version is in the key already, so
        built-in run keys stay what they were)."""
        return {k: v for k, v in self.plugins().items() if v["distribution"] != "pflbench"}

    def key(self, data_fingerprint: str) -> str:
        blob = json.dumps(self.semantic(data_fingerprint), sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        slug = f"{self.dataset.key}-{self.method.key}-s{self.seed}"
        if self.held_out:
            slug += "-out_" + "+".join(self.held_out)
        slug = slug.replace("/", "_").replace(":", "_")
        return f"{slug}-{digest}"


def plan(suite: Suite, cache: DataCache | None = None) -> list[RunSpec]:
    """Every (dataset, method, seed) cell of a suite, in a stable order; with
    ``evaluation.unseen`` every cell once per held-out set (leave_one_out: per site), which
    needs the datasets' site names (loaded through ``cache``)."""
    ev = suite.evaluation
    cells = []
    for d in suite.datasets:
        held: list[tuple[str, ...]] = [()]
        if ev.unseen is not None:
            cache = cache or DataCache()
            held = ev.held_out_sets(cache.get(d)[0].site_names, d.key)
        for m in suite.methods:
            for s in suite.seeds:
                for h in held:
                    cells.append(
                        RunSpec(
                            dataset=d,
                            method=m,
                            seed=s,
                            protocol=suite.protocol_for(d),
                            model=suite.model,
                            held_out=h,
                            evaluation=ev if h else None,
                        )
                    )
    return cells


def planned_runs(suite: Suite, out: str | Path, cache: DataCache | None = None) -> pd.DataFrame:
    """The cells a run of ``suite`` into ``out`` consists of, with their run keys and whether each
    is DONE (for ``--dry-run``). Run keys hash the data, so every dataset is loaded once."""
    cache = cache or DataCache()
    rows = []
    for spec in plan(suite, cache):
        key = spec.key(cache.get(spec.dataset)[2])
        rows.append(
            {
                "dataset": spec.dataset.key,
                "method": spec.method.key,
                "label": spec.label,
                "seed": spec.seed,
                "run_key": key,
                "done": is_done(out, key),
            }
        )
    return pd.DataFrame(rows, columns=["dataset", "method", "label", "seed", "run_key", "done"])


def planned_studies(suite: Suite) -> pd.DataFrame:
    """A tuning suite's plan (for ``--dry-run``): one study per (dataset, method) with its
    trials and tuning seeds, then the tuned and the default configuration on every reporting
    seed."""
    assert suite.tuning is not None, "planned_studies needs a suite with a tuning section"
    rows = [
        {
            "dataset": d.key,
            "method": m.key,
            "trials": suite.tuning.trials,
            "tuning_seeds": ",".join(map(str, suite.tuning.seeds)),
            "final_runs": 2 * len(suite.seeds),
        }
        for d in suite.datasets
        for m in suite.methods
    ]
    return pd.DataFrame(rows, columns=["dataset", "method", "trials", "tuning_seeds", "final_runs"])


def protocol_differences(suite: Suite) -> dict[str, list[str]]:
    """Per dataset, the protocol settings that differ from the suite's (``key=value``, dotted
    for mappings), so a plan shows which runs a dataset's ``protocol`` block changes."""
    base = flatten(suite.protocol.model_dump(mode="json"))
    out = {}
    for d in suite.datasets:
        mine = flatten(suite.protocol_for(d).model_dump(mode="json"))
        out[d.key] = [
            f"{k}={mine.get(k)}"
            for k in sorted(set(base) | set(mine))
            if mine.get(k) != base.get(k)
        ]
    return out


class DataCache:
    """Loads each dataset once per process, with its case split and fingerprint."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[FederatedData, dict, str]] = {}

    @staticmethod
    def key(spec: DatasetSpec) -> str:
        """What makes two dataset specs load the same data and split."""
        return json.dumps([spec.name, spec.options, spec.split_seed], sort_keys=True, default=str)

    @staticmethod
    def load(spec: DatasetSpec) -> FederatedData:
        """The dataset a spec names, loaded from its source (no caching)."""
        return get_dataset(spec.name)(**spec.options).load()

    def get(self, spec: DatasetSpec) -> tuple[FederatedData, dict, str]:
        k = self.key(spec)
        if k not in self._cache:
            data = self.load(spec)
            splits = make_splits(data, seed=spec.split_seed)
            self._cache[k] = (data, splits, splits_fingerprint(data, splits))
        return self._cache[k]


@cache
def _git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "pflbench": __version__}
    for pkg in ("torch", "numpy", "scipy", "pandas", "optuna", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import torch

    out["cuda"] = torch.version.cuda
    out["cudnn"] = (
        str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    )
    return out


def _processor() -> dict[str, str | None]:
    """The CPU model and the vector ISA torch dispatches to. CPU results are bitwise
    reproducible on one machine, not across processors: the same commit gave different Dice on an
    Intel Xeon and an AMD EPYC (both AVX512), so a manifest must say which one produced it."""
    import torch

    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine() or None,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def execute(
    spec: RunSpec,
    out: str | Path,
    data_cache: DataCache | None = None,
    *,
    on_eval: EvalCallback | None = None,
    on_round: RoundCallback | None = None,
    wait: bool = True,
) -> tuple[str, dict[str, Any] | None]:
    """Run one cell unless its key is already DONE; returns (run_key, manifest or None if skipped).

    The run's :func:`~pflbench.results.claim` is held from the DONE check to the write, so two
    processes given the same cell (two ``pflbench run`` on one folder, a doubly enqueued trial)
    run it once: the second waits and finds it DONE. With ``wait=False`` a cell another process
    holds raises :class:`Busy` at once instead."""
    data_cache = data_cache or DataCache()
    data, splits, fingerprint = data_cache.get(spec.dataset)
    run_key = spec.key(fingerprint)
    if is_done(out, run_key):
        return _labelled(out, run_key, spec), None
    with claim(out, run_key, wait=wait) as mine:
        if not mine:
            raise Busy(run_key)
        if is_done(out, run_key):  # a peer finished it while we waited
            return _labelled(out, run_key, spec), None
        manifest = _train(spec, out, run_key, data, splits, fingerprint, on_eval, on_round)
    return run_key, manifest


class Busy(RuntimeError):
    """Another process holds the cell's claim (:func:`execute` with ``wait=False``)."""


class RunWriteError(RuntimeError):
    """A run trained but its results could not be written to the run folder (a full disk, a
    read-only mount, ...). Nothing half-written is left there: the cell is not DONE, so the same
    command redoes it. ``fallback`` is where the trained run's results were saved instead
    (``None`` when that failed too)."""

    def __init__(self, run_key: str, folder: Path, cause: OSError, fallback: Path | None) -> None:
        self.run_key, self.folder, self.cause, self.fallback = run_key, folder, cause, fallback
        reason = cause.strerror or str(cause)
        saved = (
            f"its results were saved to {fallback} (copy that folder into {folder.parent} to keep "
            "them, or run the same command again to redo the run)"
            if fallback is not None
            else "its results could not be saved anywhere; run the same command again to redo it"
        )
        super().__init__(f"could not write run {run_key} to {folder}: {reason}; {saved}")


def fallback_dir() -> Path:
    """Where a run that cannot be written to its folder is saved instead:
    ``$PFLBENCH_FALLBACK``, else ``<system temp>/pflbench-unsaved`` (often another disk)."""
    env = os.environ.get("PFLBENCH_FALLBACK")
    return Path(env).expanduser() if env else Path(tempfile.gettempdir()) / "pflbench-unsaved"


def _save(out: str | Path, run_key: str, records: RunRecords) -> None:
    """Write the run; on an OS error keep the trained results in the fallback folder (same
    layout) and raise :class:`RunWriteError`, which names both folders."""
    try:
        write_run(out, run_key, records)
    except OSError as exc:
        fallback: Path | None
        try:
            fallback = write_run(fallback_dir(), run_key, records)
        except OSError:
            fallback = None
        raise RunWriteError(run_key, results_dir(out) / run_key, exc, fallback) from exc


def _train(
    spec: RunSpec,
    out: str | Path,
    run_key: str,
    data: FederatedData,
    splits: dict,
    fingerprint: str,
    on_eval: EvalCallback | None,
    on_round: RoundCallback | None,
) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat()
    method = build_method(spec.method)
    fed = Federation(
        data,
        splits,
        method,
        spec.model,
        spec.protocol,
        spec.seed,
        mode=spec.mode,
        on_eval=on_eval,
        on_round=on_round,
        held_out=spec.held_out,
        evaluation=spec.evaluation,
    )
    result = fed.run()
    semantic = spec.semantic(fingerprint)
    manifest = {
        "run_key": run_key,
        "dataset": spec.dataset.key,
        "dataset_name": spec.dataset.name,
        "method": spec.method.key,
        "method_name": spec.method.name,
        "label": spec.label,
        "seed": spec.seed,
        "params": semantic["params"],
        "protocol": spec.protocol.model_dump(mode="json"),
        "model": spec.model.model_dump(mode="json"),
        "mode": spec.mode,
        **({"unseen": unseen} if (unseen := spec.unseen_dict()) else {}),
        "data_fingerprint": fingerprint,
        "plugins": spec.plugins(),
        "sites": data.site_names,
        "structures": list(data.structures),
        "case_level": data.case_level,
        "splits": {site: {k: len(v) for k, v in s.items()} for site, s in splits.items()},
        "git": _git_info(),
        "versions": _versions(),
        "processor": _processor(),
        "host": platform.node(),
        "pid": os.getpid(),
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        **spec.extra,
        **result.info,
    }
    shown = qualitative.to_bytes(result.qualitative, data.classes) if result.qualitative else None
    _save(
        out,
        run_key,
        RunRecords(result.rounds, result.comm, result.cases, manifest, qualitative=shown),
    )
    return manifest


def _labelled(out: str | Path, run_key: str, spec: RunSpec) -> str:
    """The key under which ``spec``'s label finds its (already finished) run.

    The label is not part of the run key (tuned == default is one configuration), but a sweep
    reports both: when the finished run carries the other label, an alias copy with this label is
    written once (``<run_key>-<label>``) so that each label keeps its rows.
    """
    if spec.label == "fixed" or read_manifest(out, run_key).get("label") == spec.label:
        return run_key
    alias = f"{run_key}-{spec.label}"
    if not is_done(out, alias):
        with claim(out, alias):
            if not is_done(out, alias):
                write_alias(out, run_key, alias, label=spec.label, **spec.extra)
    return alias


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    on_run_start: Callable[[RunSpec, int, int], None] | None = None,
    on_run_end: Callable[[RunSpec, str, dict | None], None] | None = None,
    on_round: RoundCallback | None = None,
    on_run_error: Callable[[RunSpec, RunWriteError], None] | None = None,
) -> list[str]:
    """Run every cell in order, skipping DONE ones; returns the run keys of the finished cells.

    A cell another process is running (a second ``pflbench run`` on the same folder) is put off
    to the end and then waited for, so two invocations share the cells instead of repeating
    them. A cell whose results cannot be written (:class:`RunWriteError`) goes to
    ``on_run_error`` (raised when there is none) and the sweep goes on with the next cell."""
    clean_leftovers(out)  # temporary folders of writers that crashed
    cache = DataCache()
    cells = plan(suite, cache)
    keys: list[str | None] = [None] * len(cells)
    later: list[int] = []
    for wait in (False, True):
        todo = range(len(cells)) if not wait else later
        for i in list(todo):
            spec = cells[i]
            if on_run_start:
                on_run_start(spec, i, len(cells))
            t0 = time.perf_counter()
            try:
                key, manifest = execute(spec, out, cache, on_round=on_round, wait=wait)
            except Busy:
                later.append(i)
                continue
            except RunWriteError as exc:
                if on_run_error is None:
                    raise
                on_run_error(spec, exc)
                continue
            if on_run_end:
                on_run_end(
                    spec,
                    key,
                    manifest
                    if manifest is None
                    else {**manifest, "_wall_s": time.perf_counter() - t0},
                )
            keys[i] = key
    return [k for k in keys if k is not None]
