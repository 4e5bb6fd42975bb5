"""Checks before training, `--set` overrides, `--dry-run` and `--workers auto` (issue 20)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pflbench.cli import main
from pflbench.suite import SuiteError, load_suite

SUITE = textwrap.dedent(
    """\
    name: tiny
    datasets:
      - name: synthetic
        options: {flavour: fundus, size: 16, images_per_site: [6, 6], seed: 0}
    methods: [fedavg, local]
    seeds: [0, 1]
    model: {name: unet, options: {base: 4, depth: 2}}
    protocol: {rounds: 1, local_epochs: 1, batch_size: 4, threads: 1, device: cpu}
    """
)


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_unwritable_output_folder_fails_before_training(suite_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = _run(str(suite_file), "--out", str(blocker / "runs"), "--quiet", "--no-report")
    assert res.exit_code == 2
    (line,) = _error_lines(res.output)
    assert str(blocker / "runs") in line and "cannot be written" in line and "--out" in line


def test_missing_cuda_fails_before_training(suite_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    res = _run(str(suite_file), "--out", str(out), "--set", "protocol.device=cuda", "--quiet")
    assert res.exit_code == 2
    (line,) = _error_lines(res.output)
    assert "protocol.device: cuda" in line and "no CUDA device" in line
    assert not (out / "results").exists()  # nothing trained


def test_missing_data_root_fails_before_training(tmp_path):
    suite = tmp_path / "real.yaml"
    text = SUITE.replace("name: synthetic", "name: prostate").replace(
        "{flavour: fundus, size: 16, images_per_site: [6, 6], seed: 0}",
        "{root: " + str(tmp_path / "nowhere") + "}",
    )
    assert "prostate" in text and "nowhere" in text
    suite.write_text(text)
    res = _run(str(suite), "--out", str(tmp_path / "out"), "--quiet")
    assert res.exit_code == 2
    (line,) = _error_lines(res.output)
    assert str(tmp_path / "nowhere") in line
    assert not (tmp_path / "out" / "results").exists()


def test_invalid_suite_starts_no_worker(suite_file, tmp_path, monkeypatch):
    import pflbench.pool

    started = []
    monkeypatch.setattr(pflbench.pool, "start_children", lambda *a, **k: started.append(a) or [])
    res = _run(str(suite_file), "--workers", "2", "--set", "protocol.round=2", "--quiet")
    assert res.exit_code == 2
    (line,) = _error_lines(res.output)
    assert "protocol.round" in line and started == []
    ok = _run(str(suite_file), "--workers", "2", "--out", str(tmp_path / "o"), "--quiet")
    assert ok.exit_code == 0, ok.output
    assert len(started) == 1  # the same call with a valid suite does start the children


def test_set_overrides_are_validated_like_the_file(suite_file):
    suite = load_suite(suite_file, ["protocol.rounds=3", "seeds=[5]", "datasets.0.options.size=32"])
    assert suite.protocol.rounds == 3 and suite.seeds == [5]
    assert suite.datasets[0].options["size"] == 32
    with pytest.raises(SuiteError, match=r"protocol\.round.*unknown key"):
        load_suite(suite_file, ["protocol.round=3"])
    with pytest.raises(SuiteError, match="KEY=VALUE"):
        load_suite(suite_file, ["rounds"])
    with pytest.raises(SuiteError, match=r"methods\.0 is 'fedavg'"):
        load_suite(suite_file, ["methods.0.params.mu=1"])
    with pytest.raises(SuiteError, match=r"datasets\.3 must be an index below 1"):
        load_suite(suite_file, ["datasets.3.options.size=1"])


def test_dry_run_lists_runs_and_marks_the_done_ones(suite_file, tmp_path):
    out = tmp_path / "out"
    before = _run(str(suite_file), "--out", str(out), "--dry-run")
    assert before.exit_code == 0, before.output
    assert "4 runs: 0 DONE, 4 to run" in before.output
    assert not out.exists()  # a dry run writes nothing
    done = _run(str(suite_file), "--out", str(out), "--set", "seeds=[0]", "--quiet", "--no-report")
    assert done.exit_code == 0, done.output
    after = _run(str(suite_file), "--out", str(out), "--dry-run")
    assert "4 runs: 2 DONE, 2 to run" in after.output
    rows = [line for line in after.output.splitlines() if "-s0-" in line]
    assert len(rows) == 2 and all("DONE" in r for r in rows)
    # the override changes what is planned, and --threads is not part of the run key
    two_rounds = _run(str(suite_file), "--out", str(out), "--set", "protocol.rounds=2", "--dry-run")
    assert "4 runs: 0 DONE, 4 to run (2 rounds each)" in two_rounds.output
    threads = _run(str(suite_file), "--out", str(out), "--threads", "2", "--dry-run")
    assert "4 runs: 2 DONE" in threads.output


def test_dry_run_shows_each_datasets_protocol(tmp_path):
    suite = tmp_path / "two.yaml"
    second = (
        "  - name: synthetic\n"
        "    label: small-lr\n"
        "    options: {flavour: fundus, size: 16, images_per_site: [6, 6], seed: 1}\n"
        "    protocol: {optimizer: {lr: 0.0001}, rounds: 3}\n"
    )
    suite.write_text(SUITE.replace("methods:", second + "methods:"))
    res = _run(str(suite), "--out", str(tmp_path / "o"), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "protocol: T=1, E=1, batch 4, adam lr 0.001" in res.output
    assert "per-dataset protocol" in res.output
    lines = res.output.splitlines()
    (first,) = [x for x in lines if "synthetic " in x and "the suite's" in x]
    (prostate,) = [x for x in lines if "small-lr" in x and "optimizer.lr=0.0001" in x]
    assert "rounds=3" in prostate
    assert "8 runs: 0 DONE, 8 to run (1/3 rounds by dataset)" in res.output


def test_dry_run_of_a_tuning_suite_prints_its_study_plan(tmp_path):
    suite = tmp_path / "tuned.yaml"
    suite.write_text(
        SUITE
        + "tuning:\n  trials: 3\n  seeds: [10]\n"
        + "  search: {lr: {low: 0.001, high: 0.1, log: true}}\n"
    )
    res = _run(str(suite), "--out", str(tmp_path / "o"), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "tuning plan" in res.output
    # 1 dataset × 2 methods; tuned + default on each of the 2 reporting seeds
    assert "2 studies × 3 trials + 8 final runs" in res.output
    assert not (tmp_path / "o").exists()


def test_workers_option_accepts_auto_and_refuses_zero(suite_file, tmp_path):
    auto = _run(str(suite_file), "--out", str(tmp_path / "o"), "--workers", "auto", "--dry-run")
    assert auto.exit_code == 0, auto.output
    zero = _run(str(suite_file), "--workers", "0", "--dry-run")
    assert zero.exit_code == 2 and "'auto' or an integer from 1 to" in zero.output
