"""Worker processes on the journal file: `--workers N`, joining workers, SIGKILL mid-run.

Every run must complete exactly once (one DONE folder and one COMPLETE trial per cell) however a
worker dies. The PostgreSQL versions of these tests are in test_postgres.py and reuse the helpers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from test_tuning import base_suite, tuning_section

from pflbench.pool import cpu_count
from pflbench.results import iter_runs
from pflbench.storage import open_storage, resolve_storage
from pflbench.suite import load_suite
from pflbench.tuning import study_table, sweep_studies

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_suite(
    tmp_path: Path,
    name: str = "kill",
    seeds: tuple[int, ...] = (0, 1, 2),
    methods: tuple[str, ...] = ("local", "fedavg"),
    rounds: int = 4,
    tuning: dict[str, Any] | None = None,
    threads: int | None = 1,
    **top: Any,
) -> Path:
    """A fixed (or tuning) suite of about a second per run on synthetic data (test_tuning's
    small federation); ``top``: more top-level keys."""
    raw = base_suite(name=name, methods=list(methods), seeds=list(seeds), **top)
    raw["protocol"].update(rounds=rounds, threads=threads, optimizer={"name": "adam", "lr": 0.03})
    if tuning is not None:
        raw["tuning"] = tuning
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, **extra)
    return env


def start_worker(suite: Path, storage: str, out: Path, env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "pflbench.cli", "worker", str(suite), "--storage", storage]
    cmd += ["--out", str(out), "--threads", "1", "--quiet"]
    return subprocess.Popen(cmd, env=env or worker_env())


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def all_trials(storage, suite) -> dict[str, list]:
    out = {}
    for ref in sweep_studies(suite):
        try:
            out[ref.name] = optuna.load_study(study_name=ref.name, storage=storage).get_trials()
        except KeyError:
            out[ref.name] = []
    return out


def running_on(storage, suite, pid: int, kind: str = "runs") -> bool:
    me = f"{socket.gethostname()}:{pid}"
    return any(
        t.state == TrialState.RUNNING and t.user_attrs.get("worker") == me
        for name, trials in all_trials(storage, suite).items()
        if f"/{kind}/" in name
        for t in trials
    )


def kill_one_of_two(
    suite_path: Path, storage_url: str, out: Path, env: dict[str, str], kind: str = "runs"
) -> int:
    """Start two workers, SIGKILL the first while it runs a trial, let the second finish."""
    suite = load_suite(suite_path)
    storage = open_storage(resolve_storage(storage_url, out))
    a = start_worker(suite_path, storage_url, out, env)
    b = start_worker(suite_path, storage_url, out, env)
    try:
        # kill as soon as A is seen running a trial (its worker attribute is written by then)
        wait_for(lambda: running_on(storage, suite, a.pid, kind), 120, "worker A to run a trial")
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        assert a.returncode == -signal.SIGKILL
        assert b.wait(timeout=240) == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    return a.pid


def assert_every_run_once(out: Path, storage, suite, killed_pid: int | None = None) -> None:
    """One DONE folder per cell, one COMPLETE trial per cell, nothing left waiting or running."""
    cells = [
        (ref.method.key, ref.label, seed)
        for ref in sweep_studies(suite)
        if ref.kind == "runs"
        for seed in suite.seeds
    ]
    done = Counter((m["method"], m["label"], m["seed"]) for _, m in iter_runs(out))
    assert sorted(done) == sorted(cells) and set(done.values()) == {1}
    complete = Counter()
    for name, trials in all_trials(storage, suite).items():
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if "/runs/" in name:
            for t in trials:
                if t.state == TrialState.COMPLETE:
                    complete[t.user_attrs["cell"]] += 1
    assert len(complete) == len(cells) and set(complete.values()) == {1}
    if killed_pid is not None:
        me = f"{socket.gethostname()}:{killed_pid}"
        killed = [
            t
            for ts in all_trials(storage, suite).values()
            for t in ts
            if t.user_attrs.get("worker") == me
        ]
        unfinished = [t for t in killed if t.state == TrialState.FAIL]
        assert len(unfinished) == 1  # the trial it was running: failed, then retried by the peer
        assert study_table(storage, suite)["retried"].sum() == 1


def test_sigkill_one_of_two_workers_on_the_journal_file(tmp_path):
    suite_path = write_suite(tmp_path)
    out = tmp_path / "out"
    url = f"journal:{out / 'optuna.journal'}"
    killed = kill_one_of_two(suite_path, url, out, worker_env())
    storage = open_storage(resolve_storage(url, out))
    assert_every_run_once(out, storage, load_suite(suite_path), killed)


@pytest.mark.parametrize("where", ["flag", "suite"])
def test_run_with_two_workers_splits_threads_and_goes_through_the_queue(tmp_path, where):
    top = {"workers": 2} if where == "suite" else {}
    suite_path = write_suite(tmp_path, name="two", seeds=(0, 1), rounds=2, threads=None, **top)
    out = tmp_path / "out"
    flag = ["--workers", "2"] if where == "flag" else []
    res = subprocess.run(
        [sys.executable, "-m", "pflbench.cli", "run", str(suite_path), *flag]
        + ["--out", str(out), "--no-report", "-q"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    suite = load_suite(suite_path)
    storage = open_storage(resolve_storage(None, out))  # the default journal in the run folder
    assert_every_run_once(out, storage, suite)
    manifests = [m for _, m in iter_runs(out)]
    assert {m["threads"] for m in manifests} == {max(1, cpu_count() // 2)}
    workers = {t.user_attrs["worker"] for ts in all_trials(storage, suite).values() for t in ts}
    assert all(w.startswith(socket.gethostname() + ":") for w in workers)
    assert {m["pid"] for m in manifests} <= {int(w.rsplit(":", 1)[1]) for w in workers}
    assert f"{len(manifests)} runs (0 already done)" in res.stderr


@pytest.mark.slow
def test_sigkill_during_tuning_keeps_the_budget_exact(tmp_path):
    tuning = tuning_section(4, sampler={"startup_trials": 2}, pruner={"name": "none"})
    suite_path = write_suite(tmp_path, name="tkill", seeds=(0,), methods=("fedavg",), tuning=tuning)
    out = tmp_path / "out"
    url = f"journal:{out / 'optuna.journal'}"
    kill_one_of_two(suite_path, url, out, worker_env(), kind="tune")
    suite = load_suite(suite_path)
    storage = open_storage(resolve_storage(url, out))
    table = study_table(storage, suite).set_index("kind")
    tune = table.loc["tune"]
    assert (tune["trials"], tune["done"], tune["complete"], tune["retried"]) == (4, 4, 4, 1)
    assert_every_run_once(out, storage, suite)


def test_a_gated_child_waits_for_go_and_leaves_when_the_parent_does(tmp_path):
    """Children of `run --workers N` start before the sweep exists and wait on stdin: without
    the word go (the parent failed or died) they touch nothing and exit cleanly."""
    from pflbench.pool import release, start_children

    suite = write_suite(tmp_path, seeds=(0,), methods=("local",))
    journal = tmp_path / "gate.log"
    (child,) = start_children(str(suite), tmp_path / "out", f"journal:{journal}", workers=2)
    time.sleep(1.0)
    assert child.poll() is None and not journal.exists()  # waiting, nothing opened
    child.stdin.close()
    assert child.wait(timeout=120) == 0
    assert not journal.exists() and not (tmp_path / "out" / "results").exists()

    # the same child released after the parent set the sweep up does the work
    storage = open_storage(resolve_storage(f"journal:{journal}", tmp_path / "out"))
    from pflbench.tuning import ensure_sweep

    ensure_sweep(storage, load_suite(suite))
    (child,) = start_children(str(suite), tmp_path / "out", f"journal:{journal}", workers=2)
    release([child])
    assert child.wait(timeout=300) == 0
    assert len(list(iter_runs(tmp_path / "out"))) == 1


# interruption, racing set-up and the children's environment (in process: seconds) -------------


def _two_seeds():
    from pflbench.suite import parse_suite

    raw = base_suite(methods=["fedavg"], seeds=[0, 1])
    raw["protocol"]["rounds"] = 1
    return parse_suite(raw, "s.yaml")


def _interrupt_at_seed_1(monkeypatch, how: Callable[[], None]) -> Callable[[], None]:
    """Make the run of seed 1 be interrupted by ``how``; returns the undo."""
    from pflbench import worker as worker_mod

    real = worker_mod.execute

    def execute(spec, *a, **k):
        if spec.seed == 1:
            how()
        return real(spec, *a, **k)

    monkeypatch.setattr(worker_mod, "execute", execute)
    return lambda: monkeypatch.setattr(worker_mod, "execute", real)


def _assert_interrupted_run_is_queued_again(suite, out: Path) -> None:
    storage = open_storage(resolve_storage(None, out))
    (ref,) = [r for r in sweep_studies(suite) if r.kind == "runs"]
    trials = optuna.load_study(study_name=ref.name, storage=storage).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # nothing left dangling
    seed1 = sorted((t for t in trials if t.user_attrs["seed"] == 1), key=lambda t: t.number)
    assert [t.state for t in seed1] == [TrialState.FAIL, TrialState.WAITING]
    failed, retry = seed1
    assert retry.user_attrs["cell"] == failed.user_attrs["cell"]
    assert retry.system_attrs["retry_history"] == [failed.number]


def _resume_runs_every_seed_once(suite, out: Path) -> None:
    from pflbench.worker import run_sweep

    again = run_sweep(suite, "s.yaml", out, None, 1, quiet=True)
    row = again.table[again.table["kind"] == "runs"].iloc[0]
    assert (row["complete"], row["done"], row["total"]) == (2, 2, 2)
    assert sorted(m["seed"] for _, m in iter_runs(out)) == [0, 1]


def test_ctrl_c_mid_run_closes_the_trial_as_failed_and_queues_its_retry(tmp_path, monkeypatch):
    from pflbench.worker import run_sweep

    suite, out = _two_seeds(), tmp_path / "out"

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    undo = _interrupt_at_seed_1(monkeypatch, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(suite, "s.yaml", out, None, 1, quiet=True)
    _assert_interrupted_run_is_queued_again(suite, out)
    undo()
    _resume_runs_every_seed_once(suite, out)


def test_sigterm_to_a_worker_closes_its_trial_and_queues_the_retry(tmp_path, monkeypatch):
    from pflbench.tuning import ensure_sweep
    from pflbench.worker import worker_main

    suite, out = _two_seeds(), tmp_path / "out"
    ensure_sweep(open_storage(resolve_storage(None, out)), suite)

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts the sleep at once

    undo = _interrupt_at_seed_1(monkeypatch, sigterm)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
            worker_main(suite, out, None, index=1, quiet=True)
    finally:
        signal.signal(signal.SIGTERM, before)
    _assert_interrupted_run_is_queued_again(suite, out)
    undo()
    _resume_runs_every_seed_once(suite, out)


def test_racing_machines_create_each_study_and_its_queue_exactly_once(tmp_path, monkeypatch):
    """Four processes (separate storage handles) set the same sweep up at the same moment: every
    create_study call is released together, one wins per study, the rest load it and wait."""
    import threading

    import pflbench.tuning as tuning_mod

    suite = parse_fixed_suite()
    url, racers = f"journal:{tmp_path / 'race.journal'}", 4
    gate = threading.Barrier(racers, timeout=60)
    real, created = optuna.create_study, Counter()

    def create_study(**kw):
        gate.wait()  # all racers call create_study for this study together
        study = real(**kw)
        created[kw["study_name"]] += 1
        return study

    monkeypatch.setattr(tuning_mod.optuna, "create_study", create_study)
    errors: list[BaseException] = []

    def machine() -> None:
        try:
            tuning_mod.ensure_sweep(open_storage(resolve_storage(url, tmp_path)), suite)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=machine) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    refs = sweep_studies(suite)
    assert dict(created) == {r.name: 1 for r in refs}
    storage = open_storage(resolve_storage(url, tmp_path))
    for ref in refs:
        study = optuna.load_study(study_name=ref.name, storage=storage)
        cells = [t.user_attrs["cell"] for t in study.trials]
        assert sorted(cells) == sorted(c["cell"] for c in ref.cells(suite))  # each once
        assert study.user_attrs["ready"] is True


def parse_fixed_suite():
    from pflbench.suite import parse_suite

    return parse_suite(base_suite(methods=["local", "fedavg"], seeds=[0, 1, 2]), "race.yaml")


def test_children_get_their_thread_share_and_gpu(monkeypatch):
    import pflbench.pool as pool

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakePopen:
        def __init__(self, cmd, env, stdin):
            started.append((cmd, env))

    monkeypatch.setattr(pool.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(pool, "cpu_count", lambda: 7)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # the parent's own setting must not leak
    pool.start_children("s.yaml", "out", "journal:j", workers=3)
    assert len(started) == 2  # worker 0 is the parent itself
    for i, (cmd, env) in enumerate(started, start=1):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert env[var] == "2", (i, var)  # 7 CPUs // 3 workers
        assert cmd[cmd.index("--threads") + 1] == "2" and cmd[cmd.index("--index") + 1] == str(i)
    # GPUs dealt round-robin from the visible ones; the parent keeps the first
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["5", "3"]
    started.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: nothing assigned
    pool.start_children("s.yaml", "out", None, workers=2)
    ((cmd, env),) = started
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "--storage" not in cmd
