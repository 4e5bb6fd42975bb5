"""The accuracy regression gate (pflbench/regress.py) and the determinism of suites/ci.yaml.

Three tiers:

* unit tests on hand-made tidy results (no training): scores, calibration, bands, verdicts,
  exit codes, the baseline file;
* a fast end-to-end test on a reduced ci suite (FedAvg on a small federation, 2 seeds): two runs
  give identical metrics, the second passes the gate calibrated on the first, and a planted bug
  (a ``package.module:Class`` plugin labelled ``fedavg`` whose aggregation weights are all zero)
  fails it;
* slow tests (``-m slow``) on the whole suites/ci.yaml: two runs are identical and both pass the
  committed baseline; the planted bug and a learning rate divided by ten fail it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console

from pflbench import regress
from pflbench.regress import (
    MACRO,
    RegressError,
    calibrate,
    compare,
    main_regress,
    read_baseline,
    seed_scores,
    write_baseline,
)
from pflbench.results import RunRecords, load_results, write_run

ROOT = Path(__file__).resolve().parent.parent
CI_SUITE = ROOT / "suites" / "ci.yaml"
CI_BASELINE = ROOT / "reports" / "baselines" / "ci.json"

# ---------------------------------------------------------------------------------------------
# Hand-made tidy results
# ---------------------------------------------------------------------------------------------


def fake_run(
    out: Path,
    method: str,
    seed: int,
    client_dice: dict[str, float],
    dataset: str = "ds",
    status: str = "ok",
    key_salt: str = "",
    processor: dict[str, str] | None = None,
) -> None:
    """One finished run whose test/best client Dice are ``client_dice``.

    Each client has two cases (dice ± 0.1, so the client mean is the given value) and two
    structures; "last"-selection and val-split rows carry other values, which the gate must ignore.
    """
    rows = []
    for client, dice in client_dice.items():
        for selection, split, value in (
            ("best", "test", dice),
            ("last", "test", dice / 2),
            ("best", "val", 1 - dice),
        ):
            for case, offset in (("a", -0.1), ("b", 0.1)):
                for structure in ("disc", "cup"):
                    rows.append(
                        {
                            "selection": selection,
                            "round": 3,
                            "client": client,
                            "split": split,
                            "case_id": f"{client}-{case}",
                            "structure": structure,
                            "dice": value + offset,
                            "iou": 0.0,
                            "hd95": 1.0,
                            "assd": 1.0,
                        }
                    )
    run_key = f"{dataset}-{method}-s{seed}{key_salt}"
    manifest = {
        "run_key": run_key,
        "dataset": dataset,
        "method": method,
        "label": "fixed",
        "seed": seed,
        "status": status,
        "git": {"sha": "abc123", "dirty": False},
        "versions": {"torch": "9.9", "pflbench": "0.1.0"},
        "protocol": {"rounds": 3},
        "model": {"name": "unet"},
        **({"processor": processor} if processor else {}),
    }
    empty = pd.DataFrame()
    write_run(out, run_key, RunRecords(empty, empty, pd.DataFrame(rows), manifest))


#: method → per seed → per client Dice; sd differs per method so bands differ.
CALIBRATION = {
    "fedavg": {
        0: {"s1": 0.70, "s2": 0.80},
        1: {"s1": 0.74, "s2": 0.78},
        2: {"s1": 0.66, "s2": 0.76},
    },
    "fedbn": {
        0: {"s1": 0.60, "s2": 0.90},
        1: {"s1": 0.61, "s2": 0.91},
        2: {"s1": 0.62, "s2": 0.92},
    },
    "local": {
        0: {"s1": 0.50, "s2": 0.50},
        1: {"s1": 0.50, "s2": 0.50},
        2: {"s1": 0.50, "s2": 0.50},
    },
}


def write_calibration(
    out: Path,
    data: dict[str, dict[int, dict[str, float]]] = CALIBRATION,
    processor: dict[str, str] | None = None,
) -> Path:
    for method, seeds in data.items():
        for seed, clients in seeds.items():
            fake_run(out, method, seed, clients, processor=processor)
    return out


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    return write_calibration(tmp_path / "calib")


def macro_values(method: str) -> list[float]:
    return [statistics.mean(c.values()) for _, c in sorted(CALIBRATION[method].items())]


# ---------------------------------------------------------------------------------------------
# Scores and calibration
# ---------------------------------------------------------------------------------------------


def test_seed_scores_read_test_split_at_best_round(calib_dir: Path) -> None:
    s = seed_scores(calib_dir).set_index(["method", "site", "seed"])["dice"]
    assert s[("fedavg", "s1", 0)] == pytest.approx(0.70)  # not 0.35 (last) or 0.30 (val)
    assert s[("fedavg", MACRO, 0)] == pytest.approx(0.75)  # mean over clients
    assert s[("fedbn", MACRO, 2)] == pytest.approx(0.77)


def test_calibrate_band_is_mean_plus_minus_k_sd(calib_dir: Path) -> None:
    base = calibrate(calib_dir, k=2.0, floor=0.001, suite="unit")
    st = base["datasets"]["ds"]["fedavg"][MACRO]
    vals = macro_values("fedavg")
    mean, sd = statistics.mean(vals), statistics.stdev(vals)
    assert st["mean"] == pytest.approx(mean)
    assert st["sd"] == pytest.approx(sd)
    assert st["low"] == pytest.approx(mean - 2 * sd)
    assert st["high"] == pytest.approx(mean + 2 * sd)
    assert st["n"] == 3 and st["rule"] == "k·sd"
    assert list(st["values"].values()) == pytest.approx(vals)
    site = base["datasets"]["ds"]["fedavg"]["sites"]["s1"]
    assert site["sd"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.66]))
    assert base["k"] == 2.0 and base["floor"] == 0.001 and base["suite"] == "unit"
    assert base["seeds"] == [0, 1, 2]
    assert base["git_sha"] == "abc123" and base["versions"]["torch"] == "9.9"
    assert base["datasets"]["ds"]["fedavg"]["runs"] == {
        "0": "ds-fedavg-s0",
        "1": "ds-fedavg-s1",
        "2": "ds-fedavg-s2",
    }


def test_pooled_sd_widens_a_row_whose_seeds_agree_by_chance(calib_dir: Path) -> None:
    base = calibrate(calib_dir, k=3.0, floor=0.0)
    sds = [statistics.stdev(macro_values(m)) for m in CALIBRATION]
    pooled = (sum(x * x for x in sds) / len(sds)) ** 0.5
    assert base["pooled_sd"]["ds"][MACRO] == pytest.approx(pooled)
    st = base["datasets"]["ds"]["fedbn"][MACRO]  # sd 0.01 < pooled ≈ 0.016
    assert st["sd"] < pooled and st["rule"] == "k·pooled sd"
    mean = statistics.mean(macro_values("fedbn"))
    assert (st["low"], st["high"]) == pytest.approx((mean - 3 * pooled, mean + 3 * pooled))
    site_sds = [
        statistics.stdev([c[site] for c in seeds.values()])
        for seeds in CALIBRATION.values()
        for site in ("s1", "s2")
    ]
    site_pooled = (sum(x * x for x in site_sds) / len(site_sds)) ** 0.5
    assert base["pooled_sd"]["ds"]["site"] == pytest.approx(site_pooled)


def test_floor_widens_a_band_whose_seeds_all_agree(calib_dir: Path) -> None:
    base = calibrate(calib_dir, k=3.0, floor=0.1)
    st = base["datasets"]["ds"]["local"][MACRO]
    assert st["sd"] == pytest.approx(0.0)
    assert (st["low"], st["high"]) == pytest.approx((0.4, 0.6))
    assert st["rule"] == "floor"


def test_calibrate_refuses_one_seed(tmp_path: Path) -> None:
    fake_run(tmp_path, "fedavg", 0, {"s1": 0.5})
    with pytest.raises(RegressError, match="at least 2 seeds"):
        calibrate(tmp_path)


def test_calibrate_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(RegressError, match="no finished runs"):
        calibrate(tmp_path)


def test_baseline_round_trips_through_json(calib_dir: Path, tmp_path: Path) -> None:
    base = calibrate(calib_dir)
    path = write_baseline(base, tmp_path / "sub" / "b.json")
    assert read_baseline(path) == json.loads(json.dumps(base))
    assert compare(calib_dir, read_baseline(path))["verdict"].eq("ok").all()


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------


def _row(table: pd.DataFrame, method: str, site: str = MACRO) -> pd.Series:
    hit = table[(table["method"] == method) & (table["site"] == site)]
    assert len(hit) == 1, (method, site)
    return hit.iloc[0]


def test_unchanged_run_is_ok_everywhere(calib_dir: Path, tmp_path: Path) -> None:
    again = write_calibration(tmp_path / "again")
    table = compare(again, calibrate(calib_dir))
    assert len(table) == 3 * 3  # 3 methods × (macro + 2 sites)
    assert table["verdict"].eq("ok").all()
    assert table["delta"].abs().max() < 1e-12
    assert (table["n_now"] == 3).all() and (table["n_baseline"] == 3).all()


def test_verdicts(calib_dir: Path, tmp_path: Path) -> None:
    base = calibrate(calib_dir, k=2.0, floor=0.02)
    fa = base["datasets"]["ds"]["fedavg"][MACRO]
    now = tmp_path / "now"
    # fedavg: every seed 0.1 lower than calibrated, far below k·sd (sd ≈ 0.03).
    for seed, clients in CALIBRATION["fedavg"].items():
        fake_run(now, "fedavg", seed, {c: d - 0.1 for c, d in clients.items()})
    # fedbn: site s2 far better; macro improves too, nothing fails.
    for seed, clients in CALIBRATION["fedbn"].items():
        fake_run(now, "fedbn", seed, {"s1": clients["s1"], "s2": 0.99})
    # local: missing; a method the baseline does not know: new.
    for seed in range(3):
        fake_run(now, "ditto", seed, {"s1": 0.4, "s2": 0.4})
    table = compare(now, base)
    r = _row(table, "fedavg")
    assert r["verdict"] == "REGRESSION"
    assert r["now"] == pytest.approx(fa["mean"] - 0.1)
    assert r["delta"] == pytest.approx(-0.1)
    assert (r["low"], r["high"]) == pytest.approx((fa["low"], fa["high"]))
    assert _row(table, "fedavg", "s1")["verdict"] == "REGRESSION"
    assert _row(table, "fedbn")["verdict"] == "improved"
    assert _row(table, "fedbn", "s2")["verdict"] == "improved"
    assert _row(table, "fedbn", "s1")["verdict"] == "ok"
    assert set(table.loc[table["method"] == "local", "verdict"]) == {"MISSING"}
    assert set(table.loc[table["method"] == "ditto", "verdict"]) == {"new"}
    assert list(table.columns) == regress.COLUMNS


def test_one_site_regressing_fails_even_when_the_macro_holds(
    calib_dir: Path, tmp_path: Path
) -> None:
    base = calibrate(calib_dir, k=2.0, floor=0.02)
    now = write_calibration(
        tmp_path / "now", {k: v for k, v in CALIBRATION.items() if k != "fedbn"}
    )
    for seed, c in CALIBRATION["fedbn"].items():  # s1 drops by 0.1, s2 rises by 0.1
        fake_run(now, "fedbn", seed, {"s1": c["s1"] - 0.1, "s2": c["s2"] + 0.1})
    table = compare(now, base)
    assert _row(table, "fedbn")["verdict"] == "ok"
    assert _row(table, "fedbn", "s1")["verdict"] == "REGRESSION"
    assert main_regress(now, write_baseline(base, tmp_path / "b.json"), console=_quiet()) == 1


def test_a_run_that_diverges_is_a_regression(calib_dir: Path, tmp_path: Path) -> None:
    base = calibrate(calib_dir)
    now = write_calibration(
        tmp_path / "now", {k: v for k, v in CALIBRATION.items() if k != "local"}
    )
    for seed, clients in CALIBRATION["local"].items():
        fake_run(now, "local", seed, clients, status="diverged" if seed == 1 else "ok")
    r = _row(compare(now, base), "local")
    assert r["verdict"] == "REGRESSION"
    assert "diverged in seed(s) 1" in r["note"]


def test_changed_configuration_is_noted(calib_dir: Path, tmp_path: Path) -> None:
    now = tmp_path / "now"
    for method, seeds in CALIBRATION.items():
        for seed, clients in list(seeds.items())[:2]:
            fake_run(now, method, seed, clients, key_salt="-new")
    r = _row(compare(now, calibrate(calib_dir)), "fedavg")
    assert "run keys ≠" in r["note"]
    assert "seeds [0, 1]" in r["note"]
    assert r["n_now"] == 2


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=200)  # noqa: SIM115


def _recording() -> Console:
    return Console(record=True, width=250, force_terminal=False)


def test_main_regress_update_then_pass_then_fail(calib_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "baselines" / "unit.json"
    con = _recording()
    assert main_regress(calib_dir, path, update=True, k=2.5, floor=0.03, console=con) == 0
    written = json.loads(path.read_text())
    assert written["k"] == 2.5 and written["floor"] == 0.03
    assert "baseline written" in con.export_text()

    again = write_calibration(tmp_path / "again")
    con = _recording()
    assert main_regress(again, path, console=con) == 0
    text = con.export_text()
    assert "passed" in text and "REGRESSION" not in text

    worse = tmp_path / "worse"
    for method, seeds in CALIBRATION.items():
        for seed, clients in seeds.items():
            fake_run(worse, method, seed, {c: d - 0.3 for c, d in clients.items()})
    con = _recording()
    assert main_regress(worse, path, console=con) == 1
    text = con.export_text()
    assert "REGRESSION" in text and "FAILED" in text


XEON = {"model": "Intel(R) Xeon(R) Processor", "machine": "x86_64", "torch_capability": "AVX512"}
EPYC = {"model": "AMD EPYC", "machine": "x86_64", "torch_capability": "AVX512"}


def test_the_gate_says_when_runs_and_baseline_come_from_different_processors(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.json"
    assert main_regress(write_calibration(tmp_path / "x", processor=XEON), path, update=True) == 0
    assert json.loads(path.read_text())["processor"] == XEON

    con = _recording()
    assert main_regress(write_calibration(tmp_path / "x2", processor=XEON), path, console=con) == 0
    assert "processor" not in con.export_text()  # same processor: nothing to explain

    con = _recording()
    assert main_regress(write_calibration(tmp_path / "e", processor=EPYC), path, console=con) == 0
    text = con.export_text()
    assert "calibrated on Intel(R) Xeon(R) Processor (AVX512)" in text
    assert "ran on AMD EPYC (AVX512)" in text

    con = _recording()  # runs from before manifests recorded it: unknown, so no claim either way
    assert main_regress(write_calibration(tmp_path / "old"), path, console=con) == 0
    assert "calibrated on" not in con.export_text()


def test_main_regress_missing_method_fails(calib_dir: Path, tmp_path: Path) -> None:
    path = write_baseline(calibrate(calib_dir), tmp_path / "b.json")
    partial = write_calibration(tmp_path / "p", {"fedavg": CALIBRATION["fedavg"]})
    con = _recording()
    assert main_regress(partial, path, console=con) == 1
    assert "MISSING" in con.export_text()


def test_an_empty_run_folder_misses_every_row(calib_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "results").mkdir(parents=True)
    table = compare(tmp_path / "empty", calibrate(calib_dir))
    assert len(table) == 9 and table["verdict"].eq("MISSING").all()


def test_main_regress_bad_inputs_exit_2(calib_dir: Path, tmp_path: Path) -> None:
    assert main_regress(calib_dir, tmp_path / "none.json", console=_quiet()) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main_regress(calib_dir, bad, console=_quiet()) == 2
    one = tmp_path / "one"
    fake_run(one, "fedavg", 0, {"s1": 0.5})
    assert main_regress(one, tmp_path / "x.json", update=True, console=_quiet()) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_regress_command(calib_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pflbench.cli import main

    assert "regress" in main.commands  # documented in the README: a missing command is a bug
    path = tmp_path / "b.json"
    runner = CliRunner()
    res = runner.invoke(main, ["regress", str(calib_dir), "--baseline", str(path), "--update"])
    assert res.exit_code == 0, res.output
    assert path.is_file()
    assert runner.invoke(main, ["regress", str(calib_dir), "--baseline", str(path)]).exit_code == 0
    worse = tmp_path / "worse"
    for seed in range(3):
        fake_run(worse, "fedavg", seed, {"s1": 0.1, "s2": 0.1})
    res = runner.invoke(main, ["regress", str(worse), "--baseline", str(path)])
    assert res.exit_code == 1
    assert "REGRESSION" in res.output and "MISSING" in res.output


# ---------------------------------------------------------------------------------------------
# Real runs: determinism, an unchanged run passes, a planted bug fails
# ---------------------------------------------------------------------------------------------

PLANTED = '''
"""A planted regression for the gate's tests: FedAvg whose aggregation weights are all zero."""

from pflbench.messages import Message
from pflbench.methods.fedavg import FedAvg


class ZeroWeightFedAvg(FedAvg):
    """FedAvg with an integer-division bug: n_i // sum(n) is 0, so the server sends zeros."""

    name = "zero-weight-fedavg"

    def aggregate(self, uploads, round):
        total = sum(int(u.weight) for u in uploads.values())
        entries = {}
        for u in uploads.values():
            w = int(u.weight) // total
            for k, t in u.entries.items():
                entries[k] = entries.get(k, 0) + w * t
        return Message(entries=entries)
'''


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable plugin package ``planted_bugs`` (on sys.path and PYTHONPATH)."""
    pkg = tmp_path / "plugins" / "planted_bugs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fedavg.py").write_text(textwrap.dedent(PLANTED))
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    return "planted_bugs.fedavg:ZeroWeightFedAvg"


def reduced_ci(**methods: str) -> Any:
    """suites/ci.yaml shrunk for the default test run: FedAvg only, smaller sites, 2 seeds."""
    from pflbench.suite import MethodSpec, load_suite

    suite = load_suite(CI_SUITE)
    ds = suite.datasets[0]
    small = ds.model_copy(
        update={"options": {**ds.options, "size": 16, "images_per_site": [20] * 3}}
    )
    proto = suite.protocol.model_copy(
        update={
            "rounds": 3,
            "local_steps": 8,
            "eval_every": 1,
            "optimizer": suite.protocol.optimizer.model_copy(update={"lr": 0.02}),
        }
    )
    specs = [MethodSpec(name=name, label=label) for label, name in methods.items()]
    return suite.model_copy(
        update={
            "datasets": [small],
            "protocol": proto,
            "seeds": [0, 1],
            "methods": specs or [MethodSpec(name="fedavg")],
        }
    )


def _cases(out: Path) -> pd.DataFrame:
    c = load_results(out, "cases").drop(columns=["run_key"])
    return c.sort_values(list(c.columns[:9])).reset_index(drop=True)


def test_reduced_ci_is_deterministic_passes_and_catches_a_planted_bug(
    tmp_path: Path, planted: str
) -> None:
    from pflbench.runner import run_suite

    first, second, broken = tmp_path / "first", tmp_path / "second", tmp_path / "broken"
    run_suite(reduced_ci(), first)
    run_suite(reduced_ci(), second)
    pd.testing.assert_frame_equal(_cases(first), _cases(second))  # bitwise: same seed, 1 thread

    path = tmp_path / "baseline.json"
    assert main_regress(first, path, update=True, console=_quiet()) == 0
    band = read_baseline(path)["datasets"]["fundus-ci"]["fedavg"][MACRO]
    assert band["low"] > 0.05, "the reduced suite must learn, or a broken method passes"
    assert main_regress(second, path, console=_quiet()) == 0

    run_suite(reduced_ci(fedavg=planted), broken)
    table = compare(broken, read_baseline(path))
    assert _row(table, "fedavg")["verdict"] == "REGRESSION"
    assert _row(table, "fedavg")["now"] < 0.05
    assert "run keys ≠" in _row(table, "fedavg")["note"]
    assert main_regress(broken, path, console=_quiet()) == 1


# ---------------------------------------------------------------------------------------------
# Slow: the whole ci suite, as .ci/run runs it
# ---------------------------------------------------------------------------------------------


#: ``pflbench run`` as .ci/run calls it (two worker processes, one pinned thread each).
_RUN = ("run", "--quiet", "--no-report", "--workers", "2")


def _pflbench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pflbench.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)


def _suite_file(tmp_path: Path, name: str, **update: Any) -> Path:
    import yaml

    raw = yaml.safe_load(CI_SUITE.read_text())
    for key, value in update.items():
        if key == "lr":
            raw["protocol"]["optimizer"]["lr"] = value
        else:
            raw[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _subset_baseline(methods: list[str], tmp_path: Path) -> Path:
    base = read_baseline(CI_BASELINE)
    base["datasets"] = {
        ds: {m: e for m, e in ms.items() if m in methods} for ds, ms in base["datasets"].items()
    }
    return write_baseline(base, tmp_path / "subset.json")


@pytest.mark.slow
def test_ci_suite_twice_identical_and_both_pass(tmp_path: Path) -> None:
    assert CI_BASELINE.is_file(), "reports/baselines/ci.json is missing"
    outs = [tmp_path / "run1", tmp_path / "run2"]
    for out in outs:
        res = _pflbench(*_RUN, str(CI_SUITE), "--out", str(out), cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
    pd.testing.assert_frame_equal(_cases(outs[0]), _cases(outs[1]))
    base = read_baseline(CI_BASELINE)
    for out in outs:
        table = compare(out, base)
        assert not table["verdict"].isin(["REGRESSION", "MISSING"]).any(), table.to_string()
        assert main_regress(out, CI_BASELINE, console=_quiet()) == 0
    assert {m for ms in base["datasets"].values() for m in ms} == set(
        load_results(outs[0], "cases")["method"]
    )


@pytest.mark.slow
def test_ci_suite_planted_bug_fails_the_gate(tmp_path: Path, planted: str) -> None:
    suite = _suite_file(tmp_path, "planted", methods=[{"name": planted, "label": "fedavg"}])
    out = tmp_path / "planted"
    res = _pflbench(*_RUN, str(suite), "--out", str(out), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    table = compare(out, read_baseline(_subset_baseline(["fedavg"], tmp_path)))
    assert _row(table, "fedavg")["verdict"] == "REGRESSION"
    assert main_regress(out, _subset_baseline(["fedavg"], tmp_path), console=_quiet()) == 1


@pytest.mark.slow
def test_ci_suite_learning_rate_divided_by_ten_fails_the_gate(tmp_path: Path) -> None:
    """A quieter planted regression: four methods trained with the suite's lr / 10."""
    import yaml

    methods = ["fedavg", "fedprox", "fedbn", "local"]
    lr = yaml.safe_load(CI_SUITE.read_text())["protocol"]["optimizer"]["lr"] / 10
    suite = _suite_file(tmp_path, "slow-lr", methods=methods, lr=lr)
    out = tmp_path / "lr"
    res = _pflbench(*_RUN, str(suite), "--out", str(out), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    subset = _subset_baseline(methods, tmp_path)
    table = compare(out, read_baseline(subset))
    macro = table[table["site"] == MACRO].set_index("method")
    assert (macro["delta"] < 0).all(), macro.to_string()  # every method is worse
    assert (macro["verdict"] == "REGRESSION").any(), macro.to_string()
    assert main_regress(out, subset, console=_quiet()) == 1


def test_a_folder_of_another_suite_is_named_in_one_line(calib_dir: Path, tmp_path: Path) -> None:
    """`pflbench regress runs/quick` against the ci baseline: one line, not 168 new + 56 MISSING."""
    base = calibrate(calib_dir, suite="ci")
    path = write_baseline(base, tmp_path / "ci.json")
    other = tmp_path / "quick"
    fake_run(other, "fedavg", 0, {"s1": 0.5}, dataset="fundus-synth")
    fake_run(other, "fedavg", 0, {"s1": 0.5}, dataset="prostate-synth")
    con = _recording()
    assert main_regress(other, path, console=con) == 2
    lines = [ln for ln in con.export_text().splitlines() if ln.strip()]
    assert len(lines) == 1
    text = " ".join(ln.strip() for ln in lines)
    assert "not a run of the baseline's suite" in text and "suite 'ci'" in text
    assert "datasets ds" in text and "fundus-synth, prostate-synth" in text
    assert "MISSING" not in text and "new" not in text.split("suite")[0]
