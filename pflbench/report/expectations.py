"""Claims as tests: a suite's ``expect`` entries judged with the report's own statistics.

``pflbench run`` copies the suite's ``expect`` list into the run folder (``expectations.json``);
the report judges each entry and prints one table: claim, source, N, Δ [95% CI], Holm p,
verdict. The procedure is the rest of the report's, through the same functions of
:mod:`pflbench.stats`:

- blocks = (dataset, site) pairs of the named dataset (every dataset for ``all``; only the named
  ``sites`` when given), block score = mean over seeds of the headline configuration
  (:func:`pflbench.report.data.block_matrix`);
- Δ = mean paired difference (method − other) with a bootstrap 95% CI, two-sided Wilcoxon
  signed-rank test, and the Bayesian signed-rank probabilities with ROPE = the margin
  (:func:`pflbench.stats.compare`);
- **Holm over all the expectations of the suite** (one family: the claims tested together), and
  the report's wording rule (:func:`pflbench.stats.verdict`), with the expectation's margin as
  the practical threshold.

Verdicts (``d`` = Δ oriented so that positive favours ``method``; ``m`` = the margin):

- ``better``: holds when the verdict is "significant (better)" (Holm p < α and d > m);
  contradicted when "significant (worse)"; ``worse`` mirrors it.
- ``not_worse`` (non-inferiority): holds when the CI's lower end of d is above −m; contradicted
  when significantly worse by more than m.
- ``equivalent``: holds when the 95% CI of Δ lies inside ±m — the interval form of two one-sided
  tests (TOST, here at 2.5% per side, so conservative); contradicted when significantly
  different by more than m.
- otherwise undecided, with the reason: too few blocks (the smallest attainable Holm-adjusted p
  is ≥ α: :func:`pflbench.stats.too_few_blocks`), no evidence, or a CI that crosses the margin.
  An expectation whose methods or dataset have no finished runs is "not run".

Too few blocks always leaves a claim undecided, also for the CI-based relations (a bootstrap CI
over a handful of blocks is not a decision).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from pflbench import stats
from pflbench.suite import Expectation

from . import tables
from .data import Results, block_matrix, metric_info

FILE = "expectations.json"
CSV = "expectations.csv"

HOLDS, CONTRADICTED, UNDECIDED, NOT_RUN = "holds", "contradicted", "undecided", "not run"

RELATION_TEXT = {
    "better": "better than",
    "worse": "worse than",
    "not_worse": "not worse than",
    "equivalent": "equivalent to",
}


# ------------------------------------------------------------------------------- files


def write(expect: Sequence[Expectation], out_dir: str | Path) -> Path | None:
    """Copy the suite's ``expect`` list into the run folder (removing a stale copy)."""
    path = Path(out_dir) / FILE
    if not expect:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [e.model_dump(mode="json") for e in expect]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def read(run_dir: str | Path) -> list[Expectation]:
    """The run folder's expectations ([] when it has none); a bad file names itself."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return [Expectation.model_validate(r) for r in raw]
    except (ValueError, TypeError, ValidationError) as exc:
        raise ValueError(f"{path}: not a list of expectations ({exc})") from None


# ------------------------------------------------------------------------------- judging


def claim_text(e: Expectation) -> str:
    """The claim in words: the suite's sentence, or one made from the fields."""
    if e.claim:
        return e.claim
    where = "all datasets" if e.dataset == "all" else e.dataset
    if e.sites:
        where += f" ({', '.join(e.sites)})"
    margin = f" (margin {e.margin:g})" if e.margin is not None else ""
    return f"{e.method} {RELATION_TEXT[e.relation]} {e.other} on {where}, {e.metric}{margin}"


def margin_of(e: Expectation) -> float:
    return e.margin if e.margin is not None else stats.PRACTICAL


def blocks_for(e: Expectation, res: Results) -> tuple[pd.DataFrame, str]:
    """The blocks × [method, other] matrix of an expectation, or an empty one and why."""
    scores = res.headline()
    if e.dataset != "all":
        scores = scores[scores["dataset"] == e.dataset]
        if scores.empty:
            return pd.DataFrame(), f"no finished runs on {e.dataset}"
    if e.sites:
        missing = sorted(set(e.sites) - set(scores["client"].astype(str)))
        if missing:
            return pd.DataFrame(), f"site(s) {', '.join(missing)} not in the results"
        scores = scores[scores["client"].astype(str).isin(e.sites)]
    absent = [m for m in (e.method, e.other) if m not in set(scores["method"])]
    if absent:
        return pd.DataFrame(), f"no finished runs of {', '.join(absent)}"
    m = block_matrix(scores, [e.method, e.other])
    if m.empty:
        return m, "no block with results of both methods"
    return m, ""


def _decide(e: Expectation, r: dict[str, Any], hib: bool) -> tuple[str, str]:
    """(verdict, reason) from the comparison row ``r`` (its ``verdict`` already Holm-corrected)."""
    v = str(r["verdict"])
    if v.startswith(stats.TOO_FEW):
        return UNDECIDED, "too few blocks"
    sign = 1.0 if hib else -1.0
    lo, hi = sorted((sign * r["ci_low"], sign * r["ci_high"]))
    m = margin_of(e)
    sig_better = v == f"{stats.SIGNIFICANT} (better)"
    sig_worse = v == f"{stats.SIGNIFICANT} (worse)"
    if e.relation in ("better", "worse"):
        want, against = (
            (sig_better, sig_worse) if e.relation == "better" else (sig_worse, sig_better)
        )
        if want:
            return HOLDS, ""
        if against:
            return CONTRADICTED, f"significantly {'worse' if e.relation == 'better' else 'better'}"
        return UNDECIDED, stats.NO_EVIDENCE if "practical" not in v else f"|Δ| ≤ margin {m:g}"
    if sig_better or sig_worse:  # not_worse / equivalent: a significant difference beyond m
        if e.relation == "equivalent" or sig_worse:
            return CONTRADICTED, f"significantly {'better' if sig_better else 'worse'} by > {m:g}"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return UNDECIDED, "no confidence interval"
    if e.relation == "not_worse":
        if lo > -m:
            return HOLDS, ""
        return UNDECIDED, f"CI reaches below −{m:g}"
    if -m < lo and hi < m:
        return HOLDS, ""
    return UNDECIDED, f"CI not inside ±{m:g}"


def judge(
    expect: Sequence[Expectation],
    matrices: Sequence[tuple[pd.DataFrame, str]],
    higher_is_better: Callable[[str], bool] | None = None,
    alpha: float = stats.ALPHA,
    n_resamples: int = 9999,
    seed: int = 0,
    bayes: bool = True,
) -> pd.DataFrame:
    """One row per expectation: the comparison's numbers, Holm over the family, the verdict.

    ``matrices[i]`` is expectation i's blocks × [method, other] matrix and, when empty, the
    reason it could not be evaluated. ``higher_is_better(metric)`` defaults to the report's
    metric table.
    """
    hib_of = higher_is_better or (lambda metric: metric_info(metric)[0])
    rows: list[dict[str, Any]] = []
    for i, (e, (mat, why)) in enumerate(zip(expect, matrices, strict=True)):
        base = {"claim": claim_text(e), "source": e.source, "dataset": e.dataset,
                "method": e.method, "relation": e.relation, "other": e.other,
                "metric": e.metric, "margin": margin_of(e)}  # fmt: skip
        if mat.empty:
            rows.append({**base, "n": 0, "verdict": NOT_RUN, "reason": why, "p": math.nan})
            continue
        c = stats.compare(
            mat,
            [(e.method, e.other)],
            higher_is_better=hib_of(e.metric),
            alpha=alpha,
            practical=margin_of(e),
            n_resamples=n_resamples,
            seed=seed + i,
            bayes=bayes,
        ).iloc[0]
        raw = c.drop(["a", "b", "verdict", "significant", "too_few", "p_holm"]).to_dict()
        raw["p"] = wilcoxon_p(mat[e.method].to_numpy() - mat[e.other].to_numpy())
        rows.append({**base, **raw, "verdict": "", "reason": ""})
    evaluated = [(e, r) for e, r in zip(expect, rows, strict=True) if r["verdict"] != NOT_RUN]
    family = len(evaluated)
    p_holm = stats.holm([r["p"] for _, r in evaluated])
    for (e, r), ph in zip(evaluated, p_holm, strict=True):
        hib = hib_of(e.metric)
        n_nz = int(r["n"] - r["n_zero"])
        r["too_few"] = stats.too_few_blocks(n_nz, alpha, family)
        r["p_holm"] = math.nan if r["too_few"] else float(ph)
        r["test"] = stats.verdict(
            ph, r["delta"], n_nz, margin_of(e), alpha, hib, omnibus_significant=True, family=family
        )
        r["verdict"], r["reason"] = _decide(e, {**r, "verdict": r["test"]}, hib)
    out = pd.DataFrame(rows)
    out["family"] = family  # the Holm family size, kept with the rows (CSV has no attrs)
    return out


def wilcoxon_p(diff: np.ndarray) -> float:
    """The raw two-sided Wilcoxon p of :func:`pflbench.stats.wilcoxon_test` (kept even where
    significance is out of reach, so that the Holm family is the same set of tests)."""
    return stats.wilcoxon_test(diff)[1]


def evaluate(
    expect: Sequence[Expectation],
    results_for: Callable[[str], Results],
    n_resamples: int = 9999,
    seed: int = 0,
) -> pd.DataFrame:
    """Judge every expectation on the results; ``results_for(metric)`` loads one metric."""
    cache: dict[str, Results] = {}
    mats = []
    for e in expect:
        if e.metric not in cache:
            cache[e.metric] = results_for(e.metric)
        mats.append(blocks_for(e, cache[e.metric]))
    return judge(expect, mats, n_resamples=n_resamples, seed=seed)


def contradicted(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose claim the results contradict."""
    if frame.empty:
        return frame
    return frame[frame["verdict"] == CONTRADICTED]


# ------------------------------------------------------------------------------- display


def verdict_text(r: pd.Series) -> str:
    v = str(r["verdict"])
    reason = r.get("reason")
    return f"{v}: {reason}" if isinstance(reason, str) and reason else v


def table(frame: pd.DataFrame, decimals: int = 3) -> tables.Table:
    """The expectations table: claim, source, N, Δ [95% CI], Holm p, P(better/ROPE/worse),
    verdict."""
    rows = {}
    bayes = "p_a_better" in frame.columns and frame["p_a_better"].notna().any()
    for i, r in frame.iterrows():
        dec = metric_info(str(r["metric"]))[1] if r["metric"] != "dice" else decimals
        ran = r["verdict"] != NOT_RUN
        row = {
            "Source": str(r["source"]),
            "N": str(int(r["n"])) if ran else "–",
            "Δ [95% CI]": tables.fmt_ci(r["delta"], r["ci_low"], r["ci_high"], dec) if ran else "–",
            "Holm p": tables.fmt_p(r["p_holm"]) if ran else "–",
        }
        if bayes:
            row["P(better/ROPE/worse)"] = (
                f"{r['p_a_better']:.2f}/{r['p_rope']:.2f}/{r['p_b_better']:.2f}"
                if ran and np.isfinite(r["p_a_better"])
                else "–"
            )
        row["Verdict"] = verdict_text(r)
        rows[f"{i + 1}. {r['claim']}"] = row
    cells = pd.DataFrame.from_dict(rows, orient="index")
    family = int(frame["family"].iloc[0]) if "family" in frame and len(frame) else 0
    caption = (
        f"Expectations: each claim of the suite judged over its blocks ((dataset, site), block = "
        f"mean over seeds); Δ = mean paired difference (method − other) with a bootstrap 95% CI "
        f"(BCa; percentile for N < 10); two-sided Wilcoxon signed-rank tests, Holm-corrected over "
        f"the {family} expectations evaluated. better/worse holds when Holm p < {stats.ALPHA:g} "
        f"and |Δ| > the margin in the claimed direction, and is contradicted when so in the "
        f"other; not worse holds when the CI's lower end is above −margin; equivalent holds when "
        f"the 95% CI lies inside ±margin (the interval form of two one-sided tests) and either is "
        f"contradicted by a significant difference beyond the margin; otherwise undecided, with "
        f"the reason (too few blocks: the smallest attainable Holm-adjusted p is ≥ "
        f"{stats.ALPHA:g}, so no p-value is given)."
        + (
            " P(better/ROPE/worse): Bayesian signed-rank test (baycomp) with the margin as the "
            "region of practical equivalence, shown beside, not deciding."
            if bayes
            else ""
        )
    )
    return tables.Table(
        name="expectations",
        title="Expectations",
        cells=cells,
        caption=caption,
        index_name="Claim",
        widths={"Source": "3.2cm", "Verdict": "2.8cm"},
    )
