"""Workers: plain processes that take trials from the sweep's storage until nothing is left.

The storage is the only coordinator (no scheduler of our own): any shell, Slurm array or
Kubernetes job can start ``pflbench worker SUITE --storage URL`` against the same URL, and
``pflbench run SUITE --workers N`` is one of them plus N-1 child ``pflbench worker`` processes on
this machine, each with its share of the CPU threads (and GPUs), showing progress per study.

Loop: reap dead workers' trials (journal) or fail stale ones (PostgreSQL heartbeats); take the
first claimable trial (a tuned run whose tuning is finished, a tuning trial while budget is left,
a queued default/fixed run); when only running trials remain, wait (a crashed peer's trial may come
back); when nothing is waiting or running, stop. Every trial records ``host:pid``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from pflbench.pool import (
    release,
    start_children,
    stop_children,
    thread_share,
)
from pflbench.results import clean_leftovers
from pflbench.runner import DataCache, execute
from pflbench.storage import (
    StorageConfig,
    check_workers,
    open_storage,
    process_started,
    reap,
    requeue,
    resolve_storage,
    worker_id,
)
from pflbench.suite import Suite
from pflbench.tuning import (
    StudyRef,
    SweepError,
    budget_trials,
    ensure_sweep,
    final_config,
    final_spec,
    make_pruner,
    make_sampler,
    run_score,
    study_rows,
    sweep_studies,
    tune_ref,
    tuning_finished,
    tuning_objective,
)

Log = Callable[[str], None]


class Heartbeat:
    """Records the trial's heartbeat every interval (PostgreSQL), surviving storage errors: a dead
    heartbeat thread would let a peer take over a trial that is still running."""

    def __init__(self, storage: BaseStorage, trial_id: int, log: Log) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.log = log
        self.interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
        except Exception as exc:  # keep beating; the retry wrapper already waited
            self.log(f"heartbeat of trial id {self.trial_id} failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class WorkerStats:
    """What one worker did."""

    trials: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    over_budget: int = 0
    reaped: int = 0
    by_study: dict[str, int] = field(default_factory=dict)


def _priority(ref: StudyRef) -> int:
    """Tuned runs first (their tuning is done), then tuning, then default and fixed runs."""
    if ref.kind == "tune":
        return 1
    return 0 if ref.label == "tuned" else 2


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Worker:
    """One worker process's loop over the sweep's studies."""

    def __init__(
        self,
        suite: Suite,
        out: str | Path,
        storage: BaseStorage,
        *,
        index: int | None = None,
        threads: int | None = None,
        poll_s: float | None = None,
        max_poll_s: float | None = None,
        heal: bool = False,
        log: Log | None = None,
        max_trials: int | None = None,
        reap_pids: bool = True,
    ) -> None:
        self.suite = suite
        self.out = Path(out)
        self.storage = storage
        self.threads = threads
        # A local journal file is cheap to read: poll it often. A database shared by many workers
        # is polled gently, less and less often while only peers' trials are running.
        local = getattr(storage, "get_heartbeat_interval", lambda: None)() is None
        self.poll_s = poll_s if poll_s is not None else (0.25 if local else 1.0)
        self.max_poll_s = max_poll_s if max_poll_s is not None else (0.5 if local else 5.0)
        self.housekeeping_s = 10.0
        self._last_housekeeping = float("-inf")
        self.log: Log = log or (lambda msg: None)
        self.max_trials = max_trials
        self.reap_pids = reap_pids
        self.identity = worker_id()
        self.started = process_started()
        self.cache = DataCache()
        self.stats = WorkerStats()
        if index is None:  # a worker that joined from elsewhere: a seed offset of its own
            offset = int(hashlib.sha256(self.identity.encode()).hexdigest()[:8], 16) % 10**6 + 1
        else:
            offset = 7919 * index
        clean_leftovers(self.out)  # temporary folders of writers that crashed
        self.refs = ensure_sweep(storage, suite, heal=heal, log=self.log)
        self.studies: dict[str, optuna.Study] = {}
        for ref in self.refs:
            kwargs: dict[str, Any] = {}
            if ref.kind == "tune" and suite.tuning is not None:
                kwargs = {
                    "sampler": make_sampler(suite.tuning, offset),
                    "pruner": make_pruner(suite.tuning),
                }
            self.studies[ref.name] = optuna.load_study(
                study_name=ref.name, storage=storage, **kwargs
            )

    # housekeeping -------------------------------------------------------------------------------
    def _housekeeping(self) -> int:
        """Fail stale trials (heartbeats) and reap dead workers' trials; returns how many came
        back to the queue."""
        n = 0
        for ref in self.refs:
            study = self.studies[ref.name]
            before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            fail_stale_trials(study)  # PostgreSQL heartbeats; a no-op for the journal
            trials = study.get_trials(deepcopy=False)
            reaped = reap(study, trials, pids=self.reap_pids, log=self.log)
            self.stats.reaped += reaped
            n += reaped + max(0, sum(t.state == TrialState.WAITING for t in trials) - before)
        self._last_housekeeping = time.monotonic()
        return n

    def _mark(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, "worker", self.identity)
        self.storage.set_trial_user_attr(trial_id, "worker_started", self.started)

    # one step -----------------------------------------------------------------------------------
    def step(self) -> bool | None:
        """Run one trial if one can be taken: True; None if others still run; False when done.

        Dead workers' trials are looked for every ``housekeeping_s`` while there is work, and
        always before waiting or stopping."""
        if time.monotonic() - self._last_housekeeping >= self.housekeeping_s:
            self._housekeeping()
        result = self._take()
        if result is not True and self._housekeeping():
            result = self._take()
        return result

    def _take(self) -> bool | None:
        cache: dict[str, list[FrozenTrial]] = {}

        def trials_of(name: str) -> list[FrozenTrial]:  # read each study at most once per step
            if name not in cache:
                cache[name] = self.studies[name].get_trials(deepcopy=False)
            return cache[name]

        busy = False
        tuning = self.suite.tuning
        # 1. tuned runs whose tuning is over; 2. tuning trials; 3. default / fixed runs
        for ref in sorted(self.refs, key=_priority):
            trials = trials_of(ref.name)
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            busy |= any(t.state == TrialState.RUNNING for t in trials)
            if ref.kind == "tune":
                assert tuning is not None
                if waiting or len(budget_trials(trials)) < tuning.trials:
                    self._tune(ref)
                    return True
                continue
            if not waiting:
                continue
            tune_trials = None
            if ref.label == "tuned":
                tune_trials = trials_of(tune_ref(self.suite, ref).name)
                assert tuning is not None
                if not tuning_finished(tune_trials, tuning.trials):
                    busy = True  # the gate opens when the tuning study is done
                    continue
            for t in sorted(waiting, key=lambda t: t.number):
                try:
                    mine = self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
                except UpdateFinishedTrialError:  # closed since we read it (a dropped duplicate)
                    continue
                if mine:
                    self._run(ref, t, tune_trials)
                    return True
        return None if busy else False

    def _finish(self, name: str, state: TrialState) -> None:
        self.stats.trials += 1
        self.stats.by_study[name] = self.stats.by_study.get(name, 0) + 1
        if state == TrialState.COMPLETE:
            self.stats.complete += 1
        elif state == TrialState.PRUNED:
            self.stats.pruned += 1
        else:
            self.stats.failed += 1

    def _tell(self, study: optuna.Study, number: int, **kwargs: Any) -> bool:
        """Tell the storage; False when a peer already closed the trial (we were taken for dead)."""
        try:
            frozen = study.tell(number, skip_if_finished=True, **kwargs)
        except UpdateFinishedTrialError:
            frozen = None
        state = kwargs.get("state") or TrialState.COMPLETE
        if frozen is None or frozen.state != state:
            self.log(
                f"{study.study_name}: trial {number} was closed by a peer (stale heartbeat?); "
                "its result stays on disk and the retry will find it DONE"
            )
            return False
        return True

    def _interrupted(self, study: optuna.Study, number: int, trial_id: int) -> None:
        """Ctrl-C / SIGTERM mid-trial: close it as failed and queue its retry, then stop."""
        try:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            requeue(study, self.storage.get_trial(trial_id))
            self.log(f"{study.study_name}: trial {number} interrupted; re-enqueued")
        except Exception:
            pass

    def _tune(self, ref: StudyRef) -> None:
        study = self.studies[ref.name]
        assert self.suite.tuning is not None
        trial = study.ask()
        budget = budget_trials(study.get_trials(deepcopy=False))
        position = next((i for i, t in enumerate(budget) if t.number == trial.number), 0)
        if position >= self.suite.tuning.trials:  # a racing peer filled the budget first
            trial.set_user_attr("over_budget", True)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.stats.over_budget += 1
            return
        self._mark(trial._trial_id)
        state = TrialState.COMPLETE
        t0 = time.perf_counter()
        with Heartbeat(self.storage, trial._trial_id, self.log):
            try:
                value = tuning_objective(
                    trial,
                    self.suite,
                    ref.dataset,
                    ref.method,
                    self.out,
                    self.cache,
                    threads=self.threads,
                    extra={"study": ref.name, "worker": self.identity},
                )
            except optuna.TrialPruned as exc:
                state = TrialState.PRUNED
                trial.set_user_attr("pruned", str(exc))
                self._tell(study, trial.number, state=state)
            except KeyboardInterrupt:
                self._interrupted(study, trial.number, trial._trial_id)
                raise
            except Exception as exc:
                state = TrialState.FAIL
                self._error(study, trial._trial_id, trial.number, exc)
                self._tell(study, trial.number, state=state)
            else:
                self._tell(study, trial.number, values=value)
        self.log(
            f"{ref.name}: trial {trial.number} {state.name.lower()}"
            + (f" {value:.4f}" if state == TrialState.COMPLETE else "")
            + f" ({time.perf_counter() - t0:.1f} s)"
        )
        self._finish(ref.name, state)

    def _error(self, study: optuna.Study, trial_id: int, number: int, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.storage.set_trial_user_attr(trial_id, "error", text[:2000])
        self.log(f"{study.study_name}: trial {number} failed: {text}")
        if os.environ.get("PFLBENCH_DEBUG"):
            traceback.print_exc()

    def _run(
        self, ref: StudyRef, frozen: FrozenTrial, tune_trials: list[FrozenTrial] | None
    ) -> None:
        """A claimed run cell: build its run (tuned: the best tuning configuration) and execute."""
        study = self.studies[ref.name]
        tid, number = frozen._trial_id, frozen.number
        self._mark(tid)
        state = TrialState.COMPLETE
        seed = int(frozen.user_attrs["seed"])
        with Heartbeat(self.storage, tid, self.log):
            try:
                config, best = final_config(self.suite, ref, tune_trials)
                held = tuple(frozen.user_attrs.get("held_out") or ())
                spec = final_spec(self.suite, ref, seed, config, self.threads, held)
                spec.extra.update({"study": ref.name, "trial": number, "worker": self.identity})
                if best is not None:
                    spec.extra["tuning_trial"] = best
                    self.storage.set_trial_user_attr(tid, "config", config)
                    self.storage.set_trial_user_attr(tid, "tuning_trial", best)
                key, manifest = execute(spec, self.out, self.cache)
                value, m = run_score(self.out, key)
                self.storage.set_trial_user_attr(tid, "run_key", key)
                self.storage.set_trial_user_attr(tid, "skipped", manifest is None)
                self.storage.set_trial_user_attr(tid, "diverged", m.get("status") == "diverged")
            except KeyboardInterrupt:
                self._interrupted(study, number, tid)
                raise
            except Exception as exc:
                state = TrialState.FAIL
                self._error(study, tid, number, exc)
                self._tell(study, number, state=state)
            else:
                self._tell(study, number, values=value)
        cell = frozen.user_attrs.get("cell", number)
        self.log(f"{ref.name}: {cell} {state.name.lower()}")
        self._finish(ref.name, state)

    def run(self) -> WorkerStats:
        """Take trials until none is waiting or running; returns what this worker did."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        wait = self.poll_s
        while self.max_trials is None or self.stats.trials < self.max_trials:
            did = self.step()
            if did is False:
                break
            if did is None:  # only peers' trials are running: poll less and less often
                time.sleep(wait)
                wait = min(wait * 1.5, max(self.poll_s, self.max_poll_s))
            else:
                wait = self.poll_s
        return self.stats


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _stderr_log(quiet: bool) -> Log:
    ident = worker_id()

    def log(msg: str) -> None:
        if not quiet or "failed" in msg or "unreachable" in msg:
            print(f"[{ident}] {msg}", file=sys.stderr, flush=True)

    return log


def worker_main(
    suite: Suite,
    out: str | Path,
    storage_url: str | None,
    *,
    threads: int | None = None,
    index: int | None = None,
    quiet: bool = False,
) -> WorkerStats:
    """``pflbench worker``: join the sweep in ``storage_url`` and work until it is done."""
    config = resolve_storage(storage_url, out)
    check_workers(config, 1, joining=index is None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    storage = open_storage(config)
    worker = Worker(
        suite,
        out,
        storage,
        index=index,
        threads=threads if threads is not None else thread_share(1),
        log=_stderr_log(quiet),
        reap_pids=config.kind == "journal",
    )
    return worker.run()


@dataclass
class SweepResult:
    runs: int
    skipped: int
    storage: StorageConfig
    table: Any


def run_sweep(
    suite: Suite,
    suite_path: str,
    out: str | Path,
    storage_url: str | None,
    workers: int,
    *,
    quiet: bool = False,
    progress: Any = None,
    poll_s: float = 1.0,
    children: list[subprocess.Popen[bytes]] | None = None,
) -> SweepResult:
    """``pflbench run`` for a tuning suite, ``--workers N`` or ``--storage``: set the sweep up,
    start N workers (in this process when N = 1), show trials done / total per study in
    ``progress`` (a rich Progress; its other tasks are hidden), wait for the end.

    ``children``: workers 1..N-1 already started with :func:`pflbench.pool.start_children`
    (the command line starts them before its own imports); started here when None. They wait
    until the sweep is set up; this function owns them from here on.

    Raises :class:`SweepError` when workers stopped before every study was done (run the same
    command again to resume)."""
    out = Path(out)
    config = resolve_storage(storage_url, out)
    procs = children
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        check_workers(config, workers)
        if procs is None:
            procs = start_children(suite_path, out, config.cli_url, workers)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(config)
        ensure_sweep(storage, suite, heal=True, log=_stderr_log(False))
        if progress is not None:
            for task in progress.tasks:
                progress.update(task.id, visible=False)
        tasks: dict[str, Any] = {}

        def refresh() -> list[dict[str, Any]]:
            rows = study_rows(storage, suite)
            if progress is None:
                return rows
            for row in rows:
                label = f"{row['kind']} {row['dataset']} · {row['method']}" + (
                    f" · {row['label']}" if row["label"] else ""
                )
                extra = "".join(
                    f" [{k} {row[k]}]" for k in ("pruned", "failed", "diverged") if row[k]
                )
                if row["study"] not in tasks:
                    tasks[row["study"]] = progress.add_task(label, total=row["total"])
                progress.update(
                    tasks[row["study"]],
                    completed=row["done"],
                    total=row["total"],
                    description=label + extra,
                )
            return rows

        def monitor() -> None:  # keeps the display current while this process runs a trial
            wait = poll_s
            while not stop.wait(wait):
                t0 = time.monotonic()
                try:
                    refresh()
                except Exception:  # a display problem never stops the sweep
                    pass
                # a big sweep is slower to read: never spend more than ~5% of a core on it
                wait = max(poll_s, 20 * (time.monotonic() - t0))

        refresh()
        before = _complete_runs(storage, suite)
        # This process is worker 0; the others are `pflbench worker` children that have done
        # their imports meanwhile and join now.
        release(procs)
        log: Log = _stderr_log(True)
        if progress is not None and not quiet and workers == 1:
            log = lambda msg: progress.console.print(msg, highlight=False)  # noqa: E731
        if progress is not None:  # nothing to show: no polling thread competing for the GIL
            thread = threading.Thread(target=monitor, daemon=True, name="progress")
            thread.start()
        Worker(
            suite,
            out,
            storage,
            index=0,
            threads=thread_share(workers),
            log=log,
            reap_pids=config.kind == "journal",
        ).run()
        for p in procs:
            p.wait()
    except BaseException:
        stop_children(procs or [])
        raise
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    bad = [(i + 1, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        _stderr_log(False)(
            "worker process(es) exited with an error: "
            + ", ".join(f"#{i} (exit {rc})" for i, rc in bad)
        )
    table = pd.DataFrame(refresh())
    runs = table[table["kind"] == "runs"]
    after = _complete_runs(storage, suite)
    skipped = len(before) + sum(skip for key, skip in after.items() if key not in before)
    failed = int(runs["failed"].sum())
    if failed:
        _stderr_log(False)(
            f"{failed} run(s) failed; their `error` attribute says why (optuna-dashboard, or "
            "pflbench.tuning.study_table); fix the cause and run the same command again"
        )
    unfinished = table[table["done"] < table["total"]]
    if len(unfinished):
        names = ", ".join(unfinished["study"].tolist()[:5])
        raise SweepError(
            f"the sweep stopped before every study was done ({names}); run the same command "
            f"again to resume (storage: {config.display})"
        )
    return SweepResult(int(runs["total"].sum()), skipped, config, table)


def _complete_runs(storage: BaseStorage, suite: Suite) -> dict[tuple[str, int], bool]:
    """Complete run trials, with whether each found its run already DONE on disk."""
    out = {}
    for ref in sweep_studies(suite):
        if ref.kind != "runs":
            continue
        study = optuna.load_study(study_name=ref.name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            out[(ref.name, t.number)] = bool(t.user_attrs.get("skipped"))
    return out


__all__ = [
    "Heartbeat",
    "Worker",
    "WorkerStats",
    "SweepError",
    "run_sweep",
    "thread_share",
    "worker_main",
]
