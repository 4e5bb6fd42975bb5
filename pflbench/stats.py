"""Statistical comparison of methods over blocks (evaluation reference §1–§2).

Every function takes a *blocks × methods* :class:`pandas.DataFrame` (one row per block, e.g. a
(dataset, client) pair with the mean over seeds; one column per method) and returns tidy frames or
dataclasses; nothing is printed. Higher is better unless ``higher_is_better=False`` (HD95, ASSD).

Procedure (Demšar 2006; Benavoli et al. 2016):

1. ranks within each block (average ties, rank 1 = best) and mean ranks;
2. Friedman χ² (:func:`scipy.stats.friedmanchisquare`) and the Iman–Davenport F, used as a gate;
3. Wilcoxon signed-rank tests of every method against a reference and of all pairs, Holm-corrected
   within each family, with the number of zero differences;
4. effect sizes next to every p: mean paired Δ with a bootstrap 95 % CI (BCa, percentile fallback),
   matched-pairs rank-biserial r and the win rate;
5. Nemenyi critical difference as the familiar reference bar;
6. optionally a Bayesian signed-rank test (``baycomp``) with a region of practical equivalence.

Wording: a difference is called "significant" only when the Holm-adjusted p < α *and*
|Δ| > the practical threshold; otherwise "no evidence of a difference". When the number of
(non-zero) paired differences is so small that even the most extreme outcome cannot reach
p < α (two-sided exact Wilcoxon: p_min = 2 / 2^N, so N ≤ 5 at α = 0.05) — or cannot after Holm
over a family of m comparisons (m · p_min ≥ α, e.g. N = 6 with m ≥ 2) — the verdict says so and
no p-value is reported.
"""

from __future__ import annotations

import gc
import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05
PRACTICAL = 0.01

SIGNIFICANT = "significant"
NO_EVIDENCE = "no evidence of a difference"
TOO_FEW = "too few blocks for significance"

__all__ = [
    "ALPHA",
    "NO_EVIDENCE",
    "PRACTICAL",
    "SIGNIFICANT",
    "TOO_FEW",
    "Comparison",
    "FriedmanResult",
    "analyze",
    "bayesian_signed_rank",
    "bootstrap_ci",
    "compare",
    "friedman",
    "friedman_from_mean_ranks",
    "holm",
    "iman_davenport",
    "mean_ranks",
    "min_wilcoxon_p",
    "nemenyi_cd",
    "nemenyi_q",
    "rank_biserial",
    "ranks",
    "significance_matrix",
    "too_few_blocks",
    "verdict",
    "wilcoxon_test",
]


# --------------------------------------------------------------------------------------------
# ranks and omnibus test


def _check(matrix: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(matrix, pd.DataFrame):
        raise TypeError("expected a blocks × methods DataFrame")
    if matrix.isna().any().any():
        raise ValueError("the blocks × methods matrix has missing values; drop incomplete blocks")
    return matrix.astype(float)


def ranks(matrix: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Rank of each method within each block: 1 = best, ties share the average rank."""
    m = _check(matrix)
    return m.rank(axis=1, method="average", ascending=not higher_is_better)


def mean_ranks(matrix: pd.DataFrame, higher_is_better: bool = True) -> pd.Series:
    """Mean rank of each method over the blocks (lower = better), in column order."""
    r = ranks(matrix, higher_is_better).mean(axis=0)
    r.name = "mean_rank"
    return r


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test with the Iman–Davenport correction.

    ``chi2``/``p`` come from :func:`scipy.stats.friedmanchisquare` (tie-corrected) on the matrix
    path, or from the mean-rank formula (no tie correction) in :func:`friedman_from_mean_ranks`.
    ``f``/``f_p``: Iman–Davenport F = (N−1)χ² / (N(k−1) − χ²) with F(k−1, (k−1)(N−1)).
    ``available`` is False when the test cannot be run (k < 3 or N < 2); the numbers are NaN then.
    """

    k: int
    n: int
    mean_ranks: pd.Series
    chi2: float = math.nan
    p: float = math.nan
    f: float = math.nan
    f_p: float = math.nan
    available: bool = True
    note: str = ""

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.available and bool(self.f_p < alpha)


def iman_davenport(chi2: float, n: int, k: int) -> tuple[float, float]:
    """Iman–Davenport F and its p-value from F(k−1, (k−1)(N−1))."""
    denom = n * (k - 1) - chi2
    if denom <= 0:  # perfect agreement between blocks
        return math.inf, 0.0
    f = (n - 1) * chi2 / denom
    p = float(sps.f.sf(f, k - 1, (k - 1) * (n - 1)))
    return float(f), p


def friedman_from_mean_ranks(mean_rank: Sequence[float] | pd.Series, n: int) -> FriedmanResult:
    """Friedman χ² (without tie correction) and Iman–Davenport F from mean ranks over N blocks.

    χ² = 12N / (k(k+1)) · (Σ R_j² − k(k+1)²/4), as in Demšar (2006).
    """
    r = pd.Series(mean_rank, dtype=float, name="mean_rank")
    k = len(r)
    if k < 2 or n < 2:
        return FriedmanResult(k, n, r, available=False, note="needs k ≥ 2 methods and N ≥ 2 blocks")
    chi2 = 12.0 * n / (k * (k + 1)) * (float((r**2).sum()) - k * (k + 1) ** 2 / 4.0)
    p = float(sps.chi2.sf(chi2, k - 1))
    f, f_p = iman_davenport(chi2, n, k)
    return FriedmanResult(k, n, r, float(chi2), p, f, f_p)


def friedman(matrix: pd.DataFrame, higher_is_better: bool = True) -> FriedmanResult:
    """Friedman test (:func:`scipy.stats.friedmanchisquare`) and Iman–Davenport F on the matrix."""
    m = _check(matrix)
    n, k = m.shape
    mr = mean_ranks(m, higher_is_better)
    if k < 3 or n < 2:
        return FriedmanResult(
            k, n, mr, available=False, note="Friedman needs k ≥ 3 methods and N ≥ 2 blocks"
        )
    # the statistic is symmetric in the direction, but rank on the oriented values anyway
    vals = m.to_numpy() if higher_is_better else -m.to_numpy()
    if np.all(vals == vals[:, :1]):  # every block ties every method
        return FriedmanResult(k, n, mr, 0.0, 1.0, 0.0, 1.0, note="all methods tie in every block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.friedmanchisquare(*[vals[:, j] for j in range(k)])
    chi2 = float(res.statistic)
    f, f_p = iman_davenport(chi2, n, k)
    return FriedmanResult(k, n, mr, chi2, float(res.pvalue), f, f_p)


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical value q_α = studentized_range.ppf(1−α, k, ∞) / √2."""
    if k < 2:
        raise ValueError("Nemenyi needs k ≥ 2 methods")
    return float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi critical difference CD = q_α · √(k(k+1) / (6N)) in mean-rank units."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


# --------------------------------------------------------------------------------------------
# paired tests and effect sizes


def min_wilcoxon_p(n: int) -> float:
    """Smallest attainable two-sided exact Wilcoxon signed-rank p with n non-zero differences."""
    if n <= 0:
        return 1.0
    return min(1.0, 2.0 / 2.0**n)


def too_few_blocks(n: int, alpha: float = ALPHA, family: int = 1) -> bool:
    """True when n paired differences can never give a two-sided Wilcoxon p < α.

    With ``family`` > 1 Holm-corrected comparisons the smallest attainable adjusted p is
    ``family`` × the smallest raw p, so that product is what must stay below α.
    """
    return family * min_wilcoxon_p(n) >= alpha


def rank_biserial(diff: np.ndarray) -> tuple[float, float, float]:
    """Matched-pairs rank-biserial r = (T⁺ − T⁻)/(T⁺ + T⁻) over the non-zero differences.

    Returns (r, T⁺, T⁻); r is NaN when every difference is zero.
    """
    d = np.asarray(diff, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return math.nan, 0.0, 0.0
    rk = sps.rankdata(np.abs(d))
    tp = float(rk[d > 0].sum())
    tm = float(rk[d < 0].sum())
    return (tp - tm) / (tp + tm), tp, tm


def wilcoxon_test(diff: np.ndarray) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired differences (zeros dropped, scipy default).

    Returns (statistic, p); p = 1 when every difference is zero.
    """
    d = np.asarray(diff, dtype=float)
    if np.count_nonzero(d) == 0:
        return math.nan, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        res = sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


# scipy ≥ 1.15 takes ``rng``; older releases only ``random_state`` (same Generator semantics)
_BOOTSTRAP_RNG = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"


def bootstrap_ci(
    diff: np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    bca_min_n: int = 10,
) -> tuple[float, float, str]:
    """Bootstrap CI of the mean of ``diff``: BCa, percentile when N < ``bca_min_n`` or BCa fails.

    Returns (low, high, method) with method "BCa", "percentile" or "degenerate" (constant input).
    """
    d = np.asarray(diff, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, "none"
    if d.size == 1 or np.all(d == d[0]):
        return float(d[0]), float(d[0]), "degenerate"
    methods = ["BCa", "percentile"] if d.size >= bca_min_n else ["percentile"]
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = sps.bootstrap(
                    (d,),
                    np.mean,
                    confidence_level=confidence,
                    n_resamples=n_resamples,
                    method=method,
                    vectorized=True,
                    **{_BOOTSTRAP_RNG: np.random.default_rng(seed)},
                )
            except Exception:  # noqa: BLE001 - any failure of BCa falls back to percentile
                continue
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi, method
    return math.nan, math.nan, "failed"


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjustment; NaN entries stay NaN and are not part of the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.sum() == 1:  # a family of one: nothing to adjust
        out[ok] = np.minimum(p[ok], 1.0)
    elif ok.any():
        # statsmodels' Holm branch calls gc.collect(); freezing the current heap keeps that from
        # walking every live object (≈0.1 s per call once matplotlib is loaded)
        was_frozen = gc.get_freeze_count() > 0
        gc.freeze()
        try:
            out[ok] = multipletests(p[ok], method="holm")[1]
        finally:
            if not was_frozen:
                gc.unfreeze()
    return out


def bayesian_signed_rank(
    a: np.ndarray, b: np.ndarray, rope: float = PRACTICAL, nsamples: int = 5000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Bayesian signed-rank test (baycomp) of a vs b: (P(a better), P(rope), P(b better)).

    "Better" is "larger"; orient the inputs for lower-is-better metrics. Returns None when
    ``baycomp`` is not installed (an optional extra) or the test fails.
    """
    try:
        import baycomp  # noqa: PLC0415 - optional extra
    except Exception:  # noqa: BLE001
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # baycomp works on y − x: its "right" probability is P(y − x > rope)
            left, rope_p, right = baycomp.SignedRankTest.probs(
                np.asarray(b, float),
                np.asarray(a, float),
                rope=rope,
                nsamples=nsamples,
                random_state=seed,
            )
    except Exception:  # noqa: BLE001
        return None
    return float(right), float(rope_p), float(left)


def verdict(
    p_holm: float,
    delta: float,
    n_nonzero: int,
    practical: float = PRACTICAL,
    alpha: float = ALPHA,
    higher_is_better: bool = True,
    omnibus_significant: bool = True,
    family: int = 1,
) -> str:
    """The wording rule of the reference (§2.7).

    "significant (better|worse)" only when the Holm-adjusted p < α, |Δ| > ``practical`` and the
    omnibus test (when there is one) rejected; otherwise "no evidence of a difference", with the
    reason in parentheses; "too few blocks for significance (...)" when N cannot reach α at all
    (alone, or after Holm over a family of ``family`` comparisons).
    """
    if too_few_blocks(n_nonzero, alpha):
        return f"{TOO_FEW} (N = {n_nonzero}: smallest attainable p = {min_wilcoxon_p(n_nonzero):.3g} ≥ {alpha:g})"
    if too_few_blocks(n_nonzero, alpha, family):
        return (
            f"{TOO_FEW} (N = {n_nonzero} with {family} Holm-corrected comparisons: smallest "
            f"attainable adjusted p = {family * min_wilcoxon_p(n_nonzero):.3g} ≥ {alpha:g})"
        )
    if not np.isfinite(p_holm) or p_holm >= alpha:
        return NO_EVIDENCE
    if not abs(delta) > practical:
        return (
            f"{NO_EVIDENCE} (Holm p < {alpha:g} but |Δ| ≤ {practical:g}, the practical threshold)"
        )
    if not omnibus_significant:
        return f"{NO_EVIDENCE} (the Friedman/Iman–Davenport test did not reject)"
    better = (delta > 0) == higher_is_better
    return f"{SIGNIFICANT} ({'better' if better else 'worse'})"


def compare(
    matrix: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    *,
    higher_is_better: bool = True,
    alpha: float = ALPHA,
    practical: float = PRACTICAL,
    omnibus_significant: bool = True,
    n_resamples: int = 9999,
    seed: int = 0,
    bayes: bool = False,
) -> pd.DataFrame:
    """Paired comparisons ``a`` vs ``b`` over the blocks, Holm-corrected as one family.

    One row per pair with: n, n_zero (zero differences, dropped by the test), mean_a, mean_b,
    delta = mean(a − b) (raw metric units; for lower-is-better metrics a negative Δ favours a),
    ci_low / ci_high / ci_method (bootstrap 95 % CI of Δ; skipped when ``n_resamples`` is 0),
    statistic and p (two-sided Wilcoxon), p_holm, r_rb (rank-biserial on a − b, sign follows Δ),
    win_rate (share of blocks where a is better), loss_rate, too_few (significance out of reach
    for the number of non-zero differences and the family size; p and p_holm are NaN then),
    verdict, and with
    ``bayes`` p_a_better / p_rope / p_b_better (NaN when baycomp is missing).
    """
    m = _check(matrix)
    cols_idx = {c: i for i, c in enumerate(m.columns)}
    vals = m.to_numpy()
    rows = []
    for i, (a, b) in enumerate(pairs):
        xa, xb = vals[:, cols_idx[a]], vals[:, cols_idx[b]]
        d = xa - xb
        n = int(d.size)
        n_nonzero = int(np.count_nonzero(d))
        few = too_few_blocks(n_nonzero, alpha, family=len(pairs))
        stat, p = wilcoxon_test(d)
        r, tp, tm = rank_biserial(d)
        if n_resamples > 0:
            lo, hi, how = bootstrap_ci(d, n_resamples=n_resamples, seed=seed + i)
        else:
            lo, hi, how = math.nan, math.nan, "none"
        better = d > 0 if higher_is_better else d < 0
        worse = d < 0 if higher_is_better else d > 0
        row = [
            a, b, n, n - n_nonzero, float(xa.mean()), float(xb.mean()), float(d.mean()),
            lo, hi, how, stat, tp, tm, p, r,
            float(better.mean()) if n else math.nan, float(worse.mean()) if n else math.nan, few,
        ]  # fmt: skip
        if bayes:
            sign = 1.0 if higher_is_better else -1.0
            probs = bayesian_signed_rank(sign * xa, sign * xb, practical)
            row += list(probs) if probs is not None else [math.nan] * 3
        rows.append(row)
    cols = [
        "a", "b", "n", "n_zero", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "ci_method",
        "statistic", "t_plus", "t_minus", "p", "r_rb", "win_rate", "loss_rate", "too_few",
    ]  # fmt: skip
    if bayes:
        cols += ["p_a_better", "p_rope", "p_b_better"]
    p_holm = holm([row[13] for row in rows])  # the whole family, also the hopeless ones
    verdicts = [
        verdict(
            ph,
            row[6],
            row[2] - row[3],
            practical,
            alpha,
            higher_is_better,
            omnibus_significant,
            family=len(rows),
        )
        for ph, row in zip(p_holm, rows, strict=True)
    ]
    out = pd.DataFrame(rows, columns=cols)
    out.insert(cols.index("p") + 1, "p_holm", p_holm)
    # no p-values where significance is out of reach: the verdict says so instead
    out.loc[out["too_few"], ["p", "p_holm"]] = math.nan
    out["significant"] = [v.startswith(SIGNIFICANT) for v in verdicts]
    out["verdict"] = verdicts
    return out


def significance_matrix(pairs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Symmetric methods × methods matrix for a CD diagram from an all-pairs :func:`compare`.

    Entries are the Holm-adjusted p where the verdict is "significant" and 1 elsewhere (so a
    crossbar joins every pair without a significant *and* practically relevant difference).
    """
    sig = pd.DataFrame(1.0, index=list(methods), columns=list(methods))
    for _, row in pairs.iterrows():
        if row["significant"]:
            sig.loc[row["a"], row["b"]] = sig.loc[row["b"], row["a"]] = float(row["p_holm"])
    return sig


# --------------------------------------------------------------------------------------------
# everything at once


@dataclass
class Comparison:
    """The full analysis of one blocks × methods matrix."""

    matrix: pd.DataFrame
    reference: str
    higher_is_better: bool
    alpha: float
    practical: float
    friedman: FriedmanResult
    nemenyi_q: float
    nemenyi_cd: float
    vs_reference: pd.DataFrame
    pairs: pd.DataFrame
    sig_matrix: pd.DataFrame
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    family: str = "reference"  # "reference": Holm over k − 1 tests; "pairs": over k(k − 1)/2

    @property
    def family_size(self) -> int:
        """How many tests the Holm correction of the vs-reference verdicts runs over."""
        return len(self.pairs) if self.family == "pairs" else max(1, self.k - 1)

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def k(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def too_few(self) -> bool:
        """No comparison with the reference can reach significance (N alone or after Holm)."""
        return too_few_blocks(self.n, self.alpha, family=max(1, self.family_size))

    @property
    def omnibus_significant(self) -> bool:
        """The Iman–Davenport gate: True when it rejects or when there is none (k = 2)."""
        return self.friedman.significant(self.alpha) if self.friedman.available else True


def analyze(
    matrix: pd.DataFrame,
    reference: str | None = None,
    *,
    higher_is_better: bool = True,
    alpha: float = ALPHA,
    practical: float = PRACTICAL,
    gate: bool = True,
    n_resamples: int = 9999,
    seed: int = 0,
    bayes: bool = True,
    family: str = "reference",
) -> Comparison:
    """Ranks, Friedman/Iman–Davenport, Nemenyi CD, Wilcoxon–Holm vs reference and all pairs.

    ``reference`` defaults to "fedavg" when present, else the first column. With ``gate`` (and
    k ≥ 3) the post hoc verdicts require the Iman–Davenport test to reject. ``summary`` has one
    row per method: mean, mean rank, and the comparison with the reference.

    ``family="reference"`` corrects the vs-reference tests as their own family (k − 1 tests)
    and all pairs as another; ``family="pairs"`` uses one family, all k(k − 1)/2 pairs, for
    everything: the vs-reference rows are then the pairs rows that contain the reference
    (oriented method − reference), so a verdict against the reference and the CD diagram's
    crossbars (:attr:`Comparison.sig_matrix`) always agree.
    """
    if family not in ("reference", "pairs"):
        raise ValueError(f"family must be 'reference' or 'pairs', got {family!r}")
    m = _check(matrix)
    methods = list(m.columns)
    if not methods:
        raise ValueError("no methods to compare")
    if reference is None:
        reference = "fedavg" if "fedavg" in methods else methods[0]
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not one of the methods {methods}")
    fr = friedman(m, higher_is_better)
    k, n = len(methods), len(m)
    q = nemenyi_q(k, alpha) if k >= 2 else math.nan
    cd = nemenyi_cd(k, n, alpha) if k >= 2 and n > 0 else math.nan
    omnibus = (fr.significant(alpha) if fr.available else True) if gate else True
    kw = dict(
        higher_is_better=higher_is_better,
        alpha=alpha,
        practical=practical,
        omnibus_significant=omnibus,
        n_resamples=n_resamples,
        seed=seed,
        bayes=bayes,
    )
    all_pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    if family == "pairs":  # the reference always second, so its rows read "method − reference"
        all_pairs = [(b, a) if a == reference else (a, b) for a, b in all_pairs]
        pairs = compare(m, all_pairs, **{**kw, "bayes": False})
        vs_ref = pairs[pairs["b"] == reference].reset_index(drop=True)
        if bayes:
            vs_ref = _with_bayes(vs_ref, m, higher_is_better, practical)
    else:
        vs_ref = compare(m, [(a, reference) for a in methods if a != reference], **kw)
        pairs = compare(m, all_pairs, **{**kw, "bayes": False})
    sig = significance_matrix(pairs, methods)
    summary = pd.DataFrame(
        {
            "method": methods,
            "mean": m.mean(axis=0).to_numpy(),
            "std_blocks": m.std(axis=0, ddof=1).to_numpy() if n > 1 else np.nan,
            "mean_rank": fr.mean_ranks.to_numpy(),
        }
    )
    summary["is_reference"] = summary["method"] == reference
    summary = summary.merge(
        vs_ref.drop(columns=["b", "mean_a", "mean_b"]).rename(columns={"a": "method"}),
        on="method",
        how="left",
    )
    summary = summary.sort_values(["mean_rank", "method"]).reset_index(drop=True)
    return Comparison(
        matrix=m,
        reference=reference,
        higher_is_better=higher_is_better,
        alpha=alpha,
        practical=practical,
        friedman=fr,
        nemenyi_q=q,
        nemenyi_cd=cd,
        vs_reference=vs_ref,
        pairs=pairs,
        sig_matrix=sig,
        summary=summary,
        family=family,
    )


def _with_bayes(
    rows: pd.DataFrame, m: pd.DataFrame, higher_is_better: bool, practical: float
) -> pd.DataFrame:
    """The Bayesian signed-rank columns of :func:`compare` added to existing pair rows."""
    sign = 1.0 if higher_is_better else -1.0
    probs = [
        bayesian_signed_rank(sign * m[a].to_numpy(), sign * m[b].to_numpy(), practical)
        for a, b in zip(rows["a"], rows["b"], strict=True)
    ]
    out = rows.copy()
    for i, col in enumerate(("p_a_better", "p_rope", "p_b_better")):
        out[col] = [p[i] if p is not None else math.nan for p in probs]
    return out
