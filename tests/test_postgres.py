"""Sweeps on a real PostgreSQL server: heartbeats, stale-trial retry, a server restart mid-run.

Needs ``PFLBENCH_TEST_PG_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:55432/pflbench_test``);
the restart test also needs ``PFLBENCH_TEST_PG_RESTART``, a shell command that stops the server,
waits a few seconds and starts it again (see docs/sweeps.md for the CI lines).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState
from test_tuning import tuning_section
from test_workers import (
    all_trials,
    assert_every_run_once,
    kill_one_of_two,
    running_on,
    wait_for,
    worker_env,
    write_suite,
)

from pflbench.storage import StorageOptions, open_storage, resolve_storage
from pflbench.suite import load_suite
from pflbench.tuning import study_table
from pflbench.worker import Worker

PG_URL = os.environ.get("PFLBENCH_TEST_PG_URL")
PG_RESTART = os.environ.get("PFLBENCH_TEST_PG_RESTART")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="PFLBENCH_TEST_PG_URL is not set (no PostgreSQL server)"),
]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def unique(prefix: str) -> str:
    """Suite (= study prefix) names never seen before, so the tests can share one database."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_tuning_sweep_on_postgres_reads_back_the_same_budget(tmp_path):
    tuning = tuning_section(3, sampler={"startup_trials": 3}, pruner={"name": "none"})
    suite_path = write_suite(tmp_path, unique("pgtune"), seeds=(0,), rounds=2, tuning=tuning)
    suite = load_suite(suite_path)
    config = resolve_storage(PG_URL, tmp_path)
    storage = open_storage(config, StorageOptions(heartbeat_interval=1))
    assert storage.get_heartbeat_interval() == 1  # heartbeats are on for PostgreSQL
    Worker(suite, tmp_path / "out", storage, index=0, threads=1, reap_pids=False).run()
    table = study_table(storage, suite)
    tune = table[table["kind"] == "tune"]
    assert list(tune["trials"]) == [3, 3] and list(tune["done"]) == [3, 3]
    assert_every_run_once(tmp_path / "out", storage, suite)


def test_sigkill_one_of_two_workers_on_postgres_is_retried_by_heartbeat(tmp_path):
    suite_path = write_suite(tmp_path, unique("pgkill"))
    out = tmp_path / "out"
    env = worker_env(PFLBENCH_HEARTBEAT_INTERVAL="1", PFLBENCH_HEARTBEAT_GRACE="4")
    killed = kill_one_of_two(suite_path, PG_URL, out, env)
    storage = open_storage(resolve_storage(PG_URL, out))
    suite = load_suite(suite_path)
    assert_every_run_once(out, storage, suite, killed)
    # the retry came from the heartbeat callback (pid reaping is off for PostgreSQL)
    retries = [
        t
        for ts in all_trials(storage, suite).values()
        for t in ts
        if "failed_trial" in t.system_attrs
    ]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE


@pytest.mark.skipif(not PG_RESTART, reason="PFLBENCH_TEST_PG_RESTART is not set")
def test_workers_survive_a_postgres_restart_mid_run(tmp_path):
    suite_path = write_suite(tmp_path, unique("pgrestart"), seeds=(0, 1, 2, 3))
    suite = load_suite(suite_path)
    out = tmp_path / "out"
    # a grace period longer than the outage: nobody is taken for dead, nothing runs twice
    env = worker_env(PFLBENCH_HEARTBEAT_INTERVAL="1", PFLBENCH_HEARTBEAT_GRACE="30")
    storage = open_storage(resolve_storage(PG_URL, out))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    for log in logs:
        with open(log, "w") as fh:
            p = subprocess.Popen(_worker_cmd(suite_path, out), env=env, stderr=fh)
        procs.append(p)
    try:
        wait_for(
            lambda: all(running_on(storage, suite, p.pid) for p in procs), 120, "both workers busy"
        )
        t0 = time.monotonic()
        subprocess.run(PG_RESTART, shell=True, check=True, timeout=120)
        outage = time.monotonic() - t0
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "".join(log.read_text() for log in logs)
    assert "unreachable" in text, text  # the outage was felt, and ridden out
    assert outage > 1
    storage = open_storage(resolve_storage(PG_URL, out))
    assert_every_run_once(out, storage, suite)
    states = [t.state for ts in all_trials(storage, suite).values() for t in ts]
    assert TrialState.FAIL not in states


def _worker_cmd(suite_path, out) -> list[str]:
    cmd = [sys.executable, "-m", "pflbench.cli", "worker", str(suite_path), "--storage", PG_URL]
    return cmd + ["--out", str(out), "--threads", "1", "--quiet"]
