"""Definition checks of pflbench.stats written against surviving mutants (issue 22).

Expected values come from the formulas (Holm's step-down, Friedman's χ² with its tie correction,
Iman–Davenport, rank sums) written out here, or from the library that defines the test
(scipy's Wilcoxon, a bootstrap redrawn with the same generator), never from pflbench's output.
"""

from __future__ import annotations

import gc
import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pflbench import stats

# --------------------------------------------------------------------------------------------
# Formulas written out
# --------------------------------------------------------------------------------------------


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm: sort ascending, adjusted p_(i) = max over j ≤ i of min(1, (m − j)·p_(j))."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


def friedman_by_hand(rank_rows: np.ndarray) -> float:
    """χ² = (12/(Nk(k+1)) Σ R_j² − 3N(k+1)) / (1 − Σ(t³ − t)/(Nk(k² − 1)))."""
    n, k = rank_rows.shape
    rsum = rank_rows.sum(axis=0)
    chi2 = 12.0 / (n * k * (k + 1)) * float((rsum**2).sum()) - 3.0 * n * (k + 1)
    ties = 0.0
    for row in rank_rows:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts**3 - counts).sum())
    return chi2 / (1.0 - ties / (n * k * (k * k - 1)))


# an 8 × 3 matrix (higher is better) with one tie (block 2) and known within-block ranks
SMALL = pd.DataFrame(
    {
        "fedavg": [0.70, 0.60, 0.80, 0.50, 0.90, 0.40, 0.65, 0.30],
        "a": [0.75, 0.60, 0.85, 0.45, 0.95, 0.48, 0.70, 0.35],
        "b": [0.60, 0.70, 0.70, 0.40, 0.80, 0.35, 0.55, 0.40],
    }
)
SMALL_RANKS = np.array(
    [[2, 1, 3], [2.5, 2.5, 1], [2, 1, 3], [1, 2, 3], [2, 1, 3], [2, 1, 3], [2, 1, 3], [3, 2, 1]],
    dtype=float,
)


# --------------------------------------------------------------------------------------------
# Ranks, Friedman, Iman–Davenport, Nemenyi
# --------------------------------------------------------------------------------------------


def test_ranks_and_mean_ranks_of_a_small_matrix():
    np.testing.assert_array_equal(stats.ranks(SMALL).to_numpy(), SMALL_RANKS)
    mr = stats.mean_ranks(SMALL)
    assert mr.name == "mean_rank" and list(mr.index) == ["fedavg", "a", "b"]
    np.testing.assert_allclose(mr.to_numpy(), SMALL_RANKS.mean(axis=0))
    # lower is better: rank k + 1 − r
    np.testing.assert_allclose(
        stats.mean_ranks(SMALL, higher_is_better=False).to_numpy(), 4 - SMALL_RANKS.mean(axis=0)
    )
    # integer input is accepted (cast to float)
    ints = pd.DataFrame({"x": [1, 3], "y": [2, 2]})
    assert stats.ranks(ints).to_numpy().tolist() == [[2.0, 1.0], [1.0, 2.0]]


def test_the_matrix_check_names_what_is_wrong():
    with pytest.raises(TypeError, match="^expected a blocks × methods DataFrame$"):
        stats.ranks(SMALL.to_numpy())  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="^the blocks × methods matrix has missing values; drop incomplete blocks$"
    ):
        stats.friedman(SMALL.where(SMALL > 0.41))


@pytest.mark.parametrize("higher", [True, False])
def test_friedman_is_the_tie_corrected_formula_with_iman_davenport(higher):
    m = SMALL if higher else 1.0 - SMALL
    res = stats.friedman(m, higher_is_better=higher)
    chi2 = friedman_by_hand(SMALL_RANKS)
    n, k = SMALL_RANKS.shape
    assert (res.k, res.n, res.available, res.note) == (3, 8, True, "")
    assert res.chi2 == pytest.approx(chi2, rel=1e-12)
    assert res.p == pytest.approx(sps.chi2.sf(chi2, k - 1), rel=1e-10)
    f = (n - 1) * chi2 / (n * (k - 1) - chi2)
    assert res.f == pytest.approx(f, rel=1e-12)
    assert res.f_p == pytest.approx(sps.f.sf(f, k - 1, (k - 1) * (n - 1)), rel=1e-10)
    np.testing.assert_allclose(res.mean_ranks.to_numpy(), SMALL_RANKS.mean(axis=0))


def test_friedman_is_unavailable_or_trivial_where_it_must_be():
    two = stats.friedman(SMALL[["fedavg", "a"]])
    assert not two.available and math.isnan(two.chi2) and math.isnan(two.f_p)
    assert two.note == "Friedman needs k ≥ 3 methods and N ≥ 2 blocks"
    assert not two.significant()
    one_block = stats.friedman(SMALL.iloc[:1])
    assert not one_block.available and (one_block.k, one_block.n) == (3, 1)
    assert stats.friedman(SMALL.iloc[:2]).available
    ties = pd.DataFrame({"x": [0.5, 0.7], "y": [0.5, 0.7], "z": [0.5, 0.7]})
    res = stats.friedman(ties)
    assert (res.chi2, res.p, res.f, res.f_p) == (0.0, 1.0, 0.0, 1.0)
    assert res.available and res.note == "all methods tie in every block"
    assert not res.significant()


def test_friedman_result_significance_uses_its_alpha_strictly():
    res = stats.FriedmanResult(3, 10, pd.Series([1.0, 2.0, 3.0]), f_p=0.03)
    assert res.significant() and res.significant(0.031) and not res.significant(0.03)
    assert not res.significant(0.01)
    off = stats.FriedmanResult(3, 10, pd.Series([1.0, 2.0, 3.0]), f_p=0.0, available=False)
    assert not off.significant()


def test_iman_davenport_formula_and_perfect_agreement():
    f, p = stats.iman_davenport(4.0, 10, 3)
    assert f == pytest.approx(9 * 4.0 / (10 * 2 - 4.0))
    assert p == pytest.approx(sps.f.sf(9 * 4.0 / 16.0, 2, 18))
    # χ² = N(k − 1): every block ranks the methods the same way → F is infinite, p = 0
    assert stats.iman_davenport(6.0, 3, 3) == (math.inf, 0.0)
    assert stats.iman_davenport(7.0, 3, 3) == (math.inf, 0.0)
    # just below perfect agreement the denominator is small but positive: a finite F
    f, p = stats.iman_davenport(5.5, 3, 3)
    assert f == pytest.approx(2 * 5.5 / 0.5) and p == pytest.approx(sps.f.sf(22.0, 2, 4))


def test_friedman_from_mean_ranks_formula():
    r = [1.5, 2.0, 2.5]
    n, k = 8, 3
    chi2 = 12.0 * n / (k * (k + 1)) * (sum(x * x for x in r) - k * (k + 1) ** 2 / 4.0)
    res = stats.friedman_from_mean_ranks(r, n)
    assert res.available and (res.k, res.n) == (3, 8)
    assert res.chi2 == pytest.approx(chi2) and chi2 == pytest.approx(4.0)
    assert res.p == pytest.approx(sps.chi2.sf(4.0, 2))
    assert res.f == pytest.approx(7 * 4.0 / (16 - 4.0))
    assert res.f_p == pytest.approx(sps.f.sf(7 * 4.0 / 12.0, 2, 14))
    assert res.mean_ranks.name == "mean_rank"
    # two methods are enough here (k ≥ 2), one is not, nor one block
    two = stats.friedman_from_mean_ranks([1.25, 1.75], 2)
    assert two.available and two.chi2 == pytest.approx(12 * 2 / 6 * (1.25**2 + 1.75**2 - 4.5))
    for bad, k, n in (
        (stats.friedman_from_mean_ranks([1.0], 5), 1, 5),
        (stats.friedman_from_mean_ranks(r, 1), 3, 1),
    ):
        assert bad.available is False and math.isnan(bad.chi2) and math.isnan(bad.f_p)
        assert (bad.k, bad.n) == (k, n) and bad.mean_ranks.name == "mean_rank"
        assert bad.mean_ranks.tolist() == ([1.0] if k == 1 else r)
        assert bad.note == "needs k ≥ 2 methods and N ≥ 2 blocks"


def test_nemenyi_at_another_alpha_and_the_cd_formula():
    # Demšar (2006), Table 5(b), α = 0.10: q = 1.645, 2.052, 2.291 for k = 2, 3, 4
    got = [stats.nemenyi_q(k, alpha=0.10) for k in (2, 3, 4)]
    np.testing.assert_allclose(got, [1.645, 2.052, 2.291], atol=5e-4)
    q = stats.nemenyi_q(5)
    assert stats.nemenyi_cd(5, 12) == pytest.approx(q * math.sqrt(5 * 6 / (6.0 * 12)))
    assert stats.nemenyi_cd(3, 20, alpha=0.10) == pytest.approx(
        stats.nemenyi_q(3, 0.10) * math.sqrt(12 / 120)
    )
    with pytest.raises(ValueError, match="^Nemenyi needs k ≥ 2 methods$"):
        stats.nemenyi_q(1)


# --------------------------------------------------------------------------------------------
# Wilcoxon, rank-biserial, too few blocks
# --------------------------------------------------------------------------------------------


def test_min_wilcoxon_p_and_too_few_at_their_boundaries():
    assert stats.min_wilcoxon_p(0) == 1.0 and stats.min_wilcoxon_p(-2) == 1.0
    assert stats.min_wilcoxon_p(1) == 1.0 and stats.min_wilcoxon_p(2) == 0.5
    assert stats.min_wilcoxon_p(7) == 2.0 / 128
    # p_min(5) = 0.0625: too few at α = 0.0625 (p < α impossible), enough just above it
    assert stats.too_few_blocks(5, alpha=0.0625) and not stats.too_few_blocks(5, alpha=0.07)
    assert stats.too_few_blocks(4, alpha=0.1) and not stats.too_few_blocks(5, alpha=0.1)
    # family of 3 at N = 7: 3 · 2/128 ≈ 0.047 < 0.05; family of 4: 0.0625 ≥ 0.05
    assert not stats.too_few_blocks(7, family=3) and stats.too_few_blocks(7, family=4)


def test_rank_biserial_with_ties_and_all_zero():
    # |d| = 1, 1, 2 → average ranks 1.5, 1.5, 3: T+ = 1.5 + 3, T− = 1.5
    r, tp, tm = stats.rank_biserial(np.array([1.0, -1.0, 2.0, 0.0]))
    assert (tp, tm) == (4.5, 1.5) and r == pytest.approx(3.0 / 6.0)
    r, tp, tm = stats.rank_biserial(np.zeros(4))
    assert math.isnan(r) and (tp, tm) == (0.0, 0.0)
    assert stats.rank_biserial(np.array([-0.5, -0.2]))[0] == -1.0
    assert stats.rank_biserial(np.array([0.0, 0.3])) == (1.0, 1.0, 0.0)  # one difference


def test_wilcoxon_test_is_scipys_two_sided_test_without_the_zeros():
    d = np.array([0.0, 0.1, -0.2, 0.3, 0.4, 0.5, -0.05, 0.6, 0.0, 0.7])
    nz = d[d != 0]
    ref = sps.wilcoxon(nz, alternative="two-sided")
    stat, p = stats.wilcoxon_test(d)
    assert stat == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # the zeros are dropped, not ranked (zero_method "pratt" or "zsplit" gives another p)
    assert p != pytest.approx(sps.wilcoxon(d, zero_method="pratt").pvalue)
    assert p != pytest.approx(sps.wilcoxon(nz, alternative="greater").pvalue)
    stat, p = stats.wilcoxon_test(np.zeros(6))
    assert math.isnan(stat) and p == 1.0
    # one non-zero difference is a test (T = 0 and p = 1), not the all-zero case
    ref = sps.wilcoxon([0.3])
    assert stats.wilcoxon_test(np.array([0.0, 0.3])) == (ref.statistic, ref.pvalue)
    assert ref.statistic == 0.0


# --------------------------------------------------------------------------------------------
# Bootstrap CI
# --------------------------------------------------------------------------------------------


def test_bootstrap_percentile_ci_is_the_quantiles_of_resampled_means():
    """The percentile CI redrawn by hand: n_resamples rows of n indices from the seeded
    generator, the mean of each row, and the (1 − c)/2 and (1 + c)/2 quantiles."""
    d = np.array([0.03, -0.01, 0.05, 0.02, 0.00, 0.04, 0.01])
    rng = np.random.default_rng(11)
    idx = rng.integers(0, d.size, (499, d.size))
    means = d[idx].mean(axis=-1)
    lo, hi = np.quantile(means, [0.05, 0.95])
    got = stats.bootstrap_ci(d, confidence=0.9, n_resamples=499, seed=11)
    assert got == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12), "percentile")
    # the same with BCa allowed from 7 values on: scipy's BCa with the same generator
    ref = sps.bootstrap(
        (d,),
        np.mean,
        confidence_level=0.9,
        n_resamples=499,
        method="BCa",
        rng=np.random.default_rng(11),
    ).confidence_interval
    got = stats.bootstrap_ci(d, confidence=0.9, n_resamples=499, seed=11, bca_min_n=7)
    assert got == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12), "BCa")
    assert stats.bootstrap_ci(d, confidence=0.9, n_resamples=499, seed=11, bca_min_n=8)[2] == (
        "percentile"
    )


def test_bootstrap_ci_of_empty_single_and_constant_input():
    assert stats.bootstrap_ci(np.array([0.5]), seed=3) == (0.5, 0.5, "degenerate")
    # two different values are not degenerate: the percentile interval of the resampled means
    d = np.array([0.0, 1.0])
    means = d[np.random.default_rng(3).integers(0, 2, (99, 2))].mean(axis=-1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert (lo, hi) == (0.0, 1.0)
    assert stats.bootstrap_ci(d, n_resamples=99, seed=3) == (lo, hi, "percentile")
    lo, hi, how = stats.bootstrap_ci(np.array([]))
    assert math.isnan(lo) and math.isnan(hi) and how == "none"


def test_bootstrap_ci_falls_back_to_percentile_when_bca_is_not_finite():
    """One resample: BCa's bias correction is ±∞ (the one mean is below or above the estimate),
    its interval NaN; the percentile interval of that one resampled mean is returned, drawn
    from a fresh generator of the same seed."""
    d = np.array([0.0] * 5 + [1.0] * 5)
    rng = np.random.default_rng(2)
    one_mean = float(d[rng.integers(0, 10, (1, 10))].mean())
    assert stats.bootstrap_ci(d, n_resamples=1, seed=2) == (one_mean, one_mean, "percentile")


# --------------------------------------------------------------------------------------------
# Holm
# --------------------------------------------------------------------------------------------


def test_holm_is_the_step_down_written_out():
    p = [0.04, 0.001, 0.03, 0.5, 0.012]
    np.testing.assert_allclose(stats.holm(p), holm_by_hand(p), rtol=1e-12)
    # capped at 1, monotone in the sorted order (0.3·3 = 0.9 < 0.45·2 = 0.9; 0.6·1)
    np.testing.assert_allclose(stats.holm([0.3, 0.45, 0.6]), [0.9, 0.9, 0.9])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])


def test_holm_of_a_family_of_one_and_of_nothing():
    assert stats.holm([0.2]).tolist() == [0.2]
    out = stats.holm([math.nan, 0.2, math.nan])
    assert math.isnan(out[0]) and out[1] == 0.2 and math.isnan(out[2])
    assert stats.holm([1.5]).tolist() == [1.0]  # capped even alone
    assert np.isnan(stats.holm([math.nan, math.nan])).all()
    assert stats.holm([]).shape == (0,)


def test_holm_leaves_the_garbage_collectors_freeze_as_it_found_it():
    """holm freezes the heap around statsmodels' gc.collect() (speed only); it must undo its own
    freeze and keep a caller's."""
    gc.unfreeze()  # a thawed start (harmless: frozen objects go back to the oldest generation)
    stats.holm([0.01, 0.02, 0.04])
    assert gc.get_freeze_count() == 0  # its own freeze undone
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        stats.holm([0.01, 0.02, 0.04])
        assert gc.get_freeze_count() >= frozen > 0  # the caller's freeze kept
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------------------------
# The wording rule
# --------------------------------------------------------------------------------------------


def test_verdict_wording_exactly():
    assert stats.verdict(0.001, 0.2, 5) == (
        "too few blocks for significance (N = 5: smallest attainable p = 0.0625 ≥ 0.05)"
    )
    assert stats.verdict(0.001, 0.2, 6, family=2) == (
        "too few blocks for significance (N = 6 with 2 Holm-corrected comparisons: smallest "
        "attainable adjusted p = 0.0625 ≥ 0.05)"
    )
    assert stats.verdict(0.049, 0.2, 10) == "significant (better)"
    assert stats.verdict(0.05, 0.2, 10) == stats.NO_EVIDENCE  # p = α is not below α
    assert stats.verdict(math.nan, 0.2, 10) == stats.NO_EVIDENCE
    assert stats.verdict(0.001, 0.01, 10) == (
        "no evidence of a difference (Holm p < 0.05 but |Δ| ≤ 0.01, the practical threshold)"
    )
    assert stats.verdict(0.001, -0.011, 10) == "significant (worse)"
    assert stats.verdict(0.001, -0.011, 10, higher_is_better=False) == "significant (better)"
    assert stats.verdict(0.001, 0.011, 10, higher_is_better=False) == "significant (worse)"
    assert stats.verdict(0.001, 0.2, 10, omnibus_significant=False) == (
        "no evidence of a difference (the Friedman/Iman–Davenport test did not reject)"
    )


def test_verdict_uses_its_alpha_and_practical_threshold():
    assert stats.verdict(0.07, 0.2, 10, alpha=0.1) == "significant (better)"
    assert stats.verdict(0.07, 0.2, 10) == stats.NO_EVIDENCE
    assert stats.verdict(0.001, 0.04, 10, practical=0.05).startswith(
        "no evidence of a difference (Holm p < 0.05 but |Δ| ≤ 0.05"
    )
    assert stats.verdict(0.001, 0.2, 4, alpha=0.1) == (
        "too few blocks for significance (N = 4: smallest attainable p = 0.125 ≥ 0.1)"
    )
    assert stats.verdict(0.001, 0.2, 5, alpha=0.1) == "significant (better)"


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def test_compare_columns_by_hand():
    """Two pairs on 8 blocks (one zero difference); every column from its definition, Holm over the two p-values."""
    m = pd.DataFrame(
        {
            "ref": [0.50, 0.60, 0.70, 0.55, 0.65, 0.58, 0.62, 0.66],
            "x": [0.55, 0.60, 0.78, 0.59, 0.62, 0.70, 0.69, 0.75],
            "y": [0.52, 0.61, 0.69, 0.60, 0.60, 0.59, 0.60, 0.64],
        }
    )
    pairs = [("x", "ref"), ("y", "ref")]
    out = stats.compare(m, pairs, n_resamples=300, seed=5, practical=0.0)
    assert list(out["a"]) == ["x", "y"] and list(out["b"]) == ["ref", "ref"]
    raw_p = []
    for i, (a, b) in enumerate(pairs):
        d = m[a].to_numpy() - m[b].to_numpy()
        row = out.iloc[i]
        nz = d[d != 0]
        assert row["n"] == 8 and row["n_zero"] == 8 - nz.size
        assert row["mean_a"] == pytest.approx(m[a].mean()) and row["mean_b"] == pytest.approx(
            m[b].mean()
        )
        assert row["delta"] == pytest.approx(d.mean())
        rk = sps.rankdata(np.abs(nz))
        assert row["t_plus"] == pytest.approx(rk[nz > 0].sum())
        assert row["t_minus"] == pytest.approx(rk[nz < 0].sum())
        assert row["r_rb"] == pytest.approx((rk[nz > 0].sum() - rk[nz < 0].sum()) / rk.sum())
        ref = sps.wilcoxon(nz)
        assert row["statistic"] == pytest.approx(ref.statistic)
        assert row["p"] == pytest.approx(ref.pvalue)
        raw_p.append(ref.pvalue)
        assert row["win_rate"] == pytest.approx(np.mean(d > 0))
        assert row["loss_rate"] == pytest.approx(np.mean(d < 0))
        lo, hi, how = stats.bootstrap_ci(d, n_resamples=300, seed=5 + i)
        assert (row["ci_low"], row["ci_high"], row["ci_method"]) == (lo, hi, how)
        assert not row["too_few"]
    np.testing.assert_allclose(out["p_holm"], holm_by_hand(raw_p))
    # the CIs of the two pairs use different seeds: pair 1 with seed 6, not 5
    d_y = m["y"].to_numpy() - m["ref"].to_numpy()
    assert out.iloc[1]["ci_low"] != stats.bootstrap_ci(d_y, n_resamples=300, seed=5)[0]
    assert list(out.columns) == [
        "a", "b", "n", "n_zero", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "ci_method",
        "statistic", "t_plus", "t_minus", "p", "p_holm", "r_rb", "win_rate", "loss_rate",
        "too_few", "significant", "verdict",
    ]  # fmt: skip
    expected = [
        stats.verdict(ph, dl, n_nz, 0.0, family=2)
        for ph, dl, n_nz in zip(holm_by_hand(raw_p), out["delta"], (7, 8), strict=True)
    ]
    assert out["verdict"].tolist() == expected
    assert out["significant"].tolist() == [v.startswith("significant") for v in expected]
    # without resamples: no CI
    none = stats.compare(m, pairs, n_resamples=0)
    assert none["ci_method"].tolist() == ["none", "none"] and none["ci_low"].isna().all()


def test_compare_lower_is_better_counts_wins_as_decreases():
    m = pd.DataFrame({"ref": [5.0, 4.0, 6.0, 3.0], "x": [4.0, 4.0, 7.0, 1.0]})
    out = stats.compare(m, [("x", "ref")], higher_is_better=False, n_resamples=0)
    assert out.loc[0, "win_rate"] == 0.5 and out.loc[0, "loss_rate"] == 0.25
    assert out.loc[0, "delta"] == pytest.approx(-0.5)
    up = stats.compare(m, [("x", "ref")], n_resamples=0)
    assert up.loc[0, "win_rate"] == 0.25 and up.loc[0, "loss_rate"] == 0.5


def test_compare_p_holm_covers_the_hopeless_rows_too():
    """A pair with 2 non-zero differences still counts in the Holm family: with a second pair
    of 8 differences the latter's p is doubled (its p is the smaller one)."""
    m = pd.DataFrame(
        {
            "ref": np.zeros(8),
            "x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
            "y": [0.1, -0.2, 0, 0, 0, 0, 0, 0],
        }
    )
    out = stats.compare(m, [("x", "ref"), ("y", "ref")], n_resamples=0)
    p_x = sps.wilcoxon(m["x"]).pvalue
    assert out.loc[0, "p_holm"] == pytest.approx(2 * p_x)
    assert bool(out.loc[1, "too_few"]) and math.isnan(out.loc[1, "p"])
    assert out.loc[1, "n_zero"] == 6


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
def test_compare_bayes_columns_follow_the_orientation():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.7, 12)
    m = pd.DataFrame({"ref": base, "x": base + 0.05 + rng.normal(0, 0.005, 12)})
    up = stats.compare(m, [("x", "ref")], n_resamples=0, bayes=True)
    assert up.loc[0, "p_a_better"] > 0.95
    exp = stats.bayesian_signed_rank(m["x"].to_numpy(), m["ref"].to_numpy(), stats.PRACTICAL)
    assert (up.loc[0, "p_a_better"], up.loc[0, "p_rope"], up.loc[0, "p_b_better"]) == exp
    down = stats.compare(m, [("x", "ref")], higher_is_better=False, n_resamples=0, bayes=True)
    assert down.loc[0, "p_b_better"] > 0.95
    # a wide practical threshold puts the difference inside the ROPE
    wide = stats.compare(m, [("x", "ref")], n_resamples=0, bayes=True, practical=0.5)
    assert wide.loc[0, "p_rope"] > 0.95


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
def test_bayesian_signed_rank_is_baycomps_with_reversed_arguments():
    import baycomp

    rng = np.random.default_rng(8)
    a = rng.uniform(0.5, 0.7, 10)
    b = a - 0.01 + rng.normal(0, 0.01, 10)
    got = stats.bayesian_signed_rank(a, b, rope=0.005, nsamples=700, seed=3)
    left, rope, right = baycomp.SignedRankTest.probs(b, a, rope=0.005, nsamples=700, random_state=3)
    assert got == (right, rope, left)
    assert got != stats.bayesian_signed_rank(a, b, rope=0.005, nsamples=700, seed=4)
    assert stats.bayesian_signed_rank(a, b[:5]) is None  # the test fails: None, no exception


def test_significance_matrix_is_symmetric_with_holm_p_where_significant():
    pairs = pd.DataFrame(
        {
            "a": ["x", "x", "y"],
            "b": ["y", "z", "z"],
            "p_holm": [0.01, 0.02, 0.03],
            "significant": [True, False, True],
        }
    )
    sig = stats.significance_matrix(pairs, ["x", "y", "z"])
    assert list(sig.index) == ["x", "y", "z"] and list(sig.columns) == ["x", "y", "z"]
    expected = [[1.0, 0.01, 1.0], [0.01, 1.0, 0.03], [1.0, 0.03, 1.0]]
    assert sig.to_numpy().tolist() == expected


# --------------------------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------------------------


def test_analyze_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="family must be 'reference' or 'pairs', got 'all'"):
        stats.analyze(SMALL, family="all")
    with pytest.raises(ValueError, match="^no methods to compare$"):
        stats.analyze(pd.DataFrame(index=range(3)))
    with pytest.raises(ValueError, match=r"reference 'x' is not one of the methods \['fedavg'"):
        stats.analyze(SMALL, reference="x")


def test_analyze_summary_and_nemenyi_by_hand():
    m = SMALL[["a", "b", "fedavg"]]  # fedavg is the default reference even when not first
    comp = stats.analyze(m, n_resamples=0, bayes=False)
    assert comp.reference == "fedavg" and (comp.n, comp.k) == (8, 3)
    assert comp.nemenyi_q == pytest.approx(stats.nemenyi_q(3))
    assert comp.nemenyi_cd == pytest.approx(stats.nemenyi_q(3) * math.sqrt(3 * 4 / 48))
    s = comp.summary.set_index("method")
    for c in ("a", "b", "fedavg"):
        assert s.loc[c, "mean"] == pytest.approx(m[c].mean())
        assert s.loc[c, "std_blocks"] == pytest.approx(m[c].std(ddof=1))
        assert s.loc[c, "is_reference"] == (c == "fedavg")
    # rank sums a 11.5, fedavg 16.5, b 20 over 8 blocks: the summary is sorted by mean rank
    assert comp.summary["method"].tolist() == ["a", "fedavg", "b"]
    np.testing.assert_allclose(comp.summary["mean_rank"], [11.5 / 8, 16.5 / 8, 20 / 8])
    assert math.isnan(s.loc["fedavg", "delta"])
    assert s.loc["a", "delta"] == pytest.approx((m["a"] - m["fedavg"]).mean())
    assert "mean_a" not in comp.summary.columns and "b" not in comp.summary.columns
    # vs reference: k − 1 = 2 tests in its own family, all 3 pairs in another
    assert comp.family_size == 2 and len(comp.pairs) == 3
    assert comp.vs_reference["a"].tolist() == ["a", "b"]
    assert comp.vs_reference["b"].tolist() == ["fedavg", "fedavg"]


def test_analyze_summary_sorts_equal_mean_ranks_by_name_and_handles_one_block():
    m = pd.DataFrame({"fedavg": [0.5, 0.6], "b": [0.6, 0.5], "a": [0.6, 0.5]})
    comp = stats.analyze(m, n_resamples=0, bayes=False)
    assert comp.summary["method"].tolist() == ["a", "b", "fedavg"]
    one = stats.analyze(m.iloc[:1], n_resamples=0, bayes=False)
    assert one.summary["std_blocks"].isna().all()
    assert not one.friedman.available and one.omnibus_significant


def test_analyze_nemenyi_for_two_and_one_method():
    two = stats.analyze(SMALL[["fedavg", "a"]], n_resamples=0, bayes=False)
    assert two.nemenyi_q == pytest.approx(1.960, abs=5e-4)
    assert two.nemenyi_cd == pytest.approx(1.960 * math.sqrt(2 * 3 / 48), abs=5e-4)
    one = stats.analyze(SMALL[["fedavg"]], n_resamples=0, bayes=False)
    assert math.isnan(one.nemenyi_q) and math.isnan(one.nemenyi_cd)
    assert one.family_size == 1 and one.vs_reference.empty


def test_analyze_gate_off_lets_post_hoc_verdicts_through():
    """Ten blocks: a beats fedavg in every block; b is best in the even blocks and worst in the
    odd ones. Rank sums a 15, fedavg 25, b 20 → χ² = 12/(10·3·4)·1250 − 120 = 5, F = 9·5/15 = 3,
    p = F(2, 18).sf(3) ≈ 0.075: the gate does not reject, so with the gate on the Holm–Wilcoxon
    result is "no evidence", with gate=False it stands."""
    base = np.linspace(0.5, 0.8, 10)
    a = base + 0.02 + 0.001 * np.arange(10)
    b = base + np.where(np.arange(10) % 2 == 0, 0.5, -0.5)
    m = pd.DataFrame({"fedavg": base, "a": a, "b": b})
    gated = stats.analyze(m, n_resamples=0, bayes=False)
    assert gated.friedman.chi2 == pytest.approx(5.0)
    assert gated.friedman.f_p == pytest.approx(sps.f.sf(3.0, 2, 18))
    assert not gated.omnibus_significant
    assert gated.vs_reference.set_index("a").loc["a", "verdict"] == (
        "no evidence of a difference (the Friedman/Iman–Davenport test did not reject)"
    )
    free = stats.analyze(m, n_resamples=0, bayes=False, gate=False)
    assert free.vs_reference.set_index("a").loc["a", "verdict"] == "significant (better)"
    assert free.omnibus_significant is False  # the property reports the test, not the gate


def test_analyze_pairs_family_orients_rows_against_the_reference():
    """family="pairs": one Holm family of k(k − 1)/2 = 3; the vs-reference rows are the pairs
    rows with the reference second, so their p_holm is the 3-test adjustment."""
    m = SMALL[["a", "fedavg", "b"]]
    comp = stats.analyze(m, n_resamples=0, bayes=False, family="pairs")
    assert comp.family == "pairs" and comp.family_size == 3
    # all pairs in column order, (fedavg, b) turned round to (b, fedavg)
    assert [tuple(r) for r in comp.pairs[["a", "b"]].to_numpy()] == [
        ("a", "fedavg"),
        ("a", "b"),
        ("b", "fedavg"),
    ]
    vs = comp.vs_reference
    assert vs["a"].tolist() == ["a", "b"] and (vs["b"] == "fedavg").all()
    assert vs.index.tolist() == [0, 1]
    raw = [sps.wilcoxon(m[x] - m[y]).pvalue for x, y in (("a", "fedavg"), ("a", "b"))]
    raw.append(sps.wilcoxon(m["b"] - m["fedavg"]).pvalue)
    adj = holm_by_hand(raw)
    np.testing.assert_allclose(comp.pairs["p_holm"], adj)
    np.testing.assert_allclose(vs["p_holm"], [adj[0], adj[2]])
    assert vs["delta"].tolist() == pytest.approx(
        [(m["a"] - m["fedavg"]).mean(), (m["b"] - m["fedavg"]).mean()]
    )
    ref = stats.analyze(m, n_resamples=0, bayes=False)
    assert ref.family_size == 2


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
def test_analyze_pairs_family_adds_bayes_oriented_like_compare():
    m = 1.0 - SMALL  # lower is better
    comp = stats.analyze(m, higher_is_better=False, n_resamples=0, family="pairs")
    vs = comp.vs_reference
    for _, row in vs.iterrows():
        exp = stats.bayesian_signed_rank(-m[row["a"]].to_numpy(), -m["fedavg"].to_numpy())
        assert (row["p_a_better"], row["p_rope"], row["p_b_better"]) == exp
    assert "p_a_better" not in comp.pairs.columns


def test_comparison_too_few_counts_the_family():
    """N = 7 blocks: p_min = 2/128; alone or 3 tests fine (0.047), 4 tests too few."""
    rng = np.random.default_rng(0)
    cols = ["fedavg", "a", "b", "c", "d"]
    m = pd.DataFrame(rng.uniform(0.5, 0.9, (7, 5)), columns=cols)
    assert not stats.analyze(m[cols[:4]], n_resamples=0, bayes=False).too_few
    assert stats.analyze(m, n_resamples=0, bayes=False).too_few
    # all 6 pairs of 4 methods in one family: too few
    assert stats.analyze(m[cols[:4]], n_resamples=0, bayes=False, family="pairs").too_few


# --------------------------------------------------------------------------------------------
# Defaults: the report calls these with their defaults, so its numbers are the defaults' numbers
# --------------------------------------------------------------------------------------------

# ten paired differences with six digits, not symmetric about their mean: BCa and percentile
# differ, and so do neighbouring order statistics of the resampled means (round values such as
# 0.031 make many resampled means equal, and another resample count the same interval)
TEN = np.array(
    [
        0.023772,
        0.016037,
        0.039213,
        0.023147,
        0.00393,
        0.030848,
        0.05912,
        0.048412,
        -0.001112,
        -0.017963,
    ]
)


def _scipy_ci(d: np.ndarray, method: str, n: int = 9999, seed: int = 0) -> tuple[float, float]:
    ci = sps.bootstrap(
        (d,),
        np.mean,
        confidence_level=0.95,
        n_resamples=n,
        method=method,
        **{stats._BOOTSTRAP_RNG: np.random.default_rng(seed)},
    ).confidence_interval
    return float(ci.low), float(ci.high)


def test_default_bootstrap_is_9999_resamples_seeded_zero_with_bca_from_ten_blocks():
    """A published CI is reproducible only if the defaults stay the documented ones: 95 %,
    9999 resamples, generator seed 0, BCa from N = 10 on and percentile below."""
    lo, hi = _scipy_ci(TEN, "BCa")
    assert stats.bootstrap_ci(TEN) == (
        pytest.approx(lo, abs=1e-15),
        pytest.approx(hi, abs=1e-15),
        "BCa",
    )
    assert (lo, hi) != _scipy_ci(TEN, "BCa", n=10000) and (lo, hi) != _scipy_ci(TEN, "BCa", seed=1)
    lo, hi = _scipy_ci(TEN[:9], "percentile")
    assert stats.bootstrap_ci(TEN[:9]) == (lo, hi, "percentile")


def test_compare_and_analyze_bootstrap_with_the_default_resamples_and_a_seed_per_row():
    m = pd.DataFrame({"fedavg": np.linspace(0.5, 0.8, 10), "a": np.linspace(0.5, 0.8, 10) + TEN})
    m["b"] = m["fedavg"] - TEN[::-1]
    comp = stats.analyze(m, bayes=False)
    rows = comp.vs_reference.set_index("a")
    for i, name in enumerate(("a", "b")):  # row i draws from seed 0 + i
        lo, hi, how = stats.bootstrap_ci(
            (m[name] - m["fedavg"]).to_numpy(), n_resamples=9999, seed=i
        )
        assert (
            rows.loc[name, "ci_low"],
            rows.loc[name, "ci_high"],
            rows.loc[name, "ci_method"],
        ) == (
            lo,
            hi,
            how,
        )
    direct = stats.compare(m, [("a", "fedavg")])
    assert (direct.loc[0, "ci_low"], direct.loc[0, "ci_high"]) == (
        rows.loc["a", "ci_low"],
        rows.loc["a", "ci_high"],
    )


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
def test_default_bayesian_test_is_5000_samples_seeded_zero_with_the_practical_rope():
    import baycomp

    a = 0.6 + TEN
    b = np.full(10, 0.6) + 0.01 * np.cos(np.arange(10))
    left, rope, right = baycomp.SignedRankTest.probs(
        b, a, rope=stats.PRACTICAL, nsamples=5000, random_state=0
    )
    assert stats.bayesian_signed_rank(a, b) == (right, rope, left)
    assert stats.bayesian_signed_rank(a, b) != stats.bayesian_signed_rank(a, b, nsamples=5001)
    assert stats.bayesian_signed_rank(a, b) != stats.bayesian_signed_rank(a, b, seed=1)


def test_friedman_ranks_higher_as_better_by_default():
    np.testing.assert_allclose(
        stats.friedman(SMALL).mean_ranks.to_numpy(), SMALL_RANKS.mean(axis=0)
    )
    assert stats.friedman(SMALL[["fedavg", "a"]]).available is False


def test_friedman_of_all_ties_keeps_its_shape_and_mean_ranks():
    ties = pd.DataFrame({"x": [0.5, 0.7], "y": [0.5, 0.7], "z": [0.5, 0.7]})
    res = stats.friedman(ties)
    assert (res.k, res.n) == (3, 2)
    assert res.mean_ranks.to_dict() == {"x": 2.0, "y": 2.0, "z": 2.0}


def test_analyze_passes_direction_and_alpha_to_friedman_and_nemenyi():
    """Lower is better: rank r becomes k + 1 − r (the tie 2.5/2.5 becomes 1.5/1.5)."""
    comp = stats.analyze(SMALL, higher_is_better=False, alpha=0.1, n_resamples=0, bayes=False)
    np.testing.assert_allclose(comp.friedman.mean_ranks.to_numpy(), 4 - SMALL_RANKS.mean(axis=0))
    s = comp.summary.set_index("method")
    np.testing.assert_allclose(
        s.loc[list(SMALL.columns), "mean_rank"].to_numpy(), 4 - SMALL_RANKS.mean(axis=0)
    )
    assert comp.nemenyi_q == stats.nemenyi_q(3, 0.1) != stats.nemenyi_q(3)
    assert comp.nemenyi_cd == pytest.approx(stats.nemenyi_q(3, 0.1) * math.sqrt(3 * 4 / 48))


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
@pytest.mark.parametrize("higher", [True, False])
def test_analyze_pairs_family_bayes_uses_the_practical_margin_and_the_orientation(higher):
    """Differences of a few hundredths, beside a ROPE of 0.03: scaling them or dropping the
    margin moves the probabilities; a, better by 0.045 on average, must come out better."""
    base = np.linspace(0.5, 0.8, 10)
    m = pd.DataFrame({"fedavg": base, "a": base + 2 * TEN, "b": base - TEN[::-1] / 3})
    if not higher:
        m = 1.0 - m
    comp = stats.analyze(m, higher_is_better=higher, practical=0.03, n_resamples=0, family="pairs")
    sign = 1.0 if higher else -1.0
    for _, row in comp.vs_reference.iterrows():
        exp = stats.bayesian_signed_rank(
            sign * m[row["a"]].to_numpy(), sign * m["fedavg"].to_numpy(), 0.03
        )
        assert (row["p_a_better"], row["p_rope"], row["p_b_better"]) == exp
        assert exp != stats.bayesian_signed_rank(
            sign * m[row["a"]].to_numpy(), sign * m["fedavg"].to_numpy()
        )
    a = comp.vs_reference.set_index("a").loc["a"]
    assert a["p_a_better"] > 0.5 > a["p_b_better"]


def test_analyze_pairs_family_bayes_columns_are_nan_when_the_test_gives_nothing(monkeypatch):
    monkeypatch.setattr(stats, "bayesian_signed_rank", lambda *a, **k: None)
    comp = stats.analyze(SMALL, n_resamples=0, family="pairs")
    assert comp.vs_reference[["p_a_better", "p_rope", "p_b_better"]].isna().all().all()
    assert len(comp.vs_reference) == 2


def _bootstrap_where_bca(monkeypatch, bca):
    """scipy's bootstrap with the BCa call replaced: ``bca`` raises or returns an interval."""
    real = sps.bootstrap
    calls = []

    def fake(*args, method="BCa", **kwargs):
        calls.append(method)
        if method == "BCa":
            return bca()
        return real(*args, method=method, **kwargs)

    monkeypatch.setattr(stats.sps, "bootstrap", fake)
    return calls


def test_bootstrap_ci_goes_on_to_percentile_when_bca_raises(monkeypatch):
    def boom():
        raise ValueError("degenerate jackknife")

    lo, hi = _scipy_ci(TEN, "percentile")
    calls = _bootstrap_where_bca(monkeypatch, boom)
    assert stats.bootstrap_ci(TEN) == (lo, hi, "percentile")
    assert calls == ["BCa", "percentile"]


def test_bootstrap_ci_goes_on_to_percentile_when_one_end_of_bca_is_not_finite(monkeypatch):
    half = type("R", (), {"confidence_interval": type("CI", (), {"low": 0.01, "high": math.nan})})
    _bootstrap_where_bca(monkeypatch, lambda: half)
    assert stats.bootstrap_ci(TEN)[2] == "percentile"


def test_bootstrap_ci_says_failed_when_no_method_gives_an_interval(monkeypatch):
    def boom(*args, **kwargs):
        raise ValueError("no interval")

    monkeypatch.setattr(stats.sps, "bootstrap", boom)
    lo, hi, how = stats.bootstrap_ci(TEN)
    assert math.isnan(lo) and math.isnan(hi) and how == "failed"


# five blocks where a beats fedavg in each: the exact two-sided p is 2/2⁵ = 0.0625, out of reach
# at α = 0.05 ("too few blocks") and significant at α = 0.1
FIVE = pd.DataFrame({"fedavg": [0.50, 0.60, 0.55, 0.70, 0.65], "a": [0.53, 0.64, 0.60, 0.76, 0.72]})


def test_compare_and_analyze_judge_with_the_alpha_they_are_given():
    at_05 = stats.compare(FIVE, [("a", "fedavg")], n_resamples=0)
    assert bool(at_05.loc[0, "too_few"]) and math.isnan(at_05.loc[0, "p_holm"])
    at_10 = stats.compare(FIVE, [("a", "fedavg")], alpha=0.1, n_resamples=0)
    assert not at_10.loc[0, "too_few"] and at_10.loc[0, "p_holm"] == 0.0625
    assert at_10.loc[0, "verdict"] == "significant (better)"
    comp = stats.analyze(FIVE, alpha=0.1, n_resamples=0, bayes=False)
    assert comp.vs_reference.loc[0, "verdict"] == "significant (better)"
    assert comp.pairs.loc[0, ["a", "b"]].tolist() == ["fedavg", "a"]
    assert comp.pairs.loc[0, "verdict"] == "significant (worse)"


def test_compare_bootstraps_from_a_single_resample_on():
    one = stats.compare(FIVE, [("a", "fedavg")], n_resamples=1)
    assert one.loc[0, "ci_method"] == "percentile" and np.isfinite(one.loc[0, "ci_low"])
    assert stats.compare(FIVE, [("a", "fedavg")], n_resamples=0).loc[0, "ci_method"] == "none"


@pytest.mark.skipif(importlib.util.find_spec("baycomp") is None, reason="baycomp not installed")
@pytest.mark.parametrize("higher", [True, False])
def test_compare_and_analyze_bayes_near_the_rope_is_the_oriented_test_with_their_margin(higher):
    """Differences of a few hundredths beside a ROPE of 0.03: scaling the oriented values or
    dropping the margin would move the probabilities."""
    base = np.linspace(0.5, 0.8, 10)
    m = pd.DataFrame({"fedavg": base, "a": base + 2 * TEN})
    if not higher:
        m = 1.0 - m
    sign = 1.0 if higher else -1.0
    exp = stats.bayesian_signed_rank(sign * m["a"].to_numpy(), sign * m["fedavg"].to_numpy(), 0.03)
    assert exp != stats.bayesian_signed_rank(
        2 * sign * m["a"].to_numpy(), 2 * sign * m["fedavg"].to_numpy(), 0.03
    )
    row = stats.compare(
        m, [("a", "fedavg")], higher_is_better=higher, practical=0.03, n_resamples=0, bayes=True
    ).loc[0]
    assert (row["p_a_better"], row["p_rope"], row["p_b_better"]) == exp
    ref = stats.analyze(m, higher_is_better=higher, practical=0.03, n_resamples=0).vs_reference
    assert tuple(ref.loc[0, ["p_a_better", "p_rope", "p_b_better"]]) == exp


def test_compare_bayes_columns_are_nan_when_the_test_gives_nothing(monkeypatch):
    monkeypatch.setattr(stats, "bayesian_signed_rank", lambda *a, **k: None)
    out = stats.compare(FIVE, [("a", "fedavg")], n_resamples=0, bayes=True)
    assert out[["p_a_better", "p_rope", "p_b_better"]].isna().all().all()


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_analyze_nemenyi_cd_for_one_block_and_none_for_no_blocks():
    one = stats.analyze(FIVE.iloc[:1], n_resamples=0, bayes=False)
    assert one.nemenyi_cd == stats.nemenyi_cd(2, 1)
    empty = stats.analyze(FIVE.iloc[:0], n_resamples=0, bayes=False)
    assert math.isnan(empty.nemenyi_cd)


@pytest.mark.parametrize("family", ["reference", "pairs"])
def test_analyze_passes_resamples_seed_and_alpha_to_every_comparison(family):
    m = pd.DataFrame({"fedavg": np.linspace(0.5, 0.8, 10), "a": np.linspace(0.5, 0.8, 10) + TEN})
    comp = stats.analyze(m, n_resamples=499, seed=7, bayes=False, family=family)
    d = (m["a"] - m["fedavg"]).to_numpy()
    lo, hi, how = stats.bootstrap_ci(d, n_resamples=499, seed=7)  # the first row: seed + 0
    row = comp.vs_reference.loc[0]
    assert (row["ci_low"], row["ci_high"], row["ci_method"]) == (lo, hi, how)
    assert list(comp.vs_reference.columns) == list(
        stats.compare(m, [("a", "fedavg")], n_resamples=0).columns
    )
    five = stats.analyze(FIVE, alpha=0.1, n_resamples=0, bayes=False, family=family)
    assert five.vs_reference.loc[0, "verdict"] == "significant (better)"
    assert five.vs_reference.loc[0, "ci_method"] == "none"


def test_analyze_records_its_settings_and_keeps_bayes_off_the_pairs_table():
    comp = stats.analyze(SMALL, higher_is_better=False, alpha=0.1, practical=0.03, n_resamples=0)
    assert (comp.higher_is_better, comp.alpha, comp.practical) == (False, 0.1, 0.03)
    assert comp.family == "reference"
    assert "p_a_better" in comp.vs_reference.columns  # bayes on: vs the reference only
    assert "p_a_better" not in comp.pairs.columns


def test_analyze_summary_columns_and_spread_over_two_blocks():
    two = stats.analyze(SMALL.iloc[:2], n_resamples=0, bayes=False)
    s = two.summary.set_index("method")
    for c in SMALL.columns:  # two blocks: the sample standard deviation exists
        assert s.loc[c, "std_blocks"] == pytest.approx(SMALL[c].iloc[:2].std(ddof=1))
    expected = ["method", "mean", "std_blocks", "mean_rank", "is_reference"]
    assert list(two.summary.columns[: len(expected)]) == expected
    assert "index" not in two.summary.columns
    assert list(two.summary.index) == list(range(len(SMALL.columns)))
