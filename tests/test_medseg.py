"""suites/medseg.yaml: validates, explains missing data, and runs end to end on fixture trees."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_data import (
    make_fundus_tree,
    make_gland_tree,
    make_polyp_tree,
    make_prostate_tree,
    make_vessel_tree,
)

from pflbench.results import iter_runs
from pflbench.runner import run_suite
from pflbench.suite import SuiteError, load_suite

SUITE = Path(__file__).parent.parent / "suites" / "medseg.yaml"


def test_without_the_variable_it_names_the_variable(monkeypatch):
    monkeypatch.delenv("PFLBENCH_DATA", raising=False)
    with pytest.raises(SuiteError, match=r"\$PFLBENCH_DATA is not set"):
        load_suite(SUITE)


def test_without_the_folders_it_names_each_folder_and_the_expected_tree(monkeypatch, tmp_path):
    monkeypatch.setenv("PFLBENCH_DATA", str(tmp_path))
    with pytest.raises(SuiteError) as info:
        load_suite(SUITE)
    msg = str(info.value)
    for name in ("prostate", "fundus", "polyp", "vessel", "gland"):
        assert f"{tmp_path}/{name}" in msg
    assert "Case" in msg and "ROIs" in msg  # the expected layouts are printed


def test_runs_one_short_round_on_fixture_trees(monkeypatch, tmp_path):
    data = tmp_path / "data"
    make_prostate_tree(data / "prostate")
    make_fundus_tree(data / "fundus")
    make_polyp_tree(data / "polyp")
    make_vessel_tree(data / "vessel")
    make_gland_tree(data / "gland")
    monkeypatch.setenv("PFLBENCH_DATA", str(data))
    monkeypatch.setenv("PFLBENCH_CACHE", str(tmp_path / "cache"))
    suite = load_suite(SUITE)
    for d in suite.datasets:
        d.options["size"] = [16, 32] if d.name == "gland" else 32
    suite.protocol.rounds = 1
    suite.protocol.threads = 1
    suite.protocol.device = "cpu"
    suite.protocol.surface_metrics = False
    suite.model.options = {"base": 4, "depth": 2}
    suite.methods = [m for m in suite.methods if m.name == "fedavg"]
    suite.seeds = [0]
    run_suite(suite, tmp_path / "out")
    manifests = [m for _, m in iter_runs(tmp_path / "out")]
    assert sorted(m["dataset"] for m in manifests) == [
        "fundus",
        "gland",
        "polyp",
        "prostate",
        "vessel",
    ]
    assert all(m["status"] == "ok" and m["rounds_done"] == 1 for m in manifests)
    sites = {m["dataset"]: len(m["sites"]) for m in manifests}
    assert sites == {"prostate": 6, "fundus": 4, "polyp": 5, "vessel": 6, "gland": 2}
