"""Faults a job system must survive without losing or falsifying anything (issue 21): torn
journals, diverged runs, concurrent runs on one folder, hostile suites and plugins, corrupt
results fed to the regression gate. Each test reproduces a failure seen on the old code."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml

from pflbench.results import (
    ResultsError,
    RunRecords,
    claim,
    clean_leftovers,
    diverged_runs,
    iter_runs,
    load_results,
    results_dir,
    write_run,
)
from pflbench.storage import JournalError, open_storage, repair_journal, resolve_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
TESTS = Path(__file__).resolve().parent


def small_suite(**over: Any) -> dict[str, Any]:
    """Two sites of 16 px, 2 rounds: about a second per run on one thread."""
    raw: dict[str, Any] = {
        "name": "faults",
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
        "methods": ["fedavg"],
        "seeds": [0, 1],
        "model": {"name": "unet", "options": {"base": 4, "depth": 2}},
        "protocol": {
            "rounds": 2,
            "batch_size": 4,
            "threads": 1,
            "device": "cpu",
            "surface_metrics": False,
        },
    }
    raw.update(over)
    return raw


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pflbench.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(TESTS), **(env or {})},
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------
# Torn journal
# ---------------------------------------------------------------------------------------------


def _journal_with_history(out: Path, n: int = 5) -> tuple[Path, int]:
    """A journal holding one study with ``n`` finished trials; returns (path, trial count)."""
    storage = open_storage(resolve_storage(None, out))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for i in range(n):
        t = study.ask()
        study.tell(t, float(i))
    return out / "optuna.journal", n


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(resolve_storage(None, out))
    return optuna.load_study(study_name="s", storage=storage).get_trials()


def test_a_torn_journal_tail_is_cut_and_kept_and_the_next_append_works(tmp_path):
    path, n = _journal_with_history(tmp_path)
    size = path.stat().st_size
    os.truncate(path, size - 7)  # a kill or a full disk mid-append (the reproduction)
    storage = open_storage(resolve_storage(None, tmp_path))
    study = optuna.load_study(study_name="s", storage=storage)
    study.tell(study.ask(), 99.0)  # the append that used to glue onto the torn line
    trials = _trials(tmp_path)  # a fresh reader: every record parses
    # the torn record was the last tell (COMPLETE of trial n-1): it is lost, nothing else
    assert [t.value for t in trials[: n - 1]] == [float(i) for i in range(n - 1)]
    assert trials[-1].value == 99.0
    torn = Path(str(path) + ".torn").read_bytes()
    assert b"torn last record" in torn and b'{"op_code"' in torn  # kept, not thrown away


def test_a_journal_glued_by_an_older_version_is_split_back_into_whole_records(tmp_path):
    path, n = _journal_with_history(tmp_path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # a torn record followed by a whole one on the same line: what the old backend wrote
    glued = lines[-2][: len(lines[-2]) // 2] + lines[-2]
    path.write_bytes(b"\n".join(lines[:-2] + [glued, b""]))
    assert len(_trials(tmp_path)) == n
    assert repair_journal(path) == 0  # already repaired when opened


def test_a_journal_damaged_mid_file_is_a_one_line_error_naming_file_and_recovery(tmp_path):
    path, _ = _journal_with_history(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"garbage that is no record"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError) as err:
        open_storage(resolve_storage(None, tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "line 3" in msg and "mv " in msg


def test_a_full_disk_mid_append_leaves_no_torn_record(tmp_path, monkeypatch):
    path, n = _journal_with_history(tmp_path)
    storage = open_storage(resolve_storage(None, tmp_path))
    study = optuna.load_study(study_name="s", storage=storage)
    before = path.read_bytes()
    import pflbench.storage as storage_mod

    class FullDisk:  # the device fills up halfway through the record
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.f.write(bytes(b)[: len(b) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode="r", *a, **kw):
        f = open(file, mode, *a, **kw)
        return FullDisk(f) if str(file) == str(path) and "a" in mode else f

    monkeypatch.setattr(storage_mod, "open", fake_open, raising=False)
    with pytest.raises(OSError, match="No space"):
        study.ask()
    monkeypatch.undo()
    assert path.read_bytes() == before  # the half record was undone
    study = optuna.load_study(study_name="s", storage=open_storage(resolve_storage(None, tmp_path)))
    study.tell(study.ask(), 7.0)
    assert [t.value for t in _trials(tmp_path)] == [*map(float, range(n)), 7.0]


def test_a_full_disk_when_one_run_is_written_fails_that_run_only_and_a_rerun_redoes_it(
    tmp_path, monkeypatch
):
    """Seed 1's result write hits ENOSPC halfway (two tables written, the third refused): the
    sweep says so in one line naming the run and its folder, keeps the trained results in the
    fallback folder, leaves nothing under --out that reads as finished, finishes seeds 0 and 2,
    exits 1; the same command then trains seed 1 alone."""
    from click.testing import CliRunner

    import pflbench.results as results_mod
    from pflbench.cli import main

    suite = tmp_path / "s.yaml"
    raw = small_suite(seeds=[0, 1, 2])
    raw["protocol"]["rounds"] = 1
    suite.write_text(yaml.safe_dump(raw))
    out, fallback = tmp_path / "out", tmp_path / "fallback"
    monkeypatch.setenv("PFLBENCH_FALLBACK", str(fallback))
    real = results_mod._write_file
    refused: list[Path] = []

    def full_disk(path: Path, data: bytes) -> None:
        if path.is_relative_to(out) and "-s1-" in path.parent.name and path.name == "cases.parquet":
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(results_mod, "_write_file", full_disk)
    args = ["run", str(suite), "--out", str(out), "--quiet", "--no-report"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert len(refused) == 1
    done = {m["seed"]: d for d, m in iter_runs(out)}
    assert sorted(done) == [0, 2]
    leftovers = [d.name for d in results_dir(out).iterdir() if d.name != ".locks"]
    assert sorted(leftovers) == sorted(d.name for d in done.values())  # no half-written seed 1
    lines = [ln for ln in res.output.splitlines() if "could not write run" in ln]
    assert len(lines) == 1, res.output
    key = lines[0].split("could not write run ")[1].split(" ")[0]
    assert "-s1-" in key and f"to {results_dir(out) / key}: No space left on device" in lines[0]
    assert str(fallback / "results" / key) in lines[0]
    # the trained run is in the fallback folder, complete and readable
    saved = load_results(fallback)
    assert set(saved["seed"]) == {1} and saved["dice"].notna().any()
    assert "1 run(s) could not be written" in res.output

    monkeypatch.undo()
    before = {s: (d / "DONE").stat().st_mtime_ns for s, d in done.items()}
    again = CliRunner().invoke(main, args, env={"PFLBENCH_FALLBACK": str(fallback)})
    assert again.exit_code == 0, again.output
    assert "3 runs (2 already done)" in again.output
    after = {m["seed"]: d for d, m in iter_runs(out)}
    assert sorted(after) == [0, 1, 2] and after[1].name == key
    assert {s: (after[s] / "DONE").stat().st_mtime_ns for s in (0, 2)} == before


@pytest.mark.slow
def test_cli_names_the_damaged_journal_in_one_line(tmp_path):
    out = tmp_path / "out"
    _journal_with_history(out)
    path = out / "optuna.journal"
    path.write_bytes(b"not json\n" + path.read_bytes())
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(small_suite(seeds=[0])))
    res = cli("run", str(suite), "--out", str(out), "--quiet", "--no-report", "--workers", "2")
    assert res.returncode == 2, res.stderr
    err = [line for line in res.stderr.splitlines() if "error" in line]
    assert err and str(path) in " ".join(res.stderr.split()) and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# Diverged runs
# ---------------------------------------------------------------------------------------------

BREAKS = "fault_plugins:BreaksAt"


def _run_in_process(out: Path, raw: dict[str, Any], monkeypatch) -> None:
    from pflbench.runner import run_suite
    from pflbench.suite import parse_suite

    monkeypatch.syspath_prepend(str(TESTS))
    run_suite(parse_suite(raw, "s.yaml"), out)


@pytest.fixture(scope="module")
def diverged_dir(tmp_path_factory) -> Path:
    """fedavg; `late` diverges in round 2 for seed 1 only; `early` in round 1 for every seed."""
    from pflbench.runner import run_suite
    from pflbench.suite import parse_suite

    sys.path.insert(0, str(TESTS))
    out = tmp_path_factory.mktemp("diverged")
    methods = [
        "fedavg",
        {"name": BREAKS, "label": "late", "params": {"at": 2, "seed": 1}},
        {"name": BREAKS, "label": "early", "params": {"at": 1}},
    ]
    run_suite(parse_suite(small_suite(methods=methods), "s.yaml"), out)
    return out


@pytest.mark.slow
def test_diverged_runs_are_listed_with_round_and_reason(diverged_dir):
    div = diverged_runs(diverged_dir).sort_values(["method", "seed"])
    got = list(zip(div["method"], div["seed"], div["round"], strict=True))
    assert got == [("early", 0, 1), ("early", 1, 1), ("late", 1, 2)]
    assert div["reason"].str.contains("non-finite loss").all()


@pytest.mark.slow
def test_diverged_runs_stay_out_of_the_tables_and_the_summary(diverged_dir):
    from pflbench.summary import dice_table, write_summary

    cases = load_results(diverged_dir, "cases")
    assert set(zip(cases["method"], cases["seed"], strict=True)) == {
        ("fedavg", 0),
        ("fedavg", 1),
        ("late", 0),
    }
    assert len(load_results(diverged_dir, "cases", diverged=True)) > len(cases)
    table, _ = dice_table(diverged_dir)
    assert set(table.index.get_level_values("method")) == {"fedavg", "late"}
    late = load_results(diverged_dir, "cases").query("method == 'late' and selection == 'best'")
    late_seed0 = late[late["split"] == "test"].groupby("client")["dice"].mean().mean()
    assert table.loc[(table.index[0][0], "late"), "mean"] == f"{late_seed0:.3f}"  # one seed: no ±
    text = write_summary(diverged_dir).read_text()
    assert "## Diverged runs (3, left out of the table above)" in text
    assert "late · seed 1: diverged in round 2" in text


@pytest.mark.slow
def test_the_report_lists_diverged_runs_and_never_crashes_on_them(diverged_dir, tmp_path):
    from pflbench.report import ReportError, build_report

    rep = build_report(diverged_dir, out=tmp_path / "rep")
    md = (rep / "report.md").read_text()
    assert "## Diverged runs (3)" in md and "early · seed 0: diverged in round 1" in md
    assert "Diverged runs (3)" in (rep / "report.html").read_text()
    # a folder whose only run diverged in round 1 (an empty cases table): a clear error
    only = tmp_path / "only"
    only.mkdir()
    key = next(d for d, m in iter_runs(diverged_dir) if m["method"] == "early")
    import shutil

    shutil.copytree(key, results_dir(only) / key.name)
    empty = pd.read_parquet(results_dir(only) / key.name / "cases.parquet")
    assert empty.empty and empty["dice"].dtype == "float64"  # typed, not object
    with pytest.raises(ReportError, match="every finished run diverged .*round 1"):
        build_report(only)
    res = cli("report", str(only))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "every finished run diverged" in " ".join(res.stderr.split())


def test_calibration_leaves_diverged_seeds_out(tmp_path):
    from test_regress import fake_run

    from pflbench.regress import calibrate

    for seed, dice in ((0, 0.70), (1, 0.72), (2, 0.08)):
        fake_run(tmp_path, "fedavg", seed, {"s1": dice}, status="diverged" if seed == 2 else "ok")
    base = calibrate(tmp_path)
    entry = base["datasets"]["ds"]["fedavg"]
    assert entry["macro"]["values"] == {"0": 0.70, "1": 0.72}
    assert entry["diverged"] == [2]


# ---------------------------------------------------------------------------------------------
# Finished results: never replaced, checked when read; the gate refuses what it cannot trust
# ---------------------------------------------------------------------------------------------


def _records(value: float) -> RunRecords:
    cases = pd.DataFrame(
        {
            "selection": ["best"],
            "round": [1],
            "client": ["a"],
            "split": ["test"],
            "case_id": ["c"],
            "structure": ["x"],
            "dice": [value],
            "iou": [value],
            "hd95": [1.0],
            "assd": [1.0],
        }
    )
    manifest = {"run_key": "k", "dataset": "d", "method": "m", "label": "fixed", "seed": 0}
    return RunRecords(pd.DataFrame(), pd.DataFrame(), cases, manifest)


def test_a_done_folder_is_never_replaced_and_crash_leftovers_are_cleaned(tmp_path):
    first = write_run(tmp_path, "k", _records(0.5))
    done = (first / "DONE").stat().st_mtime_ns
    write_run(tmp_path, "k", _records(0.9))  # a racing second writer of the same run
    assert load_results(tmp_path)["dice"].tolist() == [0.5]
    assert (first / "DONE").stat().st_mtime_ns == done
    assert not [d for d in results_dir(tmp_path).iterdir() if d.name.startswith(".k.")]
    leftover = results_dir(tmp_path) / ".k.crashed"
    leftover.mkdir()
    (leftover / "rounds.parquet").write_bytes(b"half")
    with claim(tmp_path, "k"):  # a live writer holds the run: its folder stays
        assert clean_leftovers(tmp_path) == 0
    assert leftover.exists()
    assert clean_leftovers(tmp_path) == 1 and not leftover.exists()


def test_results_are_readable_by_others_whatever_mkdtemp_does(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_run(tmp_path, "k", _records(0.5))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("damage", ["truncate", "rewrite", "manifest"])
def test_a_damaged_table_is_an_error_naming_the_file_and_the_repair(tmp_path, damage):
    path = write_run(tmp_path, "k", _records(0.5))
    table = path / "cases.parquet"
    if damage == "truncate":
        table.write_bytes(table.read_bytes()[:-20])
    elif damage == "rewrite":  # valid Parquet, other rows: only the recorded hash tells
        pd.concat([_records(0.5).cases] * 2).to_parquet(table, index=False)
    else:
        (path / "manifest.json").write_text("{garbage")
    with pytest.raises(ResultsError) as err:
        load_results(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "delete" in msg and "\n" not in msg


@pytest.fixture
def gate(tmp_path):
    """A three-seed calibration folder, its baseline, and a copy to damage."""
    import shutil

    from test_regress import CALIBRATION, write_calibration

    from pflbench.regress import calibrate, write_baseline

    calib = write_calibration(tmp_path / "calib")
    base = write_baseline(calibrate(calib), tmp_path / "b.json")
    now = tmp_path / "now"
    shutil.copytree(calib, now)
    assert len(CALIBRATION["fedavg"]) == 3
    return now, base


def _gate(now: Path, base: Path) -> tuple[int, str]:
    from rich.console import Console

    from pflbench.regress import main_regress

    con = Console(record=True, width=400, force_terminal=False)
    rc = main_regress(now, base, console=con)
    return rc, con.export_text()


def test_the_gate_refuses_a_run_folder_missing_a_seed(gate):
    import shutil

    now, base = gate
    assert _gate(now, base)[0] == 0
    victim = next(d for d, m in iter_runs(now) if m["method"] == "fedbn" and m["seed"] == 1)
    shutil.rmtree(victim)  # the issue: one DONE deleted → "passed: 12 ok"
    rc, text = _gate(now, base)
    assert rc == 2 and "incomplete" in text and "ds/fedbn seed(s) 1" in text


def test_the_gate_refuses_a_rewritten_or_truncated_table(gate):
    now, base = gate
    victim = next(d for d, m in iter_runs(now) if m["method"] == "fedavg")
    cases = pd.read_parquet(victim / "cases.parquet")
    cases[cases["client"] == "s1"].to_parquet(victim / "cases.parquet")  # one site's rows
    rc, text = _gate(now, base)
    assert rc == 2 and "cases.parquet" in text and "Traceback" not in text
    (victim / "cases.parquet").write_bytes(b"PAR1 not really")
    rc, text = _gate(now, base)
    assert rc == 2 and str(victim.name) in text


# ---------------------------------------------------------------------------------------------
# Concurrent invocations on one folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_on_one_folder_run_every_cell_once_and_done_never_vanishes(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(small_suite(methods=["fedavg", "local"])))
    out = tmp_path / "out"
    cmd = ["run", str(suite), "--out", str(out), "--quiet", "--no-report"]
    seen: dict[str, bool] = {}
    vanished: list[str] = []
    stop = threading.Event()

    def monitor() -> None:  # a reader polling while both write
        while not stop.is_set():
            base = results_dir(out)
            names = [d.name for d in base.iterdir()] if base.exists() else []
            now = {n for n in names if not n.startswith(".") and (base / n / "DONE").exists()}
            vanished.extend(k for k in seen if k not in now)
            seen.update(dict.fromkeys(now, True))
            time.sleep(0.01)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pflbench.cli", *cmd],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    stop.set()
    watcher.join()
    assert all(p.returncode == 0 for p in procs), outputs
    import re

    done = [re.search(r"(\d+) runs \((\d+) already done\)", o[1]) for o in outputs]
    trained = sum(int(m.group(1)) - int(m.group(2)) for m in done)
    assert trained == 4  # 2 methods × 2 seeds, each trained by exactly one of the two
    assert len(list(iter_runs(out))) == 4 and not vanished


def test_racing_healers_enqueue_each_missing_cell_once(tmp_path):
    from optuna.trial import TrialState

    from pflbench.suite import parse_suite
    from pflbench.tuning import _alive_cells, ensure_sweep

    suite = parse_suite(small_suite(seeds=[0, 1, 2]), "s.yaml")
    races, doubles = 10, 0
    for race in range(races):
        out = tmp_path / f"r{race}"
        storage = open_storage(resolve_storage(None, out))
        (ref,) = ensure_sweep(storage, suite)
        study = optuna.load_study(study_name=ref.name, storage=storage)
        for t in study.get_trials()[:2]:  # two cells whose retries are used up
            storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        barrier = threading.Barrier(2)

        def heal(out: Path = out, barrier: threading.Barrier = barrier) -> None:
            s = open_storage(resolve_storage(None, out))
            barrier.wait()
            ensure_sweep(s, suite, heal=True)

        threads = [threading.Thread(target=heal) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        trials = study.get_trials()
        waiting = [t.user_attrs["cell"] for t in trials if t.state == TrialState.WAITING]
        doubles += len(waiting) != len(set(waiting))
        assert _alive_cells(trials) == {c["cell"] for c in ref.cells(suite)}
    assert doubles == 0, f"{doubles} of {races} races enqueued a cell twice"


# ---------------------------------------------------------------------------------------------
# Hostile suites and plugins
# ---------------------------------------------------------------------------------------------


def test_a_suite_cannot_name_a_callable_that_is_not_a_plugin_class(tmp_path, monkeypatch):
    from fault_plugins import NotAMethod

    from pflbench.suite import SuiteError, parse_suite

    monkeypatch.syspath_prepend(str(TESTS))
    marker = tmp_path / "ran"
    hostile = {"name": "subprocess:getoutput", "params": {"cmd": f"touch {marker}"}}
    for methods in ([hostile], [{"name": "fault_plugins:NotAMethod"}]):
        with pytest.raises(SuiteError, match=r"methods\[0\]: .*not a subclass of pflbench"):
            parse_suite(small_suite(methods=methods), "s.yaml")
    assert not marker.exists() and NotAMethod.built == 0
    for key, value in (("model", "os:system"), ("datasets", ["shutil:rmtree"])):
        with pytest.raises(SuiteError, match="not a subclass"):
            parse_suite(small_suite(**{key: value}), "s.yaml")


@pytest.mark.parametrize("label", [".hidden", "../x", "a/b", "x" * 300, "-dash", "sp ace"])
def test_labels_that_would_hide_or_break_result_folders_are_refused(label):
    from pflbench.suite import SuiteError, parse_suite

    for key in ("methods", "datasets"):
        raw = small_suite()
        entry = raw[key][0]
        raw[key] = [{**({"name": entry} if isinstance(entry, str) else entry), "label": label}]
        with pytest.raises(SuiteError, match=rf"s.yaml: {key}\[0\]\.label: label"):
            parse_suite(raw, "s.yaml")


def _shadow(root: Path) -> Path:
    """An installed distribution `evil-pfl` 6.6 that registers a method called `fedavg`."""
    (root / "evil_pfl.py").write_text(
        "from pflbench.method import Method\n\nclass FedAvg(Method):\n    name = 'fedavg'\n"
    )
    info = root / "evil_pfl-6.6.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-pfl\nVersion: 6.6\n")
    (info / "entry_points.txt").write_text("[pflbench.methods]\nfedavg = evil_pfl:FedAvg\n")
    return root


def test_a_plugin_shadowing_a_builtin_is_an_error_naming_both_unless_one_is_selected(
    tmp_path, monkeypatch
):
    from pflbench.registry import Registry, RegistryError
    from pflbench.runner import RunSpec
    from pflbench.suite import parse_suite

    monkeypatch.syspath_prepend(str(_shadow(tmp_path)))
    reg = Registry("methods")
    with pytest.raises(RegistryError) as err:
        reg.load("fedavg")
    msg = str(err.value)
    assert "pflbench 0.1.0 (pflbench.methods.fedavg:FedAvg)" in msg
    assert "evil-pfl 6.6 (evil_pfl:FedAvg)" in msg and "'fedavg@evil-pfl'" in msg
    assert reg.load("fedavg@evil-pfl").__module__ == "evil_pfl"
    assert reg.load("fedavg@pflbench").__module__ == "pflbench.methods.fedavg"
    # the registry the suites use: a suite naming plain `fedavg` is refused, a selection runs
    import pflbench.registry as registry_mod

    monkeypatch.setattr(registry_mod, "_REGISTRIES", {})
    with pytest.raises(ValueError, match="registered twice"):
        parse_suite(small_suite(), "s.yaml")
    specs = {}
    for choice in ("fedavg@pflbench", "fedavg@evil-pfl"):
        suite = parse_suite(small_suite(methods=[choice]), "s.yaml")
        specs[choice] = RunSpec(suite.datasets[0], suite.methods[0], 0, suite.protocol, suite.model)
    evil = specs["fedavg@evil-pfl"]
    assert evil.plugins()["method"] == {
        "distribution": "evil-pfl",
        "version": "6.6",
        "value": "evil_pfl:FedAvg",
    }
    assert evil.semantic("fp")["plugins"]["method"]["distribution"] == "evil-pfl"
    assert "plugins" not in specs["fedavg@pflbench"].semantic("fp")  # built-in keys unchanged
    assert evil.key("fp") != specs["fedavg@pflbench"].key("fp")


# ---------------------------------------------------------------------------------------------
# Secrets and signals
# ---------------------------------------------------------------------------------------------


def test_child_workers_get_the_storage_url_by_environment_not_argv(tmp_path):
    import psutil

    from pflbench.pool import start_children, stop_children

    url = "postgresql+psycopg://bench:s3cret-pw@db.example:5432/sweeps"
    procs = start_children(str(tmp_path / "s.yaml"), tmp_path, url, 2)
    try:
        (child,) = procs
        proc = psutil.Process(child.pid)
        # Popen returns once exec has begun; the kernel fills in the new image's command line
        # and environment a moment later, and until then /proc reads them as empty (a CI run
        # saw environ() == {}). Wait for the worker's own command line before reading either.
        deadline = time.monotonic() + 30
        while "worker" not in proc.cmdline() and time.monotonic() < deadline:
            time.sleep(0.01)
        cmdline = proc.cmdline()
        assert "worker" in cmdline, cmdline
        assert not any("s3cret" in arg for arg in cmdline)
        assert proc.environ().get("PFLBENCH_STORAGE") == url
    finally:
        stop_children(procs)


# ---------------------------------------------------------------------------------------------
# PostgreSQL first start
# ---------------------------------------------------------------------------------------------

PG_URL = os.environ.get("PFLBENCH_TEST_PG_URL")


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.skipif(not PG_URL, reason="PFLBENCH_TEST_PG_URL is not set (no PostgreSQL server)")
def test_three_workers_started_at_once_on_a_fresh_database_all_finish(tmp_path):
    import uuid

    import sqlalchemy
    from sqlalchemy.engine import make_url
    from test_workers import assert_every_run_once, worker_env, write_suite

    from pflbench.suite import load_suite

    name = f"pflbench_fresh_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        suite_path = write_suite(tmp_path, "pgfresh", seeds=(0, 1), methods=("fedavg",), rounds=1)
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "pflbench.cli", "worker", str(suite_path), "--out", str(out)]
        cmd += ["--threads", "1", "--quiet"]
        env = worker_env(PFLBENCH_STORAGE=url)
        procs = [
            subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)
        ]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errs
        assert not any("UniqueViolation" in e for e in errs)
        storage = open_storage(resolve_storage(url, out))
        assert_every_run_once(out, storage, load_suite(suite_path))
    finally:
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="PFLBENCH_TEST_PG_URL is not set (no PostgreSQL server)")
def test_a_wrong_database_is_reported_at_once_not_retried_like_an_outage():
    from sqlalchemy.engine import make_url

    from pflbench.storage import StorageOptions

    url = make_url(PG_URL).set(database="no_such_db_pflbench").render_as_string(False)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="does not exist"):
        open_storage(resolve_storage(url, "."), StorageOptions(retry_timeout_s=60))
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_sigterm_to_a_run_with_workers_stops_its_children_and_exits_130(tmp_path):
    import psutil

    suite = tmp_path / "s.yaml"
    raw = small_suite(seeds=[0, 1, 2, 3])
    raw["protocol"]["rounds"] = 6
    suite.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pflbench.cli", "run", str(suite), "--out", str(out)]
    cmd += ["--quiet", "--no-report", "--workers", "2"]
    parent = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    children: list[psutil.Process] = []
    journal = out / "optuna.journal"
    while time.monotonic() < deadline:  # both workers are taking trials
        children = psutil.Process(parent.pid).children()
        if children and journal.exists() and b'"worker"' in journal.read_bytes():
            break
        time.sleep(0.2)
    assert children, "no child worker started"
    parent.send_signal(subprocess.signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 130, err
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"children still running: {alive}"
    # nothing lost: the same command finishes the sweep, every cell DONE once
    cmd_again = cmd[:]
    res = subprocess.run(cmd_again, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(m["seed"] for _, m in iter_runs(out)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_finished_runs(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(small_suite(seeds=[0, 1, 2])))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pflbench.cli", "run", str(suite), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--quiet", "--no-report"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(iter_runs(out)):
        time.sleep(0.1)
    proc.send_signal(subprocess.signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(iter_runs(out))


# ---------------------------------------------------------------------------------------------
# Suite files: one-line errors for what YAML allows and a suite never needs
# ---------------------------------------------------------------------------------------------

HOSTILE_YAML = {
    "duplicate key": (b"name: a\nname: b\n", r":2:1: malformed YAML: duplicate key 'name'"),
    "alias bomb": (
        b"name: x\nmethods: [{name: fedavg, params: &a {p: [1, 1, 1, 1, 1, 1, 1, 1, 1]}}]\n"
        b"b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
        "anchors and aliases",
    ),
    "deep nesting": (b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper than 64"),
    "bad utf-8": (b"name: caf\xe9\n", r":1: not UTF-8 text \(byte 0xe9"),
    "non-mapping protocol": (
        b"name: a\nprotocol: [1]\ndatasets: [synthetic]\nmethods: [fedavg]\nseeds: [0]\n",
        r"protocol: Input should be a valid dictionary",
    ),
    "workers": (
        yaml.safe_dump(small_suite(workers=100000)).encode(),
        r"workers: must be ≥ 1 and ≤ 256, or 'auto'; got 100000",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_suite_files_are_one_line_errors(tmp_path, case):
    from pflbench.suite import SuiteError, load_suite

    data, pattern = HOSTILE_YAML[case]
    path = tmp_path / "s.yaml"
    path.write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(SuiteError, match=pattern) as err:
        load_suite(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - t0 < 5  # no alias expansion


def test_cli_refuses_a_non_mapping_protocol_without_a_traceback(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(HOSTILE_YAML["non-mapping protocol"][0])
    res = cli("run", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "protocol" in res.stderr


# ---------------------------------------------------------------------------------------------
# Fuzzing suite files: zero tracebacks, every failure one line per problem naming the file
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["fedavg", "synthetic", "unet", ".x", "a/b", "os:system", "auto", "", "-1"]),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_suites(draw) -> dict[str, Any]:
    import copy

    raw = copy.deepcopy(small_suite(methods=["fedavg", {"name": "fedprox", "params": {"mu": 0.1}}]))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)[1:]
        path = draw(st.sampled_from(paths))
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        if not isinstance(parent, dict | list):
            continue
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_VALUES)
    return raw


@settings(
    max_examples=int(os.environ.get("PFLBENCH_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=mutated_suites())
def test_fuzzed_suites_load_or_fail_with_one_line_per_problem(tmp_path, raw):
    from pflbench.suite import SuiteError, load_suite

    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        load_suite(path)
    except SuiteError as exc:
        lines = str(exc).splitlines()
        assert lines and all(line.startswith(str(path)) for line in lines), str(exc)
        assert all(len(line) < 2000 for line in lines)


def _write_forever(out: str) -> None:  # in a child process, killed at a random moment
    i = 0
    while True:
        write_run(out, f"k{i % 50}", _records(i / 100))
        i += 1


def test_random_sigkills_mid_write_never_leave_a_partial_run_readable(tmp_path):
    import multiprocessing
    import random
    import signal

    rng = random.Random(21)
    ctx = multiprocessing.get_context("fork")
    kills = 0
    for _ in range(20):
        proc = ctx.Process(target=_write_forever, args=(str(tmp_path),))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
        # every run a reader sees is whole: load_results checks each table against its hash
        loaded = load_results(tmp_path)
        assert len(loaded) == len(list(iter_runs(tmp_path)))  # one case row per run
    assert kills == 20
    clean_leftovers(tmp_path)
    names = [d.name for d in results_dir(tmp_path).iterdir()]
    assert not [n for n in names if n.startswith(".k")]  # crash leftovers removed
    assert all((results_dir(tmp_path) / n / "DONE").exists() for n in names if n != ".locks")
