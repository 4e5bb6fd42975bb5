"""Report tables as display text plus highlighting, independent of the output format.

A :class:`Table` holds the cells as plain (Unicode) text, which rows/cells are best (bold) and
second (underlined) — ranked on the *displayed* rounding, ties sharing a place — and significance
markers. :mod:`.latex`, :mod:`.markdown` and :mod:`.html` render it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pflbench import stats

from . import data
from .data import Results, client_aggregates, seed_summary

UP, DOWN = "up", "down"
MARKER_TEXT = {UP: "▲", DOWN: "▼"}


@dataclass
class Table:
    """One table of the report; ``cells`` is display text with row labels as the index."""

    name: str  # file stem (tables/<name>.tex) and anchor
    title: str
    cells: pd.DataFrame
    caption: str
    bold: pd.DataFrame | None = None
    underline: pd.DataFrame | None = None
    markers: pd.DataFrame | None = None
    index_name: str = "Method"
    notes: list[str] = field(default_factory=list)
    widths: dict[str, str] = field(default_factory=dict)  # column → LaTeX p{} width (text columns)

    def mask(self, which: str) -> pd.DataFrame:
        m = getattr(self, which)
        if m is None:
            return pd.DataFrame(False, index=self.cells.index, columns=self.cells.columns)
        return m.reindex(index=self.cells.index, columns=self.cells.columns, fill_value=False)

    def marker(self) -> pd.DataFrame:
        if self.markers is None:
            return pd.DataFrame("", index=self.cells.index, columns=self.cells.columns)
        return self.markers.reindex(
            index=self.cells.index, columns=self.cells.columns, fill_value=""
        ).fillna("")


# ------------------------------------------------------------------------------- formatting


def fmt_num(x: float, decimals: int, sign: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def fmt_mean_std(mean: float, std: float, decimals: int) -> str:
    """ "0.851 ± 0.012"; only the mean when there is no spread (a single seed)."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if std is None or not np.isfinite(std):
        return fmt_num(mean, decimals)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_text(p: float, name: str = "p") -> str:
    """ "p = 0.034" or "p < 0.001" for running text."""
    f = fmt_p(p)
    return f"{name} {f}" if f.startswith("<") else f"{name} = {f}"


def too_few_text(n: int, family: int, alpha: float = stats.ALPHA) -> str:
    """Why no test against the reference can be significant with N blocks and a Holm family of
    ``family`` tests."""
    fam = max(1, family)
    if stats.too_few_blocks(n, alpha):
        return (
            f"with N = {n} blocks the smallest attainable two-sided Wilcoxon p is "
            f"{stats.min_wilcoxon_p(n):.3g} ≥ {alpha:g}"
        )
    return (
        f"with N = {n} blocks and {fam} Holm-corrected pairwise tests the smallest attainable "
        f"adjusted p is {fam * stats.min_wilcoxon_p(n):.3g} ≥ {alpha:g}"
    )


def fmt_ci(delta: float, lo: float, hi: float, decimals: int) -> str:
    d = fmt_num(delta, decimals, sign=True)
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return d
    return f"{d} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"


def rank_marks(
    means: pd.DataFrame, decimals: int | dict[str, int], lower_better: Sequence[str] | bool = ()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best (bold) and second (underline) per column, ranked on the values as displayed.

    ``means`` are the raw numbers; each is rounded to the displayed decimals first, so values that
    print the same tie (and share bold or underline). Columns in ``lower_better`` (or all, when
    True) rank ascending. Columns with fewer than two numbers are not highlighted.
    """
    bold = pd.DataFrame(False, index=means.index, columns=means.columns)
    under = bold.copy()
    for col in means.columns:
        dec = decimals[col] if isinstance(decimals, dict) else decimals
        shown = means[col].astype(float).round(dec)
        shown = shown[np.isfinite(shown)]
        if len(shown) < 2:
            continue
        low = lower_better if isinstance(lower_better, bool) else col in lower_better
        distinct = sorted(shown.unique(), reverse=not low)
        bold.loc[shown.index[shown == distinct[0]], col] = True
        if len(distinct) > 1:
            under.loc[shown.index[shown == distinct[1]], col] = True
    return bold, under


def direction(higher_is_better: bool) -> str:
    return "↑ higher is better" if higher_is_better else "↓ lower is better"


def spread_text(seeds: Sequence[int]) -> str:
    """What a "mean ± std" cell means for these seeds."""
    if len(seeds) == 1:
        return f"a single seed ({seeds[0]}), so no ± is shown"
    return f"mean ± standard deviation over {seeds_text(seeds)}"


def seeds_text(seeds: Sequence[int]) -> str:
    s = list(seeds)
    if len(s) == 1:
        return f"1 seed ({s[0]})"
    return f"{len(s)} seeds ({', '.join(map(str, s))})"


def short_verdict(v: str) -> str:
    """The verdict for a table cell; the caption and the text carry the full reason."""
    if v.startswith(stats.TOO_FEW):
        return "too few blocks†"
    if v.startswith(stats.NO_EVIDENCE):
        if "practical" in v:
            return f"{stats.NO_EVIDENCE} (|Δ| small)"
        if "Friedman" in v:
            return f"{stats.NO_EVIDENCE} (omnibus)"
        return stats.NO_EVIDENCE
    return v


VERDICT_NOTE = (
    "Verdict: †significance is out of reach for this N (with Holm over the family, the smallest "
    "attainable adjusted p is ≥ α), so no p-value is given; (|Δ| small): Holm p < α but |Δ| is "
    "within the practical threshold; (omnibus): the Friedman/Iman–Davenport test did not reject."
)


def family_text(comp: stats.Comparison) -> str:
    """The one family every marker, verdict and crossbar of ``comp`` is corrected over."""
    return f"Holm over all {comp.family_size} pairs of the {comp.k} methods"


def marker_legend(
    reference: str, practical: float, alpha: float = stats.ALPHA, family: str = ""
) -> str:
    return (
        f"▲/▼: significantly better/worse than {reference} (two-sided Wilcoxon signed-rank test "
        f"over the blocks, {family or 'Holm'}-adjusted p < {alpha:g} and |Δ| > {practical:g})"
    )


def markers_from(comp: stats.Comparison | None) -> dict[str, str]:
    """Method → "up"/"down" for the significant rows of a comparison with its reference."""
    if comp is None:
        return {}
    out = {}
    for _, row in comp.vs_reference.iterrows():
        if row["significant"]:
            out[row["a"]] = UP if row["verdict"].endswith("(better)") else DOWN
    return out


def failure_cells(res: Results, methods: list[str], dataset: str | None = None) -> dict[str, str]:
    """Method → "failed/all" case × structure values with the surface failure value (headline
    labels, every seed and client; one dataset or all)."""
    f = res.headline(res.failures) if not res.failures.empty else res.failures
    if dataset is not None and not f.empty:
        f = f[f["dataset"] == dataset]
    out = {}
    for m in methods:
        g = f[f["method"] == m] if not f.empty else f
        out[m] = f"{int(g['failures'].sum())}/{int(g['values'].sum())}" if len(g) else "–"
    return out


FAILURE_NOTE = (
    "Failures: case × structure values (over seeds and clients) where exactly one of prediction "
    "and reference is empty; they take the declared failure value, the image diagonal in "
    "spacing units (the BraTS convention; both empty → 0), and are part of every mean."
)


def _add_failures(
    res: Results, cells: pd.DataFrame, methods: list[str], dataset: str | None = None
) -> str:
    """Add the Failures column to a surface-distance table; returns the caption sentence."""
    if not res.surface:
        return ""
    fc = failure_cells(res, methods, dataset)
    cells["Failures"] = [fc.get(m, "–") for m in cells.index]
    return " " + FAILURE_NOTE


# ------------------------------------------------------------------------------- builders


def dataset_table(
    res: Results,
    dataset: str,
    methods: list[str],
    comp: stats.Comparison | None,
    reference: str,
    practical: float,
) -> Table:
    """Methods × sites (mean ± std over seeds) + client-macro, worst client and SD across clients."""
    hib, dec = res.higher_is_better, res.decimals
    scores = res.headline()
    scores = scores[scores["dataset"] == dataset]
    methods = [m for m in methods if m in set(scores["method"])]
    sites = res.sites(dataset)
    per_site = seed_summary(scores, ["method", "client"])
    agg = client_aggregates(scores, hib)
    cols = sites + ["Macro", "Worst", "Client SD"]
    means = pd.DataFrame(np.nan, index=methods, columns=cols)
    cells = pd.DataFrame("–", index=methods, columns=cols)
    for r in per_site.itertuples(index=False):
        if r.method in means.index and r.client in cols:
            means.loc[r.method, r.client] = r.mean
            cells.loc[r.method, r.client] = fmt_mean_std(r.mean, r.std, dec)
    for col, key in (("Macro", "macro"), ("Worst", "worst"), ("Client SD", "client_sd")):
        s = agg.groupby("method")[key].agg(["mean", "std"])
        for m in methods:
            if m in s.index:
                means.loc[m, col] = s.loc[m, "mean"]
                cells.loc[m, col] = fmt_mean_std(s.loc[m, "mean"], s.loc[m, "std"], dec)
    lower = list(cols) if not hib else ["Client SD"]
    bold, under = rank_marks(means, dec, lower_better=lower)
    marks = pd.DataFrame("", index=methods, columns=cols)
    for m, mk in markers_from(comp).items():
        if m in marks.index:
            marks.loc[m, "Macro"] = mk
    seeds = res.seeds(dataset)
    n_sites = len(sites)
    if comp is None:
        test = "no tests (fewer than two methods)."
    elif comp.too_few:
        test = f"within the dataset (blocks = clients) {too_few_text(comp.n, comp.family_size)}: descriptive only, no markers."
    else:
        test = (
            f"markers on Macro from the Friedman/Iman–Davenport test and the Wilcoxon signed-rank "
            f"test against {reference} over N = {comp.n} clients (blocks), k = {comp.k} methods, "
            f"{family_text(comp)}. {marker_legend(reference, practical)}."
        )
    fail_note = _add_failures(res, cells, methods, dataset)
    caption = (
        f"{dataset}: test {res.metric_label} ({direction(hib)}) per site, client-macro mean "
        f"(each site weighted equally), worst client and SD across clients; "
        f"{spread_text(seeds)}; {n_sites} sites, {len(methods)} methods. Best in "
        f"bold, second underlined (on the displayed rounding; Client SD: lower is better). "
        f"Tests: {test}{fail_note}"
    )
    return Table(
        name=f"dataset_{_slug(dataset)}",
        title=f"{dataset}: per-site results",
        cells=cells,
        caption=caption,
        bold=bold,
        underline=under,
        markers=marks,
    )


def structure_table(res: Results, dataset: str, methods: list[str]) -> Table | None:
    """Per structure: client-macro mean over sites, mean ± std over seeds (headline labels)."""
    s = res.headline(res.structure_scores)
    s = s[s["dataset"] == dataset]
    structs = sorted(s["structure"].unique())
    if len(structs) < 2:
        return None
    macro = s.groupby(["method", "seed", "structure"])["value"].mean().rename("value").reset_index()
    summ = seed_summary(macro, ["method", "structure"])
    methods = [m for m in methods if m in set(s["method"])]
    means = pd.DataFrame(np.nan, index=methods, columns=structs)
    cells = pd.DataFrame("–", index=methods, columns=structs)
    for r in summ.itertuples(index=False):
        means.loc[r.method, r.structure] = r.mean
        cells.loc[r.method, r.structure] = fmt_mean_std(r.mean, r.std, res.decimals)
    bold, under = rank_marks(means, res.decimals, lower_better=not res.higher_is_better)
    caption = (
        f"{dataset}: test {res.metric_label} ({direction(res.higher_is_better)}) per structure, "
        f"client-macro mean over {len(res.sites(dataset))} sites; "
        f"{spread_text(res.seeds(dataset))}. Best in bold, second underlined (displayed rounding). "
        "Descriptive only (no tests)."
    )
    return Table(
        name=f"structures_{_slug(dataset)}",
        title=f"{dataset}: per-structure results",
        cells=cells,
        caption=caption,
        bold=bold,
        underline=under,
    )


def main_table(
    res: Results,
    methods: list[str],
    overall: stats.Comparison | None,
    per_dataset: dict[str, stats.Comparison | None],
    reference: str,
    practical: float,
) -> Table:
    """Methods × datasets (client-macro mean ± std over seeds) and the mean rank over all blocks."""
    hib, dec = res.higher_is_better, res.decimals
    scores = res.headline()
    agg = client_aggregates(scores, hib)
    datasets = res.datasets
    cols = datasets + (["Mean rank"] if overall is not None else [])
    means = pd.DataFrame(np.nan, index=methods, columns=cols)
    cells = pd.DataFrame("–", index=methods, columns=cols)
    marks = pd.DataFrame("", index=methods, columns=cols)
    for d in datasets:
        s = agg[agg["dataset"] == d].groupby("method")["macro"].agg(["mean", "std"])
        for m in methods:
            if m in s.index:
                means.loc[m, d] = s.loc[m, "mean"]
                cells.loc[m, d] = fmt_mean_std(s.loc[m, "mean"], s.loc[m, "std"], dec)
        for m, mk in markers_from(per_dataset.get(d)).items():
            marks.loc[m, d] = mk
    decimals: dict[str, int] = dict.fromkeys(datasets, dec)
    lower = [] if hib else list(datasets)
    if overall is not None:
        mr = overall.friedman.mean_ranks
        for m in methods:
            if m in mr.index:
                means.loc[m, "Mean rank"] = mr[m]
                cells.loc[m, "Mean rank"] = f"{mr[m]:.2f}"
        for m, mk in markers_from(overall).items():
            marks.loc[m, "Mean rank"] = mk
        decimals["Mean rank"] = 2
        lower.append("Mean rank")
    bold, under = rank_marks(means, decimals, lower_better=lower)
    seeds = res.seeds()
    if overall is None:
        tests = "no tests (fewer than two methods or blocks)."
    else:
        fr = overall.friedman
        omni = (
            f"Friedman χ² = {fr.chi2:.2f}, Iman–Davenport F({fr.k - 1}, {(fr.k - 1) * (fr.n - 1)}) "
            f"= {fr.f:.2f}, {p_text(fr.f_p)}; "
            if fr.available
            else ""
        )
        tests = (
            f"mean rank over N = {overall.n} blocks (dataset, client), k = {overall.k} methods "
            f"(1 = best); {omni}markers on Mean rank from Wilcoxon signed-rank tests against "
            f"{reference} over all blocks ({family_text(overall)}: the same tests and family as "
            f"the text and the CD diagram's bars), on a dataset from the tests within that "
            f"dataset (blocks = its clients, Holm over its pairs; none where too few clients). "
            f"{marker_legend(reference, practical)}."
        )
    fail_note = _add_failures(res, cells, methods)
    caption = (
        f"Test {res.metric_label} ({direction(hib)}): client-macro mean per dataset (each site "
        f"weighted equally), {spread_text(seeds)}. Best in bold, "
        f"second underlined (on the displayed rounding). Tests: {tests}{fail_note}"
    )
    return Table(
        name="main",
        title="Main results",
        cells=cells,
        caption=caption,
        bold=bold,
        underline=under,
        markers=marks,
    )


def _bayes_cols(df: pd.DataFrame) -> bool:
    return "p_a_better" in df.columns and df["p_a_better"].notna().any()


def comparison_table(
    comp: stats.Comparison, res: Results, name: str = "comparison", title: str = ""
) -> Table:
    """Each method against the reference: mean, mean rank, Δ with CI, Holm p, r, wins, verdict."""
    dec = res.decimals
    v = comp.vs_reference.set_index("a")
    mr = comp.friedman.mean_ranks
    order = comp.summary["method"].tolist()
    rows = {}
    bayes = _bayes_cols(comp.vs_reference)
    for m in order:
        row = {"Mean": fmt_num(comp.matrix[m].mean(), dec), "Mean rank": f"{mr[m]:.2f}"}
        if m == comp.reference:
            row.update(
                {"Δ [95% CI]": "(reference)", "Holm p": "", "r": "", "Wins": "", "Zeros": ""}
            )
            row["Verdict"] = ""
            if bayes:
                row["P(better/ROPE/worse)"] = ""
        else:
            r = v.loc[m]
            cells = _test_cells(r, dec)
            verdict = cells.pop("Verdict")
            row.update(cells, Zeros=str(int(r["n_zero"])), Verdict=verdict)
            if bayes:
                row["P(better/ROPE/worse)"] = (
                    "–"
                    if not np.isfinite(r["p_a_better"])
                    else f"{r['p_a_better']:.2f}/{r['p_rope']:.2f}/{r['p_b_better']:.2f}"
                )
        rows[m] = row
    cells = pd.DataFrame.from_dict(rows, orient="index")
    caption = (
        f"{title or 'All datasets'}: each method against {comp.reference} over N = {comp.n} "
        f"blocks (dataset, client; block = mean over seeds), k = {comp.k} methods, test "
        f"{res.metric_label} ({direction(res.higher_is_better)}). {_tests_sentence(comp)} "
        f"Δ = mean paired difference (method − {comp.reference}) with a bootstrap 95% CI "
        f"(BCa; percentile for N < 10); r = matched-pairs rank-biserial correlation "
        f"(T⁺ − T⁻)/(T⁺ + T⁻); Wins = blocks where the method is better; Zeros = zero "
        f"differences (dropped by the test). {_wording(comp)}"
        + (
            f" P(better/ROPE/worse): Bayesian signed-rank test (baycomp) with a region of "
            f"practical equivalence of ±{comp.practical:g}."
            if bayes
            else ""
        )
    )
    caption += " " + VERDICT_NOTE
    return Table(
        name=name, title=title or "Comparison with the reference", cells=cells, caption=caption
    )


def _test_cells(r: pd.Series, dec: int) -> dict[str, str]:
    """One paired comparison as table cells: effect with CI, corrected p, effect size, wins."""
    return {
        "Δ [95% CI]": fmt_ci(r["delta"], r["ci_low"], r["ci_high"], dec),
        "Holm p": "–" if r["too_few"] else fmt_p(r["p_holm"]),
        "r": fmt_num(r["r_rb"], 2, sign=True),
        "Wins": f"{round(r['win_rate'] * r['n'])}/{r['n']}",
        "Verdict": short_verdict(r["verdict"]),
    }


def pairs_table(comp: stats.Comparison, res: Results) -> Table:
    dec = res.decimals
    rows = {}
    for _, r in comp.pairs.iterrows():
        rows[f"{r['a']} vs {r['b']}"] = _test_cells(r, dec)
    cells = pd.DataFrame.from_dict(rows, orient="index")
    caption = (
        f"All pairs over N = {comp.n} blocks, k = {comp.k} methods, test {res.metric_label} "
        f"({direction(res.higher_is_better)}): Δ = mean paired difference (first − second) with "
        f"a bootstrap 95% CI; two-sided Wilcoxon signed-rank tests, Holm-corrected over the "
        f"{len(comp.pairs)} pairs (one family: the markers, the comparison with the reference and "
        f"the CD diagram's bars are these tests); r = rank-biserial correlation. {_wording(comp)}"
    )
    caption += " " + VERDICT_NOTE
    return Table(name="pairs", title="All pairs", cells=cells, caption=caption, index_name="Pair")


def per_dataset_table(
    comps: dict[str, stats.Comparison | None], res: Results, reference: str
) -> Table:
    rows = {}
    dec = res.decimals
    for d, comp in comps.items():
        if comp is None:
            continue
        for _, r in comp.vs_reference.iterrows():
            rows[f"{d}: {r['a']}"] = {"N": str(comp.n), **_test_cells(r, dec)}
    cells = pd.DataFrame.from_dict(rows, orient="index")
    caption = (
        f"Within each dataset: each method against {reference} over its clients (blocks), test "
        f"{res.metric_label} ({direction(res.higher_is_better)}); two-sided Wilcoxon signed-rank "
        f"tests, Holm-corrected over all pairs of the dataset's methods, gated by the "
        f"Friedman/Iman–Davenport test "
        f"where k ≥ 3. With N ≤ 5 clients no p < {stats.ALPHA:g} is attainable and no p-value is "
        "shown. " + VERDICT_NOTE
    )
    return Table(
        name="per_dataset", title="Tests within each dataset", cells=cells, caption=caption,
        index_name="Dataset: method",
    )  # fmt: skip


def tuned_default_table(
    res: Results, practical: float, seed: int = 0, n_resamples: int = 9999
) -> Table | None:
    """Tuned against default configuration per method, when the manifests have both labels."""
    s = res.client_scores
    both = [
        m
        for m, labs in s.groupby("method")["label"].agg(set).items()
        if {"tuned", "default"} <= labs
    ]
    if not both:
        return None
    hib, dec = res.higher_is_better, res.decimals
    agg = client_aggregates(s, hib)
    rows, raw = {}, []
    for m in sorted(both):
        row = {}
        for d in res.datasets:
            for lab in ("default", "tuned"):
                x = agg[(agg["method"] == m) & (agg["label"] == lab) & (agg["dataset"] == d)]
                row[f"{d} {lab}"] = fmt_mean_std(x["macro"].mean(), x["macro"].std(), dec)
        t = s[(s["method"] == m) & (s["label"] == "tuned")]
        df = s[(s["method"] == m) & (s["label"] == "default")]
        mat = pd.concat(
            {
                "tuned": t.groupby(["dataset", "client"])["value"].mean(),
                "default": df.groupby(["dataset", "client"])["value"].mean(),
            },
            axis=1,
        ).dropna()
        if len(mat) >= 1:
            c = stats.compare(
                mat, [("tuned", "default")], higher_is_better=hib, practical=practical,
                n_resamples=n_resamples, seed=seed,
            ).iloc[0]  # fmt: skip
            raw.append((m, c))
        rows[m] = row
    fam = max(1, len(raw))
    p_holm = stats.holm([c["p"] for _, c in raw])
    for (m, c), ph in zip(raw, p_holm, strict=True):
        n_nz = int(c["n"] - c["n_zero"])
        rows[m]["Δ tuned − default [95% CI]"] = fmt_ci(c["delta"], c["ci_low"], c["ci_high"], dec)
        few = stats.too_few_blocks(n_nz, family=fam)
        rows[m]["Holm p"] = "–" if few else fmt_p(ph)
        rows[m]["Verdict"] = short_verdict(
            stats.verdict(ph, c["delta"], n_nz, practical, higher_is_better=hib, family=fam)
        )
    cells = pd.DataFrame.from_dict(rows, orient="index").fillna("–")
    caption = (
        f"Tuned against default configuration: client-macro test {res.metric_label} "
        f"({direction(hib)}) per dataset, mean ± standard deviation over the reporting seeds "
        "(per label); "
        f"Δ over the (dataset, client) blocks with a bootstrap 95% CI; two-sided Wilcoxon "
        f"signed-rank tests, Holm-corrected over the {len(raw)} method(s). "
        f"{_wording_text(practical)} {VERDICT_NOTE}"
    )
    return Table(name="tuned_vs_default", title="Tuned vs default", cells=cells, caption=caption)


# ------------------------------------------------------------------------------- text


def _tests_sentence(comp: stats.Comparison) -> str:
    fr = comp.friedman
    if comp.too_few:
        return (
            f"No p-values: {too_few_text(comp.n, comp.family_size, comp.alpha)}; descriptive only."
        )
    parts = []
    if fr.available:
        parts.append(
            f"Friedman χ²({fr.k - 1}) = {fr.chi2:.2f}, {p_text(fr.p)}; Iman–Davenport "
            f"F({fr.k - 1}, {(fr.k - 1) * (fr.n - 1)}) = {fr.f:.2f}, {p_text(fr.f_p)} "
            f"({'rejects' if fr.significant(comp.alpha) else 'does not reject'}; post hoc "
            "verdicts are gated on it)."
        )
    parts.append(
        f"Post hoc: two-sided Wilcoxon signed-rank tests, {family_text(comp)} (one family for "
        "the markers, this comparison and the CD diagram's bars)."
    )
    return " ".join(parts)


def _wording_text(practical: float, alpha: float = stats.ALPHA) -> str:
    return (
        f'"Significant" only when the Holm-adjusted p < {alpha:g} and |Δ| > {practical:g} '
        f'(practical threshold); otherwise "{stats.NO_EVIDENCE}".'
    )


def _wording(comp: stats.Comparison) -> str:
    return _wording_text(comp.practical, comp.alpha)


def _slug(s: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(s))
    return out or "dataset"


# ------------------------------------------------------------------------------- configurations

#: Shared hyperparameters (protocol keys) every method runs with, by their search-space names.
SHARED = {"lr": ("optimizer", "lr"), "local_epochs": ("local_epochs",),
          "local_steps": ("local_steps",), "batch_size": ("batch_size",)}  # fmt: skip


def _num(v: object) -> str:
    """A value rounded for reading: 3 significant digits (0.004430375245218269 → 0.00443)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _shared_value(protocol: dict, name: str) -> object:
    v: object = protocol
    for k in SHARED[name]:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def _space_text(name: str, dim: dict) -> str:
    if dim.get("kind") == "categorical":
        return f"{name} ∈ {{{', '.join(_num(c) for c in dim.get('choices') or [])}}}"
    lo, hi = dim.get("low"), dim.get("high")
    if dim.get("kind") == "int":
        lo, hi = int(lo), int(hi)  # type: ignore[arg-type]
        rng = f"{{{lo}, …, {hi}}}"
    else:
        rng = f"[{_num(lo)}, {_num(hi)}]"
    return f"{name} ∈ {rng}" + (" (log)" if dim.get("log") else "")


def configurations_table(res: Results) -> Table | None:
    """Every configuration reported, per dataset × method × label: the hyperparameter values
    (rounded for reading), the search space they were tuned in and the tuning budget."""
    rows: dict[str, dict[str, str]] = {}
    seen: set[tuple[str, str, str]] = set()
    for m in sorted(res.manifests, key=lambda m: (str(m.get("dataset")), str(m.get("method")),
                                                 str(m.get("label")))):  # fmt: skip
        key = (str(m.get("dataset")), str(m.get("method")), str(m.get("label")))
        if key in seen:
            continue
        seen.add(key)
        space: dict = m.get("search_space") or {}
        protocol, params = m.get("protocol") or {}, m.get("params") or {}
        if space:  # the searched dimensions, shared first
            values = {
                n: _shared_value(protocol, n) if d.get("source") == "shared" else params.get(n)
                for n, d in space.items()
            }
        else:
            values = {n: _shared_value(protocol, n) for n in SHARED} | dict(params)
        shown = "; ".join(f"{n} = {_num(v)}" for n, v in values.items() if v is not None)
        budget = m.get("tuning_budget")
        best = m.get("tuning_trial")
        trials = (
            "–"
            if budget is None
            else f"{budget}"
            + (f" (best #{best})" if best is not None and key[2] == "tuned" else "")
        )
        rows[" / ".join(key)] = {
            "Hyperparameters": shown or "–",
            "Search space": "; ".join(_space_text(n, d) for n, d in space.items()) or "–",
            "Trials": trials,
        }
    if not rows:
        return None
    cells = pd.DataFrame.from_dict(rows, orient="index")
    caption = (
        "Configurations reported, per dataset / method / label: the hyperparameter values of "
        "the runs (3 significant digits; with a search space, the searched ones: shared protocol "
        "values such as lr and each method's own), the search space of the tuning study and its "
        "budget (trials per (dataset, method), pruned and failed included; the same for every "
        'method), with the number of the best trial. "default" runs use the protocol\'s and the '
        'method\'s default values; "fixed" runs were not tuned.'
    )
    return Table(
        name="configurations", title="Configurations", cells=cells, caption=caption,
        index_name="Dataset / method / label",
        widths={"Hyperparameters": "4.2cm", "Search space": "5.2cm"},
    )  # fmt: skip


def unseen_table(
    blocks: pd.DataFrame,
    methods: list[str],
    res: Results,
    practical: float,
    seed: int = 0,
    n_resamples: int = 9999,
) -> tuple[Table | None, pd.DataFrame]:
    """In-federation against unseen-site test score per method (issue 19), with the gap.

    Blocks are (dataset, held-out site), each the mean over seeds (:func:`data.unseen_blocks`);
    each gap is in-federation − newcomer over the blocks where both exist, tested with the same
    paired comparison as every other table (:func:`stats.compare`: Wilcoxon signed-rank, Holm
    over all the table's gaps as one family, bootstrap 95 % CI). Returns the table (None without
    unseen rows) and the tests.
    """
    if blocks.empty:
        return None, pd.DataFrame()
    dec = res.decimals
    present = set(blocks.columns)
    regimes = [r for r in data.REGIMES if any((m, r) in present for m in methods)]
    pairs, cols = [], {}
    for m in methods:
        for r in regimes:
            if (m, data.IN_FEDERATION) in present and (m, r) in present:
                a, b = f"{m} · {data.IN_FEDERATION}", f"{m} · {r}"
                cols[a], cols[b] = blocks[(m, data.IN_FEDERATION)], blocks[(m, r)]
                pairs.append((a, b))
    if not pairs:
        return None, pd.DataFrame()
    matrix = pd.DataFrame(cols).dropna()
    tests = stats.compare(
        matrix,
        pairs,
        higher_is_better=res.higher_is_better,
        practical=practical,
        n_resamples=n_resamples,
        seed=seed,
    )
    rows = {}
    for m in methods:
        if (m, data.IN_FEDERATION) not in present:
            continue
        row = {"In federation": fmt_num(float(matrix[f"{m} · {data.IN_FEDERATION}"].mean()), dec)}
        for r in regimes:
            t = tests[(tests["a"] == f"{m} · {data.IN_FEDERATION}") & (tests["b"] == f"{m} · {r}")]
            name = r.replace("_", "-").capitalize()
            if t.empty:
                row[name], row[f"Gap ({name.lower()})"] = "–", "–"
                continue
            t = t.iloc[0]
            row[name] = fmt_num(float(t["mean_b"]), dec)
            row[f"Gap ({name.lower()})"] = (
                f"{fmt_ci(t['delta'], t['ci_low'], t['ci_high'], dec)} {short_verdict(t['verdict'])}"
            )
        rows[m] = row
    cells = pd.DataFrame.from_dict(rows, orient="index")
    caption = (
        f"Unseen sites: test {res.metric_label} ({direction(res.higher_is_better)}) of each "
        f"held-out site while in the federation (selected checkpoint, mean over the federations "
        f"that contained it) and as a newcomer (the method's declared model from the final "
        f"broadcast; few-shot: K labelled steps on the site's train split). N = {len(matrix)} "
        "blocks (dataset, held-out site), each the mean over seeds. Gap = in federation − "
        "newcomer with its bootstrap 95 % CI; two-sided Wilcoxon signed-rank, Holm over all gaps "
        "of the table. " + VERDICT_NOTE
    )
    table = Table(name="unseen", title="In-federation vs unseen sites", cells=cells,
                  caption=caption)  # fmt: skip
    return table, tests
