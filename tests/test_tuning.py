"""Fair tuning: the tuning section, the search space, budget accounting, the objective (no test
split, pruning, divergence), tuned vs default runs, storage URLs and retries, the journal reaper."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from pflbench import federation
from pflbench.engine import Federation
from pflbench.method import Method
from pflbench.params import Param
from pflbench.results import iter_runs, results_dir
from pflbench.storage import (
    RetryingStorage,
    StorageConfigError,
    StorageOptions,
    check_workers,
    open_storage,
    reap,
    resolve_storage,
    retry_call,
)
from pflbench.suite import SuiteError, parse_suite
from pflbench.tuning import (
    POOR,
    SweepError,
    best_trial,
    budget_trials,
    configure,
    default_config,
    ensure_sweep,
    search_space,
    study_table,
    sweep_studies,
    tuning_finished,
    tuning_objective,
)
from pflbench.worker import Worker

optuna.logging.set_verbosity(optuna.logging.WARNING)

GOOD_LR = 0.03  # learns this federation within 4 rounds (client-macro val Dice well above 0)
BAD_LR = 1e-6  # learns nothing: below the median at the same round, so the pruner stops it
DIVERGING_LR = 1e30  # non-finite loss in the first round


def base_suite(**over: Any) -> dict[str, Any]:
    """A small synthetic federation: two sites, 16 px, 4 rounds; about a second per run."""
    raw: dict[str, Any] = {
        "name": "tq",
        "datasets": [
            {
                "name": "synthetic",
                "options": {
                    "flavour": "prostate",
                    "size": 16,
                    "sites": 2,
                    "images_per_site": [12, 12],
                },
            }
        ],
        "methods": ["local", "fedavg"],
        "seeds": [0],
        "model": {"name": "unet", "options": {"base": 8, "depth": 2}},
        "protocol": {
            "rounds": 4,
            "local_epochs": 2,
            "batch_size": 4,
            "threads": 1,
            "device": "cpu",
            "surface_metrics": False,
            "optimizer": {"name": "adam", "lr": 1e-3},
        },
    }
    raw.update(over)
    return raw


def tuning_section(trials: int = 4, **over: Any) -> dict[str, Any]:
    t: dict[str, Any] = {
        "trials": trials,
        "seeds": [10],
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 10},
        "pruner": {"name": "median", "startup_trials": 1, "warmup_steps": 0},
        "search": {
            "lr": {"low": 1e-3, "high": 0.1, "log": True},
            "local_epochs": None,
            "batch_size": None,
        },
        "method_params": False,
    }
    t.update(over)
    return t


def journal(tmp_path: Path):
    return open_storage(resolve_storage(None, tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# The tuning section
# ---------------------------------------------------------------------------------------------


def test_tuning_and_reporting_seeds_must_be_disjoint_and_the_error_names_the_keys():
    raw = base_suite(seeds=[0, 10], tuning=tuning_section())
    with pytest.raises(SuiteError) as err:
        parse_suite(raw, "s.yaml")
    msg = str(err.value)
    assert msg.startswith("s.yaml: tuning:")
    assert "[10]" in msg and "tuning.seeds" in msg and "(seeds)" in msg
    parse_suite(base_suite(seeds=[0, 1], tuning=tuning_section()), "s.yaml")  # disjoint: fine


def test_tuning_section_rejects_unknown_keys_and_a_budget_the_protocol_does_not_use():
    with pytest.raises(SuiteError, match=r"tuning\.search: .*unknown search key 'momentum'"):
        parse_suite(base_suite(tuning=tuning_section(search={"momentum": None})), "s")
    with pytest.raises(SuiteError, match=r"tuning\.trials: .*greater than 0"):
        parse_suite(base_suite(tuning=tuning_section(trials=0)), "s")
    steps = base_suite(tuning=tuning_section(search={"local_epochs": {"low": 1, "high": 2}}))
    steps["protocol"] = {**steps["protocol"], "local_steps": 3}
    del steps["protocol"]["local_epochs"]
    with pytest.raises(SuiteError, match=r"tuning\.search\.local_epochs: .*local_steps"):
        parse_suite(steps, "s")
    # the default search follows the protocol's budget instead of failing
    steps["tuning"] = {"trials": 2, "seeds": [10]}
    suite = parse_suite(steps, "s")
    assert "local_epochs" not in suite.tuning.search and "lr" in suite.tuning.search


class Toy(Method):
    """FedAvg with declared parameters of every kind (test only)."""

    name = "toy"
    params = {
        "mu": Param(0.01, low=1e-4, high=1.0, log=True),
        "k": Param(2, low=1, high=5),
        "mode": Param("a", choices=("a", "b")),
        "flag": Param(True),  # no range: never tuned
        "beta": Param(0.5, low=0.0, high=1.0),
    }


def test_search_space_is_the_shared_ranges_plus_the_methods_declared_ones():
    raw = base_suite(
        methods=[{"name": "test_tuning:Toy", "label": "toy", "params": {"beta": 0.2}}],
        tuning=tuning_section(
            method_params=True,
            search={
                "lr": {"low": 1e-3, "high": 0.1, "log": True},
                "batch_size": {"choices": [4, 8]},
            },
        ),
    )
    suite = parse_suite(raw, "s")
    space = search_space(suite.tuning, suite.methods[0])
    # beta is fixed by the suite, flag has no range, local_epochs is held at the protocol's value
    assert set(space) == {"lr", "batch_size", "k", "mode", "mu"}
    assert (space["lr"].kind, space["lr"].log, space["lr"].source) == ("float", True, "shared")
    assert space["batch_size"].choices == (4, 8)
    assert (space["k"].kind, space["k"].low, space["k"].high) == ("int", 1, 5)
    assert space["mode"].kind == "categorical" and space["mu"].log
    assert default_config(suite.protocol, suite.methods[0], space) == {
        "lr": 1e-3,
        "batch_size": 4,
        "k": 2,
        "mode": "a",
        "mu": 0.01,
    }
    # the same space for a method without declared parameters is just the shared part
    assert set(search_space(suite.tuning, parse_suite(base_suite(), "s").methods[0])) == {
        "lr",
        "batch_size",
    }


def test_a_configuration_changes_the_run_key_but_the_thread_share_does_not():
    suite = parse_suite(base_suite(tuning=tuning_section()), "s")
    m = suite.methods[1]
    space = search_space(suite.tuning, m)
    p1, m1 = configure(suite.protocol, m, {"lr": 0.05}, space, threads=1)
    p2, _ = configure(suite.protocol, m, {"lr": 0.05}, space, threads=2)
    p3, _ = configure(suite.protocol, m, {"lr": 0.02}, space, threads=1)
    assert p1.optimizer.lr == 0.05 and p1.threads == 1 and p2.threads == 1  # the suite pins 1
    assert suite.protocol.optimizer.lr == 1e-3  # the suite itself is untouched
    from pflbench.runner import RunSpec

    def key(p):
        return RunSpec(suite.datasets[0], m1, 0, p, suite.model).key("fp")

    assert key(p1) == key(p2) != key(p3)


# ---------------------------------------------------------------------------------------------
# Budget accounting on hand-made trials
# ---------------------------------------------------------------------------------------------


def _add(study, state, value=None, number_attrs=None, system=None):
    study.add_trial(
        create_trial(
            state=state,
            value=value,
            params={"lr": 0.01},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)},
            user_attrs=number_attrs or {},
            system_attrs=system or {},
        )
    )


def test_budget_counts_pruned_and_failed_but_not_replaced_or_over_budget_trials():
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 0.5)  # 0
    _add(study, TrialState.PRUNED, 0.1)  # 1: counts
    _add(study, TrialState.FAIL)  # 2: worker died, replaced by 4
    _add(study, TrialState.COMPLETE, 0.9, {"diverged": True})  # 3: counts, never best
    _add(study, TrialState.COMPLETE, 0.7, system={"failed_trial": 2, "retry_history": [2]})  # 4
    _add(study, TrialState.FAIL)  # 5: a real failure: counts
    _add(study, TrialState.FAIL, None, {"over_budget": True})  # 6: closed at once
    _add(study, TrialState.COMPLETE, 0.99)  # 7: past the budget of 5
    trials = study.get_trials()
    assert [t.number for t in budget_trials(trials)] == [0, 1, 3, 4, 5, 7]
    assert tuning_finished(trials, 5)
    best = best_trial(trials, 5)
    assert best is not None and best.number == 4  # 0.99 is past the budget, 0.9 diverged
    _add(study, TrialState.WAITING)  # 8
    assert tuning_finished(study.get_trials(), 5)  # the first five are all finished
    assert not tuning_finished(study.get_trials(), 7)


# ---------------------------------------------------------------------------------------------
# A small tuning sweep, read back from the storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_tuning_sweep_same_budget_pruned_counted_divergence_recorded(tmp_path):
    suite = parse_suite(base_suite(seeds=[0], tuning=tuning_section(trials=4)), "s")
    out = tmp_path / "out"
    storage = journal(tmp_path)
    refs = ensure_sweep(storage, suite)
    for ref in refs:
        if ref.kind == "tune":
            study = optuna.load_study(study_name=ref.name, storage=storage)
            for lr in (DIVERGING_LR, GOOD_LR, BAD_LR):  # the fourth trial is TPE's
                study.enqueue_trial({"lr": lr})
    stats = Worker(suite, out, storage, index=0, threads=1).run()
    assert stats.failed == 0 and stats.pruned >= 2

    table = study_table(storage, suite).set_index("study")
    tune = table[table["kind"] == "tune"]
    assert list(tune["method"]) == ["local", "fedavg"]
    assert (tune["trials"] == 4).all() and (tune["done"] == 4).all()  # the same budget
    assert (tune["complete"] + tune["pruned"] + tune["failed"] == 4).all()
    assert (tune["pruned"] >= 1).all()  # pruned trials are counted in the budget
    assert (tune["diverged"] == 1).all()  # recorded as diverged, and the sweep went on
    runs = table[table["kind"] == "runs"]
    assert (runs["complete"] == runs["total"]).all() and set(runs["label"]) == {"tuned", "default"}

    for ref in refs:
        if ref.kind != "tune":
            continue
        trials = {
            t.params["lr"]: t
            for t in optuna.load_study(study_name=ref.name, storage=storage).trials
        }
        diverged = trials[DIVERGING_LR]
        assert diverged.state == TrialState.COMPLETE and diverged.value == POOR
        assert (
            diverged.user_attrs["diverged"] is True and "non-finite" in diverged.user_attrs["error"]
        )
        assert trials[BAD_LR].state == TrialState.PRUNED
        assert trials[GOOD_LR].state == TrialState.COMPLETE and trials[GOOD_LR].value > 0.1
        assert all(t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in trials.values())

    # the diverged tuning run is on disk, under tuning/, with its status
    tuned_runs = [m for _, m in iter_runs(out / "tuning")]
    assert sum(m["status"] == "diverged" for m in tuned_runs) == 2  # one per method
    assert all(m["mode"] == "tune" for m in tuned_runs)
    # reporting runs: tuned and default for every method and reporting seed, nothing else
    finals = [m for _, m in iter_runs(out)]
    assert sorted((m["method"], m["label"], m["seed"]) for m in finals) == [
        ("fedavg", "default", 0),
        ("fedavg", "tuned", 0),
        ("local", "default", 0),
        ("local", "tuned", 0),
    ]
    for m in finals:
        lr = m["protocol"]["optimizer"]["lr"]
        assert m["mode"] == "final"
        if m["label"] == "default":
            assert lr == 1e-3
        else:  # the best non-diverged tuning trial's configuration
            study = optuna.load_study(
                study_name=f"tq/tune/synthetic/{m['method']}", storage=storage
            )
            assert lr == best_trial(study.trials, 4).params["lr"] != 1e-3


def test_the_objective_never_builds_the_test_split_and_the_worker_survives_it(
    tmp_path, monkeypatch
):
    suite = parse_suite(base_suite(methods=["fedavg"], tuning=tuning_section(trials=1)), "s")
    original = Federation._evaluate

    def peeking(self, r):  # an engine bug: evaluation touches the test split
        for c in self.clients:
            c.test  # noqa: B018
        return original(self, r)

    monkeypatch.setattr(Federation, "_evaluate", peeking)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"lr": GOOD_LR})
    trial = study.ask()
    with pytest.raises(federation.TestSplitAccessError, match="not available while tuning"):
        tuning_objective(trial, suite, suite.datasets[0], suite.methods[0], tmp_path / "direct")
    assert not list(iter_runs(tmp_path / "direct" / "tuning"))

    # Through the worker: the tuning trial fails with the reason, the sweep is not stopped, and
    # the default run (final mode, test split allowed) still completes with the same engine.
    out = tmp_path / "out"
    storage = journal(tmp_path)
    Worker(suite, out, storage, index=0, threads=1).run()
    table = study_table(storage, suite).set_index("label")
    assert table.loc["", "failed"] == 1
    tune = optuna.load_study(study_name="tq/tune/synthetic/fedavg", storage=storage)
    assert "not available while tuning" in tune.trials[0].user_attrs["error"]
    assert table.loc["default", "complete"] == 1
    assert table.loc["tuned", "failed"] == 1  # no completed tuning trial: said, not invented
    tuned = optuna.load_study(study_name="tq/runs/synthetic/fedavg/tuned", storage=storage)
    assert "no tuning trial completed" in tuned.trials[0].user_attrs["error"]


def test_fixed_sweep_resumes_and_never_repeats_a_finished_run(tmp_path):
    suite = parse_suite(
        base_suite(seeds=[0, 1], protocol={**base_suite()["protocol"], "rounds": 2}), "s"
    )
    out = tmp_path / "out"
    storage = journal(tmp_path)
    first = Worker(suite, out, storage, index=0, threads=1, max_trials=2).run()
    assert first.trials == 2
    assert len(list(iter_runs(out))) == 2
    rest = Worker(suite, out, storage, index=1, threads=1).run()  # "after a restart"
    assert rest.trials == 2
    runs = list(iter_runs(out))
    assert len(runs) == 4 and len({m["run_key"] for _, m in runs}) == 4
    assert {m["label"] for _, m in runs} == {"fixed"}
    again = Worker(suite, out, storage, index=0, threads=1).run()
    assert again.trials == 0

    # a fresh storage over the same folder: every run is found DONE and skipped, not redone
    mtimes = {m["run_key"]: (d / "DONE").stat().st_mtime_ns for d, m in runs}
    fresh = open_storage(resolve_storage(f"journal:{tmp_path / 'other.journal'}", out))
    Worker(suite, out, fresh, index=0, threads=1).run()
    for ref in sweep_studies(suite):
        for t in optuna.load_study(study_name=ref.name, storage=fresh).trials:
            assert t.state == TrialState.COMPLETE and t.user_attrs["skipped"] is True
    assert {m["run_key"]: (d / "DONE").stat().st_mtime_ns for d, m in iter_runs(out)} == mtimes


def test_a_changed_suite_cannot_reuse_an_old_sweep(tmp_path):
    storage = journal(tmp_path)
    ensure_sweep(storage, parse_suite(base_suite(), "s"))
    changed = base_suite(protocol={**base_suite()["protocol"], "rounds": 3})
    with pytest.raises(SweepError, match="different suite configuration"):
        ensure_sweep(storage, parse_suite(changed, "s"))
    # the thread count is not part of a run's meaning: no error
    threads = base_suite(protocol={**base_suite()["protocol"], "threads": 2})
    ensure_sweep(storage, parse_suite(threads, "s"))


def test_racing_workers_cannot_overshoot_the_tuning_budget(tmp_path):
    suite = parse_suite(base_suite(methods=["fedavg"], tuning=tuning_section(trials=2)), "s")
    storage = journal(tmp_path)
    worker = Worker(suite, tmp_path / "out", storage, index=0, threads=1)
    study = worker.studies["tq/tune/synthetic/fedavg"]
    study.ask()
    study.ask()  # two peers took the whole budget a moment ago
    worker._tune(worker.refs[0])
    trials = study.get_trials()
    assert len(trials) == 3
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["over_budget"] is True
    row = study_table(storage, suite).iloc[0]
    assert (row["trials"], row["over_budget"]) == (2, 1)
    assert not list(iter_runs(tmp_path / "out" / "tuning"))  # nothing ran for it


# ---------------------------------------------------------------------------------------------
# Storage URLs, SQLite refusal, retries, the reaper
# ---------------------------------------------------------------------------------------------


def test_storage_urls(tmp_path):
    default = resolve_storage(None, tmp_path)
    assert default.kind == "journal" and default.url == str((tmp_path / "optuna.journal").resolve())
    assert resolve_storage(f"journal:{tmp_path}/a.journal", tmp_path).url == str(
        tmp_path / "a.journal"
    )
    assert resolve_storage("x/b.log", tmp_path).kind == "journal"
    pg = resolve_storage("postgresql://u:secret@db:5432/x", tmp_path)
    assert pg.url == "postgresql+psycopg://u:secret@db:5432/x" and pg.dialect == "postgresql"
    assert "secret" not in pg.display
    assert resolve_storage("postgres://db/x", tmp_path).url.startswith("postgresql+psycopg://")
    with pytest.raises(StorageConfigError, match="unsupported scheme 'redis'"):
        resolve_storage("redis://localhost", tmp_path)
    with pytest.raises(StorageConfigError, match="not a storage URL"):
        resolve_storage("runs/x.db", tmp_path)


def test_sqlite_is_refused_for_more_than_one_worker_with_the_reason(tmp_path):
    sqlite = resolve_storage(f"sqlite:///{tmp_path}/s.db", tmp_path)
    check_workers(sqlite, 1)  # one process is fine
    with pytest.raises(StorageConfigError, match="SQLite cannot be shared by 2 workers") as err:
        check_workers(sqlite, 2)
    assert "same enqueued trial to two" in str(err.value) and "journal" in str(err.value)
    with pytest.raises(StorageConfigError, match="joining worker"):
        check_workers(sqlite, 1, joining=True)
    check_workers(resolve_storage(None, tmp_path), 8)
    # through the command line, before anything runs
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(base_suite()))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pflbench.cli",
            "run",
            str(path),
            "--workers",
            "2",
            "--storage",
            f"sqlite:///{tmp_path}/s.db",
            "--out",
            str(tmp_path / "o"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "SQLite cannot be shared by 2 workers" in res.stderr
    assert not results_dir(tmp_path / "o").exists()


class _Flaky(optuna.storages.InMemoryStorage):
    """Loses the connection on some calls; for set_trial_state_values, after committing."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _lose(self) -> None:
        import sqlalchemy.exc

        self.failures -= 1
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("restart"))

    def get_all_trials(self, *a, **k):
        if self.failures > 0:
            self._lose()
        return super().get_all_trials(*a, **k)

    def set_trial_state_values(self, trial_id, state, values=None):
        done = super().set_trial_state_values(trial_id, state, values)
        if self.failures > 0:
            self._lose()  # committed, but the answer never arrived
        return done


def test_storage_calls_are_retried_through_a_lost_connection():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            import sqlalchemy.exc

            raise sqlalchemy.exc.OperationalError("x", {}, ConnectionResetError())
        return "ok"

    assert retry_call(flaky, first_wait_s=0.01, log=lambda m: None) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):  # a bad request is not retried
        retry_call(lambda: (_ for _ in ()).throw(ValueError("bad")), first_wait_s=0.01)

    inner = _Flaky(failures=0)
    storage = RetryingStorage(inner, timeout_s=10)
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask()
    inner.failures = 1  # the COMPLETE is committed, then the connection breaks: not an error
    study.tell(trial, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 0.5
    inner.failures = 2
    assert len(study.get_trials()) == 1  # read through two lost connections


def test_an_unreachable_database_is_retried_then_reported():
    # Nothing listens on port 9: the real driver error is recognised as transient and retried.
    logs: list[str] = []
    cfg = resolve_storage("postgresql+psycopg://u@127.0.0.1:9/x?connect_timeout=1", ".")
    from sqlalchemy.exc import OperationalError

    with pytest.raises(OperationalError, match="connection") as err:
        retry_call(
            lambda: open_storage(cfg, StorageOptions(retry_timeout_s=0.1)),
            timeout_s=5.0,
            first_wait_s=0.2,
            log=logs.append,
        )
    assert "127.0.0.1" in str(err.value) and "port 9" in str(err.value)  # the driver's own words
    assert logs and "unreachable" in logs[0]


def test_the_reaper_requeues_only_trials_of_dead_local_workers(tmp_path):
    storage = journal(tmp_path)
    study = optuna.create_study(storage=storage, direction="maximize", study_name="r")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    for worker, cell in [
        (f"{host}:{dead.pid}", "dead"),
        (f"{host}:{os.getpid()}", "alive"),
        (f"elsewhere:{dead.pid}", "remote"),
    ]:
        study.enqueue_trial({}, user_attrs={"cell": cell})
        t = study.ask()
        t.set_user_attr("worker", worker)
    trials = study.get_trials()
    assert reap(study, trials, pids=True) == 1
    assert reap(study, study.get_trials(), pids=True) == 0  # already done: nothing twice
    after = study.get_trials()
    assert [t.state for t in after[:3]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    retry = after[3]
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"cell": "dead"}
    assert retry.system_attrs["retry_history"] == [0]
    # with the pid check off (PostgreSQL relies on heartbeats) nothing is reaped
    t = copy.deepcopy(after[1])
    assert reap(study, [t], pids=False) == 0


def test_a_failed_run_is_recorded_then_requeued_by_the_next_run_command(tmp_path, monkeypatch):
    from pflbench import worker as worker_mod

    suite = parse_suite(
        base_suite(
            methods=["fedavg"], seeds=[0, 1], protocol={**base_suite()["protocol"], "rounds": 1}
        ),
        "s",
    )
    out = tmp_path / "out"
    real = worker_mod.execute

    def broken(spec, *a, **k):
        if spec.seed == 1:
            raise OSError("disk full")
        return real(spec, *a, **k)

    monkeypatch.setattr(worker_mod, "execute", broken)
    first = worker_mod.run_sweep(suite, "s.yaml", out, None, 1, quiet=True)
    row = first.table.iloc[0]
    assert (row["complete"], row["failed"], row["done"]) == (1, 1, 2)
    storage = open_storage(resolve_storage(None, out))
    (failed,) = [
        t
        for t in optuna.load_study(study_name=row["study"], storage=storage).trials
        if t.state == TrialState.FAIL
    ]
    assert failed.user_attrs["error"] == "OSError: disk full" and failed.user_attrs["seed"] == 1

    monkeypatch.setattr(worker_mod, "execute", real)
    second = worker_mod.run_sweep(suite, "s.yaml", out, None, 1, quiet=True)
    row = second.table.iloc[0]
    assert (row["complete"], row["failed"], row["trials"]) == (2, 0, 2)
    assert sorted(m["seed"] for _, m in iter_runs(out)) == [0, 1]
    assert second.skipped == 1  # seed 0 was already DONE: found, not redone


def test_the_shipped_tuning_suite_is_valid_and_searches_method_parameters():
    from pflbench.suite import load_suite

    suite = load_suite(Path(__file__).parent.parent / "suites" / "tune-quick.yaml")
    assert suite.tuning is not None and not set(suite.tuning.seeds) & set(suite.seeds)
    spaces = {m.key: set(search_space(suite.tuning, m)) for m in suite.methods}
    assert spaces["fedprox"] == spaces["fedavg"] | {"mu"}
    assert {r.name for r in sweep_studies(suite) if r.kind == "tune"} == {
        f"tune-quick/tune/prostate16/{m}" for m in ("local", "fedavg", "fedprox")
    }


def test_a_tuned_configuration_equal_to_the_default_is_reported_under_both_labels(tmp_path):
    """The label is not in the run key, so tuned == default is one run; both labels get rows."""
    import pandas as pd

    from pflbench.results import load_results
    from pflbench.runner import DataCache, RunSpec, execute

    suite = parse_suite(base_suite(seeds=[0]), "s")
    cache = DataCache()

    def spec(label):
        return RunSpec(
            suite.datasets[0], suite.methods[0], 0, suite.protocol, suite.model, label=label
        )

    key, manifest = execute(spec("default"), tmp_path, cache)
    assert manifest is not None and manifest["label"] == "default"
    alias, again = execute(spec("tuned"), tmp_path, cache)
    assert again is None and alias == f"{key}-tuned"  # copied, not trained again
    stamp = (results_dir(tmp_path) / alias / "DONE").stat().st_mtime_ns
    assert execute(spec("tuned"), tmp_path, cache) == (alias, None)  # written once
    assert (results_dir(tmp_path) / alias / "DONE").stat().st_mtime_ns == stamp
    assert execute(spec("default"), tmp_path, cache) == (key, None)
    cases = load_results(tmp_path, "cases")
    assert sorted(cases["label"].unique()) == ["default", "tuned"]
    by = {lab: g.drop(columns=["run_key", "label"]) for lab, g in cases.groupby("label")}
    pd.testing.assert_frame_equal(
        by["default"].reset_index(drop=True), by["tuned"].reset_index(drop=True)
    )
    manifests = {m["label"]: m for _, m in iter_runs(tmp_path)}
    assert manifests["tuned"]["alias_of"] == key and manifests["tuned"]["run_key"] == alias
