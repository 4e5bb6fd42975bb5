"""Surface distances in reports: failures take the declared value and are counted, never dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pflbench.metrics import evaluate_cases, failure_distance
from pflbench.report import ReportError, build_report
from pflbench.report.data import load
from pflbench.results import RunRecords, write_run

SITES = ["a", "b", "c", "d"]
SIZE = 8  # 8×8 images: failure value 8·√2


def _cases(method: str, seed: int) -> pd.DataFrame:
    """Real evaluate_cases rows: "empty" predicts nothing on sites a, b; others are close."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, site in enumerate(SITES):
        true = torch.zeros(3, SIZE, SIZE, dtype=torch.int64)
        true[:, 2:6, 2:6] = 1
        pred = true.clone()
        if method == "empty" and i < 2:
            pred[:] = 0
        elif method == "shifted":
            pred = torch.roll(true, shifts=1 + int(rng.integers(0, 2)), dims=2)
        df = evaluate_cases(pred, true, [f"{site}{k}" for k in range(3)], [0, 0, 0], {"fg": [1]})
        for sel in ("best", "last"):
            frames.append(df.assign(selection=sel, round=2, client=site, split="test"))
    return pd.concat(frames, ignore_index=True)


def _write(out: Path, method: str, seed: int, surface: bool = True) -> None:
    cases = _cases(method, seed)
    if not surface:
        cases[["hd95", "assd"]] = np.nan
        cases["surface_failure"] = False
    rounds = pd.DataFrame(
        [dict(round=r, client=s, split="val", structure="mean", metric="dice", value=0.5)
         for r in (1, 2) for s in SITES]
    )  # fmt: skip
    comm = pd.DataFrame(
        [dict(round=r, client=s, bytes_up=1, bytes_down=1, sampled=True) for r in (1, 2) for s in SITES]
    )  # fmt: skip
    key = f"d-{method}-s{seed}"
    manifest = dict(
        run_key=key, dataset="d", method=method, label="fixed", seed=seed, params={},
        protocol={"rounds": 2}, model={}, data_fingerprint="fp", sites=SITES,
    )  # fmt: skip
    write_run(out, key, RunRecords(rounds, comm, cases, manifest))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for seed in (0, 1):
        for m in ("fedavg", "empty", "shifted"):
            _write(tmp_path, m, seed)
    return tmp_path


def test_an_empty_prediction_scores_the_failure_value_not_a_dropped_case(folder):
    res = load(folder, "hd95")
    worst = failure_distance((SIZE, SIZE))
    assert worst == pytest.approx(8 * math.sqrt(2))
    s = res.client_scores.set_index(["method", "seed", "client"])["value"]
    # sites a, b: every case of "empty" failed → the client score is the failure value itself
    assert s[("empty", 0, "a")] == pytest.approx(worst)
    assert s[("empty", 0, "c")] == 0.0 and s[("fedavg", 0, "a")] == 0.0
    f = res.failures.groupby("method")[["failures", "values"]].sum()
    assert f.loc["empty"].tolist() == [12, 24] and f.loc["fedavg", "failures"] == 0


def test_metric_hd95_keeps_every_method_the_reference_and_counts_failures(folder):
    out = build_report(folder, out=folder / "rep", metric="hd95", practical=0.5)
    md = (out / "report.md").read_text(encoding="utf-8")
    part = md.split("## Main results", 1)[1].split("\n## ", 1)[0]
    rows = {ln.strip("| ").split(" | ")[0]: ln for ln in part.splitlines() if ln.startswith("| ")}
    assert {"fedavg", "empty", "shifted"} <= set(rows)
    assert "Failures" in rows["Method"] and "Reference: fedavg" in md
    assert rows["empty"].rstrip(" |").endswith("12/24") and rows["fedavg"].rstrip(" |").endswith(
        "0/24"
    )
    # mean over its 4 sites: two at the failure value 8·√2 = 11.31, two perfect → 5.66
    assert rows["empty"].split(" | ")[1] == f"{8 * math.sqrt(2) / 2:.2f} ± 0.00" == "5.66 ± 0.00"
    assert "image diagonal" in part


def test_hd95_not_computed_is_an_error_not_an_empty_report(tmp_path):
    for m in ("fedavg", "empty"):
        _write(tmp_path, m, 0, surface=False)
    with pytest.raises(ReportError, match="surface_metrics: false"):
        build_report(tmp_path, out=tmp_path / "rep", metric="hd95")
    # Dice still works on the same folder
    assert (build_report(tmp_path, out=tmp_path / "rep2") / "report.md").exists()


def test_old_results_with_nan_failures_are_refused(folder):
    d = next((folder / "results").glob("d-empty-s0"))
    cases = pd.read_parquet(d / "cases.parquet")
    cases.loc[cases["surface_failure"], ["hd95", "assd"]] = np.nan  # the old convention
    cases.drop(columns="surface_failure").to_parquet(d / "cases.parquet", index=False)
    # results written before manifests recorded their files' hashes: nothing to check against
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.pop("files", None)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match=r"NaN in 1 run\(s\) \(e.g. d-empty-s0\).*rerun"):
        load(folder, "hd95")


def test_a_method_whose_runs_all_diverged_is_a_note_not_an_error(folder):
    cases = _cases("fedavg", 0).iloc[0:0]  # diverged before the first evaluation: no cases
    manifest = dict(
        run_key="d-broken-s0", dataset="d", method="broken", label="fixed", seed=0, params={},
        protocol={"rounds": 2}, model={}, data_fingerprint="fp", sites=SITES, status="diverged",
    )  # fmt: skip
    write_run(folder, "d-broken-s0", RunRecords(pd.DataFrame(), pd.DataFrame(), cases, manifest))
    res = load(folder, "hd95")
    assert "broken" not in set(res.client_scores["method"])
    assert any("d/broken: every run diverged" in n for n in res.notes)
