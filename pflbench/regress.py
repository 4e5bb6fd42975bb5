"""The accuracy regression gate: a run folder's client-macro Dice against a committed baseline.

``pflbench regress RUN_DIR --baseline reports/baselines/ci.json`` compares, per dataset × method
(and per dataset × method × site), the Dice a run reaches with the tolerance band stored in the
baseline, prints a table and exits non-zero on any regression or missing row.
``--update`` writes a new baseline from RUN_DIR instead, with the per-seed values that set each
band, so a reviewer of the baseline's diff sees why a band is what it is.

The score is the headline of every report: test split, per-client best-validation round
(``selection == "best"``), a client's score = mean Dice over its cases (and structures), the
client-macro score = mean over clients. Only the tidy results are read.

Statistic and band
------------------
The gate compares the **mean over the run's seeds** with the band, not each seed: training on a
few steps is noisy from seed to seed (per-seed sd 0.02–0.15 Dice in ``suites/ci.yaml``), a
regression moves every seed, and a mean over n seeds has only sd/√n of the noise; testing each
seed would need a band wide enough for one seed's noise and would add a chance of a false alarm
per seed.

The band of a row is ``mean ± max(k·sd, k·pooled sd, floor)``:

* ``sd``: the row's per-seed standard deviation over the calibration seeds (ddof 1).
* ``pooled sd``: √(mean sd²) over all the dataset's rows of the same kind (the method rows, or
  the method × site rows). An sd from 3 seeds is itself very uncertain (it falls below half the
  true one about one time in five), so a row never gets a band narrower than the typical noise of
  its kind. Measured on ``suites/ci.yaml``: rerunning with 2 threads instead of 1 (other float
  summation orders, a stand-in for another CPU) moved the method means by 0.4 pooled sd (sd of
  the shifts) and at most 1.0, the site means by 0.5 and at most 1.4 — while with the rows' own
  sd alone one site row moved by 4.3 of its sd.
* ``k`` (default 3): if the noise were re-drawn entirely, the run's mean and the calibration's
  would differ by about sd·√(2/n) = 0.82 sd for n = 3, so k = 3 is 3.7 of those standard
  deviations: a false alarm in about 1 run in 70 over the 56 rows of ``suites/ci.yaml`` in that
  worst case, far fewer in the measured one. A regression that moves a method's mean by more than
  about 3 × 0.073 Dice fails: training every method with the learning rate divided by ten
  (−0.23 to −0.31 Dice) fails FedAvg, FedProx and FedBN; Local (sd 0.15) stays inside its band.
* ``floor`` (default 0.02 Dice) keeps a band from collapsing where every row agrees across seeds.

On the calibration machine the suite is deterministic, so an unchanged run reproduces the
baseline's means exactly.

A value above the band is reported as ``improved`` and does not fail the gate (recalibrate to
lock it in); a baseline row that the run lacks is ``MISSING`` and fails; a run row that the
baseline lacks is ``new`` and does not fail. A method whose run diverged in a seed where the
baseline's did not is a ``REGRESSION`` whatever its Dice. Diverged runs never enter a mean or
a band (:func:`~pflbench.results.load_results` leaves them out), in calibration as in comparison.

Input that cannot be trusted is refused (exit 2), never gated: a method of the baseline that the
run folder has but with fewer seeds (a run unfinished or deleted), and any table whose rows or
content hash differ from its manifest's record (truncated, rewritten).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from pflbench.results import ResultsError, load_manifests, load_results

#: Band half-width in per-seed standard deviations (see the module docstring).
DEFAULT_K = 3.0
#: Smallest band half-width in Dice, for rows whose seeds (nearly) agree.
DEFAULT_FLOOR = 0.02
#: Site label of the client-macro row.
MACRO = "macro"
#: Version of the baseline file's layout.
SCHEMA = 1

VERDICTS = ("ok", "improved", "new", "REGRESSION", "MISSING")
FAILING = frozenset({"REGRESSION", "MISSING"})

COLUMNS = [
    "dataset",
    "method",
    "site",
    "baseline",
    "sd",
    "low",
    "high",
    "now",
    "delta",
    "n_baseline",
    "n_now",
    "verdict",
    "note",
]


class RegressError(ValueError):
    """A run folder or baseline that cannot be gated; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------
# Scores from the tidy results
# ---------------------------------------------------------------------------------------------


def seed_scores(run_dir: str | Path) -> pd.DataFrame:
    """Per dataset × method × seed × site Dice (site ``macro`` = mean over clients).

    Test split, best-validation selection; a client's score is the mean over its case rows.
    """
    cases = load_results(run_dir, "cases")
    if cases.empty:
        raise RegressError(f"{run_dir}: no finished runs (no results/<run_key>/DONE)")
    sel = cases[(cases["selection"] == "best") & (cases["split"] == "test")]
    if sel.empty:
        raise RegressError(
            f"{run_dir}: no test-split rows at the best-validation round; the gate needs a final "
            "run (not a tuning-only folder)"
        )
    per_client = (
        sel.groupby(["dataset", "method", "seed", "client"], sort=True)["dice"]
        .mean()
        .rename("dice")
        .reset_index()
        .rename(columns={"client": "site"})
    )
    macro = (
        per_client.groupby(["dataset", "method", "seed"], sort=True)["dice"].mean().reset_index()
    )
    macro["site"] = MACRO
    out = pd.concat([macro, per_client], ignore_index=True)
    out["seed"] = out["seed"].astype(int)
    return out[["dataset", "method", "site", "seed", "dice"]]


def _run_info(run_dir: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (dataset, method): run keys and diverged seeds, read from the manifests."""
    info: dict[tuple[str, str], dict[str, Any]] = {}
    for m in load_manifests(run_dir):
        entry = info.setdefault(
            (str(m.get("dataset")), str(m.get("method"))), {"runs": {}, "diverged": []}
        )
        seed = int(m.get("seed", -1))
        entry["runs"][str(seed)] = m.get("run_key")
        if m.get("status") == "diverged":
            entry["diverged"].append(seed)
    for entry in info.values():
        entry["diverged"].sort()
    return info


def _by_seed(rows: pd.DataFrame) -> dict[int, float]:
    return {int(s): float(d) for s, d in zip(rows["seed"], rows["dice"], strict=True)}


def _mean(values: dict[int, float]) -> float:
    """Mean of the finite per-seed values, in seed order (the same sum in calibrate and compare)."""
    v = np.array([values[s] for s in sorted(values)], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _stats(values: dict[int, float]) -> dict[str, Any]:
    """Mean, sd (ddof 1), n and the per-seed values of one row (the band comes later)."""
    v = np.array([values[s] for s in sorted(values)], dtype=float)
    finite = v[np.isfinite(v)]
    return {
        "mean": _mean(values),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        "n": int(finite.size),
        "values": {str(s): float(values[s]) for s in sorted(values)},
    }


def _pooled_sd(rows: list[dict[str, Any]]) -> float:
    """√(mean sd²) over rows with a defined sd: the typical seed-to-seed noise of a row kind."""
    sds = [r["sd"] for r in rows if math.isfinite(r["sd"])]
    return float(math.sqrt(sum(x * x for x in sds) / len(sds))) if sds else float("nan")


def _band(st: dict[str, Any], pooled: float, k: float, floor: float) -> None:
    """Add the band to a row: mean ± max(k·max(sd, pooled sd), floor), and the rule that set it."""
    sd = st["sd"] if math.isfinite(st["sd"]) else 0.0
    pooled = pooled if math.isfinite(pooled) else 0.0
    candidates = {"k·sd": k * sd, "k·pooled sd": k * pooled, "floor": floor}
    rule = max(candidates, key=lambda r: candidates[r])
    half = candidates[rule]
    st.update(half_width=half, rule=rule, low=st["mean"] - half, high=st["mean"] + half)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _provenance(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Git state, versions and processor of the runs (the first run's; the runs of one sweep
    share them): a gate run on another processor moves every row a little, and says why."""
    gits = [m.get("git") or {} for m in manifests]
    shas = sorted({g.get("sha") for g in gits if g.get("sha")})
    versions = next((m["versions"] for m in manifests if m.get("versions")), {})
    processor = next((m["processor"] for m in manifests if m.get("processor")), None)
    return {
        "git_sha": shas[0] if len(shas) == 1 else (shas or None),
        "git_dirty": any(bool(g.get("dirty")) for g in gits),
        "versions": versions,
        "processor": processor,
    }


def calibrate(
    run_dir: str | Path,
    k: float = DEFAULT_K,
    floor: float = DEFAULT_FLOOR,
    suite: str | None = None,
) -> dict[str, Any]:
    """The baseline of a finished run folder: per dataset × method (× site) mean, sd, band.

    Every row keeps its per-seed values, n, the rule that set its half-width (``k·sd``,
    ``k·pooled sd`` or ``floor``); every method its run keys and diverged seeds; the file the
    pooled sds, so the band can be checked by hand. ``suite`` names the suite
    (default: the run folder's name, which is the suite's name for ``runs/<suite>``).
    Needs at least two seeds per method, or sd is undefined.
    """
    if not (math.isfinite(k) and k > 0):
        raise RegressError(f"k must be a positive number, got {k!r}")
    if not (math.isfinite(floor) and floor >= 0):
        raise RegressError(f"floor must be a number ≥ 0, got {floor!r}")
    scores = seed_scores(run_dir)
    manifests = load_manifests(run_dir)
    info = _run_info(run_dir)
    few = (
        scores[scores["site"] == MACRO]
        .groupby(["dataset", "method"])["seed"]
        .nunique()
        .loc[lambda s: s < 2]
    )
    if not few.empty:
        names = ", ".join(f"{d}/{m}" for d, m in few.index)
        raise RegressError(
            f"{run_dir}: calibration needs at least 2 seeds per method (sd is undefined with one); "
            f"only one seed for: {names}"
        )
    datasets: dict[str, dict[str, Any]] = {}
    for (ds, method), rows in scores.groupby(["dataset", "method"], sort=True):
        entry: dict[str, Any] = {MACRO: _stats(_by_seed(rows[rows["site"] == MACRO])), "sites": {}}
        for site, srows in rows[rows["site"] != MACRO].groupby("site", sort=True):
            entry["sites"][str(site)] = _stats(_by_seed(srows))
        run = info.get((str(ds), str(method)), {"runs": {}, "diverged": []})
        entry["runs"] = run["runs"]
        entry["diverged"] = run["diverged"]
        datasets.setdefault(str(ds), {})[str(method)] = entry
    pooled: dict[str, dict[str, float]] = {}
    for ds, methods in datasets.items():
        macro_rows = [e[MACRO] for e in methods.values()]
        site_rows = [st for e in methods.values() for st in e["sites"].values()]
        pooled[ds] = {MACRO: _pooled_sd(macro_rows), "site": _pooled_sd(site_rows)}
        for st in macro_rows:
            _band(st, pooled[ds][MACRO], k, floor)
        for st in site_rows:
            _band(st, pooled[ds]["site"], k, floor)
    seeds = sorted(int(s) for s in scores["seed"].unique())
    first = manifests[0] if manifests else {}
    return {
        "schema": SCHEMA,
        "suite": suite or Path(run_dir).resolve().name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score": (
            "Dice, test split, per-client best-validation round; client = mean over its cases "
            "and structures; macro = mean over clients"
        ),
        "statistic": "mean over the run's seeds, compared with [low, high]",
        "band": (
            "mean ± max(k·sd, k·pooled sd, floor); sd over seeds (ddof 1); pooled sd = "
            "√(mean sd²) over the dataset's rows of the same kind (macro rows, site rows)"
        ),
        "pooled_sd": pooled,
        "k": float(k),
        "floor": float(floor),
        "seeds": seeds,
        **_provenance(manifests),
        "protocol": first.get("protocol"),
        "model": first.get("model"),
        "datasets": datasets,
    }


def write_baseline(baseline: dict[str, Any], path: str | Path) -> Path:
    """Write a baseline as indented, key-sorted JSON (readable diffs), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(baseline, indent=2, sort_keys=True, allow_nan=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RegressError(
            f"{path}: no such baseline; create one with `pflbench regress RUN_DIR --baseline "
            f"{path} --update`"
        )
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegressError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(baseline, dict) or "datasets" not in baseline:
        raise RegressError(f"{path}: not a pflbench baseline (no 'datasets' key)")
    if baseline.get("schema", SCHEMA) > SCHEMA:
        raise RegressError(
            f"{path}: baseline schema {baseline['schema']} is newer than this pflbench "
            f"understands ({SCHEMA})"
        )
    return baseline


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def _verdict(now: float, low: float, high: float) -> str:
    if not math.isfinite(now) or now < low:
        return "REGRESSION"
    if now > high:
        return "improved"
    return "ok"


def compare(run_dir: str | Path, baseline: dict[str, Any]) -> pd.DataFrame:
    """One row per dataset × method (site ``macro``) and per dataset × method × site.

    Columns: dataset, method, site, baseline (calibration mean), sd, low, high, now (mean over
    the run's seeds), delta (now − baseline), n_baseline, n_now (seeds), verdict (``ok``,
    ``improved``, ``new``, ``REGRESSION``, ``MISSING``) and a note (on the method's macro row:
    diverged seeds, seeds or run keys that differ from the baseline's, i.e. the configuration
    changed and a recalibration may be due). Baseline rows come first, in the baseline's order;
    rows only in the run follow.
    """
    try:
        scores = seed_scores(run_dir)
    except RegressError:
        scores = pd.DataFrame(columns=["dataset", "method", "site", "seed", "dice"])
    info = _run_info(run_dir)
    now = pd.DataFrame(
        [
            {
                "dataset": ds,
                "method": method,
                "site": site,
                "mean": _mean(_by_seed(rows)),  # as in calibrate: a delta 0 stays exactly 0
                "count": int(rows["dice"].notna().sum()),
            }
            for (ds, method, site), rows in scores.groupby(
                ["dataset", "method", "site"], sort=False
            )
        ],
        columns=["dataset", "method", "site", "mean", "count"],
    ).set_index(["dataset", "method", "site"])
    seeds_now = scores.groupby(["dataset", "method"])["seed"].apply(lambda s: sorted(set(s)))
    base_seeds = [int(s) for s in baseline.get("seeds", [])]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for ds, methods in baseline["datasets"].items():
        for method, entry in methods.items():
            run = info.get((ds, method))
            notes: list[str] = []
            diverged_now = run["diverged"] if run else []
            newly_diverged = sorted(set(diverged_now) - set(entry.get("diverged", [])))
            if diverged_now:
                notes.append(f"diverged in seed(s) {', '.join(map(str, diverged_now))}")
            if (ds, method) in seeds_now.index and base_seeds:
                got = seeds_now.loc[(ds, method)]
                if got != base_seeds:
                    notes.append(f"seeds {got} ≠ baseline {base_seeds}")
            if run and entry.get("runs") and run["runs"] != entry["runs"]:
                notes.append("run keys ≠ baseline's (configuration changed?)")
            sites = [(MACRO, entry[MACRO])] + list(entry.get("sites", {}).items())
            for site, st in sites:
                key = (ds, method, site)
                seen.add(key)
                row = {
                    "dataset": ds,
                    "method": method,
                    "site": site,
                    "baseline": st["mean"],
                    "sd": st["sd"],
                    "low": st["low"],
                    "high": st["high"],
                    "n_baseline": st["n"],
                }
                if key not in now.index:
                    row.update(
                        now=float("nan"),
                        delta=float("nan"),
                        n_now=0,
                        verdict="MISSING",
                        note="; ".join((notes if site == MACRO else []) + ["not in the run"]),
                    )
                else:
                    value = float(now.loc[key, "mean"])
                    verdict = _verdict(value, st["low"], st["high"])
                    if newly_diverged:
                        verdict = "REGRESSION"
                    row.update(
                        now=value,
                        delta=value - st["mean"],
                        n_now=int(now.loc[key, "count"]),
                        verdict=verdict,
                        note="; ".join(notes) if site == MACRO else "",
                    )
                rows.append(row)
    for key, r in now.iterrows():
        if key in seen:
            continue
        rows.append(
            {
                "dataset": key[0],
                "method": key[1],
                "site": key[2],
                "baseline": float("nan"),
                "sd": float("nan"),
                "low": float("nan"),
                "high": float("nan"),
                "now": float(r["mean"]),
                "delta": float("nan"),
                "n_baseline": 0,
                "n_now": int(r["count"]),
                "verdict": "new",
                "note": "not in the baseline",
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------------------------------------
# Printing and the command
# ---------------------------------------------------------------------------------------------

_STYLE = {
    "ok": "green",
    "improved": "cyan",
    "new": "blue",
    "REGRESSION": "bold red",
    "MISSING": "bold red",
}


def _f(x: float, fmt: str = ".3f") -> str:
    """A number for the table; ``round(...) + 0.0`` turns -0.000 into +0.000."""
    return "–" if x is None or not math.isfinite(x) else format(round(x, 3) + 0.0, fmt)


def render(table: pd.DataFrame, title: str) -> Table:
    """The comparison as a rich table: baseline (± sd), band, now, Δ, verdict.

    The dataset column only shows with several datasets, the note column only when a row has one.
    """
    many = table["dataset"].nunique() > 1
    notes = bool(table["note"].fillna("").str.len().any())
    cols = (["dataset"] if many else []) + ["method", "site", "baseline", "band", "now", "Δ"]
    cols += ["verdict"] + (["note"] if notes else [])
    t = Table(title=title)
    for col in cols:
        t.add_column(col, justify="right" if col in ("baseline", "band", "now", "Δ") else "left")
    for r in table.itertuples(index=False):
        style = _STYLE.get(r.verdict, "")
        cells = {
            "dataset": r.dataset,
            "method": r.method,
            "site": r.site,
            "baseline": "–" if not math.isfinite(r.baseline) else f"{r.baseline:.3f} ± {_f(r.sd)}",
            "band": "–" if not math.isfinite(r.low) else f"[{r.low:.3f}, {r.high:.3f}]",
            "now": _f(r.now),
            "Δ": _f(r.delta, "+.3f"),
            "verdict": f"[{style}]{r.verdict}[/]" if style else r.verdict,
            "note": r.note or "",
        }
        t.add_row(*(cells[c] for c in cols))
    return t


def _render_baseline(baseline: dict[str, Any]) -> Table:
    t = Table(
        title=f"baseline {baseline.get('suite')}: mean ± max(k·sd, k·pooled sd, floor), "
        f"k = {baseline['k']}, floor = {baseline['floor']}, seeds {baseline.get('seeds')}"
    )
    for col in ("dataset", "method", "site", "per-seed values", "mean ± sd", "band", "rule"):
        t.add_column(col, justify="right" if col in ("mean ± sd", "band") else "left")
    for ds, methods in baseline["datasets"].items():
        for method, entry in methods.items():
            for site, st in [(MACRO, entry[MACRO])] + list(entry["sites"].items()):
                vals = ", ".join(f"{v:.3f}" for v in st["values"].values())
                t.add_row(
                    ds,
                    method,
                    site,
                    vals,
                    f"{st['mean']:.3f} ± {_f(st['sd'])}",
                    f"[{st['low']:.3f}, {st['high']:.3f}]",
                    st["rule"],
                )
    return t


def _check_same_suite(
    run_dir: str | Path, baseline: dict[str, Any], baseline_path: str | Path
) -> None:
    """A folder sharing no dataset with the baseline is another suite's: say so in one line
    instead of listing every row as new and every baseline row as MISSING."""
    have = sorted({ds for ds, _ in _run_info(run_dir)})
    want = sorted(baseline.get("datasets") or {})
    if have and want and not set(have) & set(want):
        raise RegressError(
            f"{run_dir} is not a run of the baseline's suite: {baseline_path} belongs to suite "
            f"{baseline.get('suite')!r} (datasets {', '.join(want)}), the folder has "
            f"{', '.join(have)}; pass --baseline for this folder's suite"
        )


def check_complete(run_dir: str | Path, baseline: dict[str, Any]) -> None:
    """Refuse a run folder that has a baseline method with fewer seeds than the baseline: the mean
    over the seeds left would be compared with a band made for all of them."""
    info = _run_info(run_dir)
    gaps = []
    for ds, methods in baseline["datasets"].items():
        for method, entry in methods.items():
            run = info.get((ds, method))
            if run is None:
                continue  # the whole method is absent: MISSING rows, a failed gate
            lacking = sorted(set(entry.get("runs", {})) - set(run["runs"]), key=int)
            if lacking:
                gaps.append(f"{ds}/{method} seed(s) {', '.join(lacking)}")
    if gaps:
        raise RegressError(
            f"{run_dir}: incomplete: no finished run (results/<run_key>/DONE) for "
            + "; ".join(gaps)
            + " of the baseline; finish the sweep (run the suite again) before gating"
        )


def processor_note(run_dir: str | Path, baseline: dict[str, Any]) -> str | None:
    """A line when the runs and the baseline come from different processors: CPU arithmetic is
    bitwise reproducible on one processor only, so there every row moves a little (inside its
    band) and a Δ of exactly 0 cannot be expected. None when they match or either is unknown."""
    ran = _provenance(load_manifests(run_dir)).get("processor")
    made = baseline.get("processor")
    if not ran or not made or ran == made:
        return None

    def name(p: dict[str, Any]) -> str:
        return f"{p.get('model') or 'unknown CPU'} ({p.get('torch_capability') or '?'})"

    return (
        f"note: the baseline was calibrated on {name(made)}, these runs ran on {name(ran)}; "
        "floating-point results differ across processors, so every row may move inside its band"
    )


def main_regress(
    run_dir: str | Path,
    baseline_path: str | Path,
    update: bool = False,
    k: float | None = None,
    floor: float | None = None,
    console: Console | None = None,
) -> int:
    """The ``pflbench regress`` command; returns the exit code.

    0: every row ok, improved or new (or the baseline was written with ``update``);
    1: at least one REGRESSION or MISSING row; 2: the run folder or baseline cannot be used.
    ``k`` and ``floor`` only matter with ``update`` (a comparison uses the baseline's bands).
    """
    if console is None:  # CI logs are not terminals: keep the table on one line per row
        console = Console(width=None if sys.stdout.isatty() else 160)
    k = DEFAULT_K if k is None else k
    floor = DEFAULT_FLOOR if floor is None else floor
    try:
        if update:
            baseline = calibrate(run_dir, k=k, floor=floor)
            path = write_baseline(baseline, baseline_path)
            console.print(_render_baseline(baseline))
            console.print(f"baseline written to {path}")
            return 0
        baseline = read_baseline(baseline_path)
        if not Path(run_dir).is_dir():
            raise RegressError(f"{run_dir}: no such run folder")
        _check_same_suite(run_dir, baseline, baseline_path)
        check_complete(run_dir, baseline)
        table = compare(run_dir, baseline)
    except (RegressError, ResultsError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line
        return 2
    console.print(
        render(
            table,
            f"regression gate: {run_dir} against {baseline_path} "
            f"(mean over seeds vs band; suite {baseline.get('suite')}, k = {baseline.get('k')}, "
            f"floor = {baseline.get('floor')})",
        )
    )
    if note := processor_note(run_dir, baseline):
        console.print(note, highlight=False, soft_wrap=True)
    counts = table["verdict"].value_counts()
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if v in counts)
    failed = int(table["verdict"].isin(FAILING).sum())
    if failed:
        console.print(f"[bold red]FAILED[/]: {summary}", highlight=False)
        return 1
    console.print(f"[green]passed[/]: {summary}", highlight=False)
    return 0
