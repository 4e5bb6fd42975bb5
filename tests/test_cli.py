"""The command line end to end: run, resume after SIGKILL, plugins in suites, list/show/check."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from test_registry import make_plugin

from pflbench.results import iter_runs, load_results

TINY = {
    "name": "tiny",
    "datasets": [
        {
            "name": "synthetic",
            "label": "fundus",
            "options": {"flavour": "fundus", "size": 16, "images_per_site": [6, 6, 8]},
        }
    ],
    "methods": ["local", "fedavg"],
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


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pflbench.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=timeout,
    )


def write_suite(tmp_path: Path, **over) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump({**TINY, **over}))
    return p


def test_run_prints_dice_per_method_and_site_and_is_bitwise_reproducible(tmp_path):
    suite = write_suite(tmp_path)
    res = cli("run", str(suite), "--out", str(tmp_path / "a"), "--quiet", "--no-report")
    assert res.returncode == 0, res.stderr
    for token in ("fedavg", "local", "site1", "site2", "site3", "mean", "±"):
        assert token in res.stdout
    assert (tmp_path / "a" / "summary.md").read_text().count("|") > 10
    manifests = [m for _, m in iter_runs(tmp_path / "a")]
    assert len(manifests) == 4
    m = manifests[0]
    for key in (
        "git",
        "versions",
        "threads",
        "device",
        "data_fingerprint",
        "timings",
        "peak_memory_mb",
        "budget",
        "partition_sizes",
    ):
        assert key in m, key
    assert m["threads"] == 1
    # which processor made the numbers (they are bitwise reproducible on that processor only)
    assert m["processor"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["processor"]["machine"] == platform.machine()
    # the second time through two worker processes and the storage queue: same keys, same bits
    res2 = cli(
        "run", str(suite), "--out", str(tmp_path / "b"), "-q", "--no-report", "--workers", "2"
    )
    assert res2.returncode == 0, res2.stderr
    assert (tmp_path / "b" / "optuna.journal").exists()
    a = load_results(tmp_path / "a", "rounds").sort_values(
        ["run_key", "round", "client", "split", "structure", "metric"]
    )
    b = load_results(tmp_path / "b", "rounds").sort_values(
        ["run_key", "round", "client", "split", "structure", "metric"]
    )
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    # and the per-case table (best and last selections, val and test) bit for bit as well
    order = ["run_key", "selection", "client", "split", "case_id", "structure"]
    ca = load_results(tmp_path / "a", "cases").sort_values(order).reset_index(drop=True)
    cb = load_results(tmp_path / "b", "cases").sort_values(order).reset_index(drop=True)
    assert set(ca["selection"]) == {"best", "last"} and set(ca["split"]) == {"val", "test"}
    pd.testing.assert_frame_equal(ca, cb)


def test_second_run_skips_done_runs(tmp_path):
    suite = write_suite(tmp_path, seeds=[0])
    out = tmp_path / "o"
    assert cli("run", str(suite), "--out", str(out), "-q", "--no-report").returncode == 0
    stamps = {d.name: (d / "DONE").stat().st_mtime_ns for d, _ in iter_runs(out)}
    res = cli("run", str(suite), "--out", str(out), "-q", "--no-report")
    assert "(2 already done)" in res.stderr
    assert stamps == {d.name: (d / "DONE").stat().st_mtime_ns for d, _ in iter_runs(out)}


def test_sigkill_mid_sweep_then_resume_runs_everything_once(tmp_path):
    suite = write_suite(tmp_path, seeds=[0, 1, 2], protocol={**TINY["protocol"], "rounds": 3})
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pflbench.cli",
            "run",
            str(suite),
            "--out",
            str(out),
            "-q",
            "--no-report",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(iter_runs(out))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {d.name: (d / "DONE").stat().st_mtime_ns for d, _ in iter_runs(out)}
    assert 2 <= len(before) < 6, "the kill should land mid-sweep"
    res = cli("run", str(suite), "--out", str(out), "-q", "--no-report")
    assert res.returncode == 0, res.stderr
    after = {d.name: (d / "DONE").stat().st_mtime_ns for d, _ in iter_runs(out)}
    assert len(after) == 6
    assert all(after[k] == v for k, v in before.items()), "a finished run was redone"
    assert f"({len(before)} already done)" in res.stderr
    leftovers = [p for p in (out / "results").iterdir() if p.name.startswith(".")]
    assert all(not (p / "DONE").exists() for p in leftovers)


def test_third_party_method_runs_in_a_suite(tmp_path):
    root = make_plugin(tmp_path / "site")
    ds = {
        **TINY["datasets"][0],
        "options": {"flavour": "fundus", "size": 16, "images_per_site": [6, 6, 6]},
    }
    suite = write_suite(
        tmp_path,
        datasets=[ds],
        methods=["halfway", {"name": "halfway", "label": "halfway-1", "params": {"steps": 1}}],
        seeds=[0],
    )
    res = cli(
        "run",
        str(suite),
        "--out",
        str(tmp_path / "o"),
        "-q",
        "--no-report",
        env={"PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr
    manifests = {m["method"]: m for _, m in iter_runs(tmp_path / "o")}
    assert manifests["halfway"]["params"] == {"steps": 2}
    # 3 clients × 2 rounds × steps × batch 4 (each site has 4 training images)
    assert manifests["halfway"]["budget"]["local"] == 3 * 2 * 2 * 4
    assert manifests["halfway-1"]["budget"]["local"] == 3 * 2 * 1 * 4


def test_bad_suite_exits_with_one_line_per_problem(tmp_path):
    suite = write_suite(tmp_path, methods=["fedavgg"])
    res = cli("run", str(suite), "--out", str(tmp_path / "o"), "-q")
    assert res.returncode == 2
    assert "did you mean 'fedavg'" in res.stderr and "Traceback" not in res.stderr


def test_show_and_list(tmp_path):
    res = cli("show", "fedavg")
    assert res.returncode == 0 and "McMahan" in res.stdout
    res = cli("list", "datasets")
    assert "synthetic" in res.stdout
    res = cli("show", "fedavgg")
    assert res.returncode == 2 and "did you mean" in res.stderr


def test_manifest_records_bytes_and_budget(tmp_path):
    suite = write_suite(tmp_path, seeds=[0])
    assert cli("run", str(suite), "--out", str(tmp_path / "o"), "-q", "--no-report").returncode == 0
    manifests = {m["method"]: m for _, m in iter_runs(tmp_path / "o")}
    assert manifests["local"]["bytes_up"] == 0 and manifests["fedavg"]["bytes_up"] > 0
    # every method gets the suite's local budget: the same number of training samples
    assert manifests["fedavg"]["budget"]["local"] > 0
    assert manifests["local"]["budget"] == manifests["fedavg"]["budget"]
    assert (
        manifests["fedavg"]["bytes_down"] == manifests["fedavg"]["bytes_up"] > 0
    )  # FedAvg: w̄ back


def test_data_check_exits_0_when_clean_1_on_problems_2_on_unusable_input(tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from fixtures_data import make_polyp_tree, write_pillow

    from pflbench.cli import main

    runner = CliRunner()
    tree = make_polyp_tree(tmp_path / "p")
    clean = runner.invoke(main, ["data", "check", "polyp", "--root", str(tree.root)])
    assert clean.exit_code == 0, clean.output
    assert "no problems found" in clean.output
    write_pillow(tree.root / "CVC-300" / "masks" / "99.png", np.zeros((32, 40), np.uint8))
    bad = runner.invoke(main, ["data", "check", "polyp", "--root", str(tree.root)])
    assert bad.exit_code == 1, bad.output
    assert "mask without an image" in bad.output and "1 problem(s):" in bad.output
    unknown = runner.invoke(main, ["data", "check", "polypp", "--root", str(tree.root)])
    assert unknown.exit_code == 2 and "polyp" in unknown.output
    missing = runner.invoke(main, ["data", "check", "polyp", "--root", str(tmp_path / "none")])
    assert missing.exit_code == 1, missing.output  # a missing root is a problem, with the layout
    assert "does not exist" in missing.output and "Expected layout" in missing.output
