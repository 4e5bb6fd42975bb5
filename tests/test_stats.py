"""Known-answer and calibration tests of pflbench.stats (evaluation reference §2)."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pflbench import stats

DEMSAR_MEAN_RANKS = [3.143, 2.000, 2.893, 1.964]
# 14 blocks × 4 methods whose within-block ranks (1 = best) average to Demšar's mean ranks exactly
# (rank sums 44, 28, 40.5, 27.5; one tie in the first block).
DEMSAR_RANK_ROWS = [
    [4.0, 3.0, 1.5, 1.5],
    [4.0, 1.0, 2.0, 3.0],
    [2.0, 1.0, 4.0, 3.0],
    [3.0, 2.0, 1.0, 4.0],
    [4.0, 3.0, 1.0, 2.0],
    [3.0, 1.0, 4.0, 2.0],
    [4.0, 1.0, 3.0, 2.0],
    [3.0, 2.0, 4.0, 1.0],
    [4.0, 2.0, 3.0, 1.0],
    [4.0, 1.0, 2.0, 3.0],
    [3.0, 2.0, 4.0, 1.0],
    [2.0, 3.0, 4.0, 1.0],
    [3.0, 2.0, 4.0, 1.0],
    [1.0, 4.0, 3.0, 2.0],
]
METHODS = ["c45", "c45_m", "c45_cf", "c45_m_cf"]


def demsar_matrix(higher_is_better: bool = True) -> pd.DataFrame:
    r = np.array(DEMSAR_RANK_ROWS)
    # scores: an AUC-like value that decreases with the rank (or increases for lower-is-better)
    vals = 0.9 - 0.01 * r if higher_is_better else 0.1 + 0.01 * r
    return pd.DataFrame(vals, columns=METHODS)


def test_demsar_from_mean_ranks():
    res = stats.friedman_from_mean_ranks(DEMSAR_MEAN_RANKS, n=14)
    assert res.k == 4 and res.n == 14
    assert res.chi2 == pytest.approx(9.28, abs=0.005)
    assert res.f == pytest.approx(3.69, abs=0.005)
    assert stats.nemenyi_q(4) == pytest.approx(2.569, abs=5e-4)
    assert stats.nemenyi_cd(4, 14) == pytest.approx(1.25, abs=0.005)
    # p of F(3, 39) at 3.69 is about 0.02 (Demšar: "the critical value is 2.85", so reject)
    assert res.f > sps.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.01)
    assert res.f_p < 0.05


@pytest.mark.parametrize("higher", [True, False])
def test_demsar_matrix_path(higher):
    m = demsar_matrix(higher)
    mr = stats.mean_ranks(m, higher_is_better=higher)
    np.testing.assert_allclose(mr.to_numpy(), DEMSAR_MEAN_RANKS, atol=5e-4)
    res = stats.friedman(m, higher_is_better=higher)
    # scipy's statistic is tie-corrected: one tied pair in 14 blocks of 4 → c = 1 − 6/840
    c = 1 - 6 / (14 * 4 * 15)
    assert res.chi2 * c == pytest.approx(9.28, abs=0.01)
    ref = sps.friedmanchisquare(*[m[c_].to_numpy() for c_ in METHODS])
    assert res.chi2 == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)
    f, p = stats.iman_davenport(res.chi2, 14, 4)
    assert (res.f, res.f_p) == (pytest.approx(f), pytest.approx(p))
    assert res.f == pytest.approx(3.69, abs=0.05)
    assert res.significant()
    # from mean ranks (no tie correction) on the same matrix: exactly Demšar's numbers
    res2 = stats.friedman_from_mean_ranks(mr, 14)
    assert res2.chi2 == pytest.approx(9.28, abs=0.01) and res2.f == pytest.approx(3.69, abs=0.01)


def test_nemenyi_table():
    expected = [1.960, 2.344, 2.569, 2.728, 2.850, 2.948, 3.031, 3.102, 3.164]
    got = [stats.nemenyi_q(k) for k in range(2, 11)]
    np.testing.assert_allclose(got, expected, atol=5e-4)


def test_ranks_ties_and_direction():
    m = pd.DataFrame({"a": [0.9, 0.5], "b": [0.9, 0.7], "c": [0.1, 0.7]})
    r = stats.ranks(m)
    assert r.loc[0].tolist() == [1.5, 1.5, 3.0]
    assert r.loc[1].tolist() == [3.0, 1.5, 1.5]
    r_low = stats.ranks(m, higher_is_better=False)
    assert r_low.loc[0].tolist() == [2.5, 2.5, 1.0]
    with pytest.raises(ValueError):
        stats.ranks(m.where(m > 0.2))


def test_min_wilcoxon_p_matches_scipy():
    for n in range(1, 9):
        d = np.arange(1, n + 1, dtype=float)
        assert stats.min_wilcoxon_p(n) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert stats.too_few_blocks(5) and not stats.too_few_blocks(6)
    assert stats.min_wilcoxon_p(5) == pytest.approx(0.0625)


def test_rank_biserial_and_zero_differences():
    d = np.array([0.0, 1.0, 2.0, -3.0, 4.0])
    r, tp, tm = stats.rank_biserial(d)
    # ranks of |1,2,-3,4| = 1,2,3,4 → T+ = 7, T− = 3
    assert (tp, tm) == (7.0, 3.0) and r == pytest.approx(0.4)
    m = pd.DataFrame({"ref": np.zeros(5), "x": d})
    out = stats.compare(m, [("x", "ref")], n_resamples=0)
    assert out.loc[0, "n_zero"] == 1 and out.loc[0, "n"] == 5
    assert out.loc[0, "win_rate"] == pytest.approx(0.6)
    assert bool(out.loc[0, "too_few"])  # 4 non-zero differences
    assert math.isnan(out.loc[0, "p"])
    assert out.loc[0, "verdict"].startswith(stats.TOO_FEW)


def test_holm_keeps_nan_and_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, np.nan, 0.04, 0.03])
    adj = stats.holm(p)
    assert math.isnan(adj[1])
    np.testing.assert_allclose(adj[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])
    np.testing.assert_allclose(adj[[0, 2, 3]], [0.03, 0.06, 0.06])


def test_bootstrap_ci_bca_and_fallback():
    rng = np.random.default_rng(3)
    d = rng.normal(0.03, 0.01, 18)
    lo, hi, how = stats.bootstrap_ci(d, seed=1)
    assert how == "BCa" and lo < d.mean() < hi and hi - lo < 0.03
    assert stats.bootstrap_ci(d, seed=1) == (lo, hi, how)  # seeded: reproducible
    lo, hi, how = stats.bootstrap_ci(d[:5], seed=1)
    assert how == "percentile" and lo <= d[:5].mean() <= hi
    assert stats.bootstrap_ci(np.full(7, 0.02)) == (0.02, 0.02, "degenerate")


def _planted(effect: float, seed: int, n: int = 18, noise: float = 0.005) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.9, n)  # block difficulty, shared by the methods
    return pd.DataFrame(
        {
            "fedavg": base + rng.normal(0, noise, n),
            "ditto": base + effect + rng.normal(0, noise, n),
            "local": base + rng.normal(0, noise, n),
        }
    )


def test_planted_effect_is_significant():
    comp = stats.analyze(_planted(0.03, seed=0), n_resamples=2000)
    assert comp.reference == "fedavg" and comp.n == 18 and comp.k == 3
    assert comp.friedman.significant()
    row = comp.vs_reference.set_index("a").loc["ditto"]
    assert row["p_holm"] < 0.05 and row["delta"] == pytest.approx(0.03, abs=0.005)
    assert row["ci_low"] > 0.01 and row["ci_method"] == "BCa"
    assert row["verdict"] == "significant (better)" and row["win_rate"] == 1.0
    assert row["r_rb"] == pytest.approx(1.0)
    none = comp.vs_reference.set_index("a").loc["local"]
    assert none["verdict"] == stats.NO_EVIDENCE
    assert comp.summary.iloc[0]["method"] == "ditto"
    # the CD matrix separates ditto from the other two and joins fedavg and local
    assert comp.sig_matrix.loc["ditto", "fedavg"] < 0.05
    assert comp.sig_matrix.loc["fedavg", "local"] == 1.0
    if importlib.util.find_spec("baycomp") is not None:
        assert row["p_a_better"] > 0.95  # ditto is better beyond the ROPE
        assert row["p_a_better"] + row["p_rope"] + row["p_b_better"] == pytest.approx(1.0)
    else:  # the documented fallback without the optional extra
        assert math.isnan(row["p_a_better"]) and math.isnan(row["p_rope"])


def test_planted_effect_lower_is_better():
    m = -_planted(0.03, seed=0) + 1.0  # e.g. a distance: ditto now has the lowest values
    comp = stats.analyze(m, higher_is_better=False, n_resamples=0, bayes=False)
    row = comp.vs_reference.set_index("a").loc["ditto"]
    assert row["delta"] < 0 and row["win_rate"] == 1.0
    assert row["verdict"] == "significant (better)"


def test_no_effect_is_not_significant():
    comp = stats.analyze(_planted(0.0, seed=1), n_resamples=0, bayes=False)
    assert all(comp.vs_reference["verdict"].str.startswith(stats.NO_EVIDENCE))
    assert not comp.pairs["significant"].any()


def test_small_effect_below_practical_threshold_is_no_evidence():
    comp = stats.analyze(_planted(0.005, seed=2, noise=0.0005), n_resamples=0, bayes=False)
    row = comp.vs_reference.set_index("a").loc["ditto"]
    assert row["p_holm"] < 0.05
    assert row["verdict"].startswith(stats.NO_EVIDENCE) and "practical" in row["verdict"]


def test_too_few_blocks_says_so():
    comp = stats.analyze(_planted(0.05, seed=0, n=5), n_resamples=0, bayes=False)
    assert comp.too_few
    assert comp.vs_reference["too_few"].all() and comp.vs_reference["p"].isna().all()
    assert all(v.startswith(stats.TOO_FEW) for v in comp.vs_reference["verdict"])


def test_too_few_after_holm():
    # N = 6: p_min = 0.03125 is attainable alone, but not after Holm over 2 comparisons
    assert not stats.too_few_blocks(6, family=1) and stats.too_few_blocks(6, family=2)
    m = _planted(0.05, seed=3, n=6)
    one = stats.compare(m, [("ditto", "fedavg")], n_resamples=0)
    assert (
        one.loc[0, "p"] == pytest.approx(0.03125)
        and one.loc[0, "verdict"] == "significant (better)"
    )
    two = stats.compare(m, [("ditto", "fedavg"), ("local", "fedavg")], n_resamples=0)
    assert two["too_few"].all() and two["p_holm"].isna().all()
    assert "2 Holm-corrected comparisons" in two.loc[0, "verdict"]


def test_gate_blocks_post_hoc_when_friedman_does_not_reject():
    # k = 3 methods of pure noise: the Friedman/Iman–Davenport gate does not reject
    rng = np.random.default_rng(5)
    m = pd.DataFrame(rng.normal(0.8, 0.05, (18, 3)), columns=["fedavg", "a", "b"])
    comp = stats.analyze(m, gate=True, n_resamples=0, bayes=False)
    assert not comp.friedman.significant() and not comp.omnibus_significant
    # a strong post hoc result is still reported as no evidence when the omnibus test did not reject
    v = stats.verdict(0.001, 0.05, 18, omnibus_significant=False)
    assert v.startswith(stats.NO_EVIDENCE) and "Friedman" in v
    assert stats.analyze(_planted(0.03, seed=0), n_resamples=0, bayes=False).omnibus_significant


def test_two_methods_no_friedman():
    m = _planted(0.03, seed=4)[["fedavg", "ditto"]]
    comp = stats.analyze(m, n_resamples=0, bayes=False)
    assert not comp.friedman.available and comp.omnibus_significant
    assert comp.vs_reference.loc[0, "verdict"] == "significant (better)"


def test_reference_defaults_and_errors():
    m = _planted(0.0, seed=0)[["local", "ditto"]]
    assert stats.analyze(m, n_resamples=0, bayes=False).reference == "local"
    with pytest.raises(ValueError):
        stats.analyze(m, reference="nope")


def test_bayesian_signed_rank_without_baycomp_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "baycomp", None)  # import baycomp now raises ImportError
    m = _planted(0.03, seed=0)
    assert stats.bayesian_signed_rank(m["ditto"].to_numpy(), m["fedavg"].to_numpy()) is None


def test_bayesian_signed_rank_optional():
    pytest.importorskip("baycomp", reason="baycomp is the optional 'report' extra")
    m = _planted(0.03, seed=0)
    probs = stats.bayesian_signed_rank(m["ditto"].to_numpy(), m["fedavg"].to_numpy())
    assert probs is not None and probs[0] > 0.95 and sum(probs) == pytest.approx(1.0)


def test_false_positive_rate_near_alpha():
    """Under the null the Holm–Wilcoxon test against the reference rejects at about α."""
    rng = np.random.default_rng(20240607)
    sims, n, alpha = 400, 18, 0.05
    hits_single, hits_family = _simulate_null(rng, sims, n, alpha)
    sd = math.sqrt(alpha * (1 - alpha) / sims)
    rate1, rate2 = hits_single / sims, hits_family / sims
    assert abs(rate1 - alpha) < 3.5 * sd, rate1
    # Holm controls the family-wise error at α (correlated tests: at or a little below it)
    assert alpha - 3.5 * sd < rate2 < alpha + 3.5 * sd, rate2


def _simulate_null(rng, sims, n, alpha):
    hits_single = hits_family = 0
    for _ in range(sims):
        base = rng.uniform(0.6, 0.9, n)
        m = pd.DataFrame({c: base + rng.normal(0, 0.01, n) for c in ("fedavg", "a", "b")})
        # practical threshold 0 and no gate: the bare Holm–Wilcoxon reference test
        fam = stats.compare(
            m, [("a", "fedavg"), ("b", "fedavg")], practical=0.0, n_resamples=0
        )  # practical threshold 0, no gate: the bare Holm–Wilcoxon reference test
        hits_single += bool(fam["p"].iloc[0] < alpha)  # a family of one: Holm = raw p
        hits_family += bool((fam["p_holm"] < alpha).any())
    return hits_single, hits_family
