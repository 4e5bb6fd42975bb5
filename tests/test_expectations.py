"""Claims as tests: the expectation machinery on planted data, the suite schema, the CLI gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pflbench import stats
from pflbench.cli import main
from pflbench.report import expectations as ex
from pflbench.suite import Expectation, SuiteError, load_suite

GOOD = {
    "name": "t",
    "datasets": [
        {"name": "synthetic", "label": "iid", "options": {"flavour": "fundus", "size": 16}}
    ],
    "methods": ["fedavg", "local", {"name": "ditto", "label": "ditto-big", "params": {"lam": 1e4}}],
    "seeds": [0],
    "model": {"name": "unet", "options": {"base": 4, "depth": 2}},
    "protocol": {"rounds": 2},
}


def planted(n: int, effect: float, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """N blocks × [a, b]: b at site-specific levels, a = b + effect + noise."""
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.6, 0.85, n)
    a = b + effect + rng.normal(0, noise, n)
    return pd.DataFrame({"a": a, "b": b}, index=[f"site{i}" for i in range(n)])


def exp(relation: str, margin: float | None = None, metric: str = "dice") -> Expectation:
    return Expectation(
        dataset="d", method="a", relation=relation, other="b", metric=metric, margin=margin,
        source="planted",
    )  # fmt: skip


def judge(pairs: list[tuple[Expectation, pd.DataFrame]]) -> pd.DataFrame:
    return ex.judge([e for e, _ in pairs], [(m, "") for _, m in pairs], n_resamples=999)


# ----------------------------------------------------------------------------- planted data


def test_planted_gain_holds_no_effect_is_undecided_reversal_is_contradicted():
    out = judge(
        [
            (exp("better"), planted(16, 0.05, seed=1)),
            (exp("better"), planted(16, 0.0, seed=2)),
            (exp("better"), planted(16, -0.05, seed=3)),
            (exp("worse"), planted(16, -0.05, seed=4)),
        ]
    )
    assert out["verdict"].tolist() == [ex.HOLDS, ex.UNDECIDED, ex.CONTRADICTED, ex.HOLDS]
    assert out.loc[1, "reason"] == stats.NO_EVIDENCE
    # Δ and its CI are the planted effect's
    assert out.loc[0, "delta"] == pytest.approx(0.05, abs=0.01)
    assert out.loc[0, "ci_low"] < 0.05 < out.loc[0, "ci_high"]
    assert out.loc[0, "ci_low"] > 0.01  # beyond the default margin
    # one Holm family over the four expectations: adjusted p = Holm of the raw p's
    assert (out["family"] == 4).all()
    np.testing.assert_allclose(out["p_holm"], stats.holm(out["p"]))


def test_no_effect_is_equivalent_and_not_worse_within_the_margin():
    out = judge(
        [
            (exp("equivalent", 0.02), planted(16, 0.0, noise=0.005, seed=5)),
            (exp("not_worse", 0.02), planted(16, 0.0, noise=0.005, seed=6)),
            (exp("equivalent", 0.02), planted(16, 0.05, noise=0.005, seed=7)),
            (exp("not_worse", 0.02), planted(16, -0.05, noise=0.005, seed=8)),
        ]
    )
    assert out["verdict"].tolist() == [ex.HOLDS, ex.HOLDS, ex.CONTRADICTED, ex.CONTRADICTED]
    assert -0.02 < out.loc[0, "ci_low"] and out.loc[0, "ci_high"] < 0.02


def test_a_ci_wider_than_the_margin_is_undecided_not_equivalent():
    out = judge([(exp("equivalent", 0.005), planted(16, 0.0, noise=0.03, seed=9))])
    assert out.loc[0, "verdict"] == ex.UNDECIDED
    assert "not inside ±0.005" in out.loc[0, "reason"]


def test_too_few_blocks_is_undecided_even_with_a_large_effect():
    # N = 5: the smallest two-sided exact Wilcoxon p is 2/32 = 0.0625 ≥ 0.05
    out = judge(
        [(exp("better"), planted(5, 0.2, seed=10)), (exp("equivalent", 0.5), planted(5, 0.0))]
    )
    assert out["verdict"].tolist() == [ex.UNDECIDED, ex.UNDECIDED]
    assert (out["reason"] == "too few blocks").all()
    assert out["p_holm"].isna().all()


def test_the_family_decides_attainability():
    # N = 7: alone p_min = 2/128 = 0.016 < 0.05; with 4 Holm tests 0.0625 ≥ 0.05
    alone = judge([(exp("better"), planted(7, 0.1, seed=11))])
    assert alone.loc[0, "verdict"] == ex.HOLDS
    four = judge([(exp("better"), planted(7, 0.1, seed=11 + i)) for i in range(4)])
    assert (four["verdict"] == ex.UNDECIDED).all()


def test_lower_is_better_metric_is_oriented():
    # hd95: a smaller distance is better, so a planted −2 (mm) means "a better than b"
    m = planted(16, -2.0, noise=0.2, seed=12) * 10
    out = judge([(exp("better", metric="hd95"), m), (exp("worse", metric="hd95"), m)])
    assert out["verdict"].tolist() == [ex.HOLDS, ex.CONTRADICTED]


def test_missing_results_are_not_run():
    out = ex.judge(
        [exp("better"), exp("better")],
        [(pd.DataFrame(), "no finished runs of a"), (planted(16, 0.05), "")],
        n_resamples=999,
    )
    assert out["verdict"].tolist() == [ex.NOT_RUN, ex.HOLDS]
    assert out.loc[1, "family"] == 1  # a claim that did not run is not part of the family


def test_table_shows_delta_ci_and_verdict_per_claim():
    out = judge([(exp("better"), planted(16, 0.05, seed=1)), (exp("better"), planted(5, 0.05))])
    t = ex.table(out)
    assert list(t.cells.index) == ["1. a better than b on d, dice", "2. a better than b on d, dice"]
    row = t.cells.iloc[0]
    assert row["Δ [95% CI]"].startswith("+0.0") and "[" in row["Δ [95% CI]"]
    assert row["Verdict"] == "holds" and row["N"] == "16"
    assert t.cells.iloc[1]["Verdict"] == "undecided: too few blocks"
    assert t.cells.iloc[1]["Holm p"] == "–"


# ----------------------------------------------------------------------------- suite schema


def _write(tmp_path: Path, expect: list) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "expect": expect}))
    return p


def _bad(tmp_path: Path, expect: list) -> str:
    with pytest.raises(SuiteError) as info:
        load_suite(_write(tmp_path, expect))
    return str(info.value)


E = {"dataset": "iid", "method": "fedavg", "relation": "better", "other": "local", "source": "s"}


def test_good_expectations_load(tmp_path):
    suite = load_suite(
        _write(
            tmp_path,
            [
                E,
                {
                    **E,
                    "dataset": "all",
                    "relation": "equivalent",
                    "margin": 0.02,
                    "method": "ditto-big",
                    "other": "fedavg",
                },
            ],
        )  # fmt: skip
    )
    assert [e.relation for e in suite.expect] == ["better", "equivalent"]
    assert suite.expect[0].metric == "dice" and suite.expect[0].margin is None


def test_expectation_names_are_checked_with_suggestions(tmp_path):
    msg = _bad(tmp_path, [{**E, "method": "fedavgg"}, {**E, "dataset": "idd"}])
    assert "expect[0].method: 'fedavgg' is not a method of the suite; did you mean 'fedavg'" in msg
    assert "expect[1].dataset: 'idd' is not a dataset of the suite; did you mean 'iid'" in msg


def test_expectation_schema_errors(tmp_path):
    assert "expect[0]: relation 'equivalent' needs a margin > 0" in _bad(
        tmp_path, [{**E, "relation": "equivalent"}]
    )
    assert "expect[0].margin" in _bad(tmp_path, [{**E, "margin": 0}])
    assert "expect[0].metric" in _bad(tmp_path, [{**E, "metric": "dise"}])
    assert "expect[0].relation" in _bad(tmp_path, [{**E, "relation": "beter"}])
    msg = _bad(tmp_path, [{**E, "soruce": "x"}])
    assert "expect[0].soruce: unknown key; did you mean 'source'" in msg
    assert "expect[0].source: required key is missing" in _bad(
        tmp_path, [{k: v for k, v in E.items() if k != "source"}]
    )
    assert "compare two methods" in _bad(tmp_path, [{**E, "other": "fedavg"}])


def test_expectation_sites_must_exist(tmp_path):
    msg = _bad(tmp_path, [{**E, "sites": ["site1", "site9"]}])
    assert (
        "expect[0].sites: 'site9' is not a site of iid" in msg
        and "site1" not in msg.split("is not")[0].split("expect[0].sites:")[1]
    )


# ----------------------------------------------------------------------------- report and CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from test_report import fabricate

    out = tmp_path_factory.mktemp("exp_runs")
    fabricate(out, datasets={"d1": 8, "d2": 8},
              effects={"fedavg": 0.0, "ditto": 0.06, "local": -0.04}, seeds=(0, 1), tuned=())  # fmt: skip
    return out


def _expect(run_dir: Path, rows: list[dict]) -> None:
    ex.write([Expectation(**{"source": "planted", **r}) for r in rows], run_dir)


def test_report_prints_the_table_and_check_passes_when_claims_hold(run_dir, tmp_path):
    _expect(run_dir, [{"dataset": "all", "method": "ditto", "relation": "better", "other": "fedavg"},
                      {"dataset": "d1", "method": "local", "relation": "better", "other": "fedavg",
                       "sites": ["site_A", "site_B"]}])  # fmt: skip
    r = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path / "r"),
                                  "--check-expectations"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Expectations" in r.output and "holds" in r.output and "too few blocks" in r.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Expectations" in md and "ditto better than fedavg on all datasets" in md
    frame = pd.read_csv(tmp_path / "r" / "tables" / "expectations.csv")
    assert frame["verdict"].tolist() == [ex.HOLDS, ex.UNDECIDED]
    assert frame.loc[0, "n"] == 16 and frame.loc[1, "n"] == 2


def test_a_contradicted_claim_sets_the_exit_code(run_dir, tmp_path):
    _expect(
        run_dir, [{"dataset": "all", "method": "local", "relation": "better", "other": "fedavg"}]
    )
    args = ["report", str(run_dir), "--out", str(tmp_path / "r")]
    assert CliRunner().invoke(main, args).exit_code == 0  # reported, not gated
    r = CliRunner().invoke(main, [*args, "--check-expectations"])
    assert r.exit_code == 1
    assert "contradicted" in r.output and "local better than fedavg" in r.output


def test_check_without_expectations_is_an_error(run_dir, tmp_path):
    ex.write([], run_dir)
    assert not (run_dir / ex.FILE).exists()
    r = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path / "r"),
                                  "--check-expectations"])  # fmt: skip
    assert r.exit_code == 2 and "no expectations to check" in r.output


def test_expectations_file_round_trips(tmp_path):
    rows = [exp("equivalent", 0.02), exp("better")]
    ex.write(rows, tmp_path)
    assert ex.read(tmp_path) == rows
    (tmp_path / ex.FILE).write_text(json.dumps([{"dataset": "d"}]))
    with pytest.raises(ValueError, match="expectations.json: not a list of expectations"):
        ex.read(tmp_path)
