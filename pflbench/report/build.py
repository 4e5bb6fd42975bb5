"""``build_report``: tidy results → report.md, report.html, tables/*.tex, figures/*.pdf|png.

Reads only what :mod:`pflbench.results` wrote (the rounds, comm and cases tables and the
manifests of finished runs); model files, checkpoints and data are never touched.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pflbench import configs, stats
from pflbench.results import diverged_runs

from . import data, expectations, figures, html, latex, markdown, published, tables
from . import qualitative as rqual
from .data import ReportError, Results

# --------------------------------------------------------------------------- document model


@dataclass
class Block:
    """One element of the report, rendered to Markdown and HTML alike."""

    kind: str  # "h1" | "h2" | "h3" | "p" | "ul" | "table" | "figure" | "kv" | "note"
    content: Any
    extra: Any = None


def _html_inline(text: str) -> str:
    s = html.esc(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    return s


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.content)
        elif b.kind == "p":
            out.append(b.content)
        elif b.kind == "note":
            out.append("> " + b.content)
        elif b.kind == "ul":
            out.append("\n".join(f"- {x}" for x in b.content))
        elif b.kind == "table":
            out.append(markdown.to_markdown(b.content))
        elif b.kind == "kv":
            out.append(markdown.key_values(b.content, b.extra or ("Field", "Value")))
        elif b.kind == "figure":
            png, caption = b.content
            out.append(f"![{png.stem}](figures/{png.name})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.esc(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_html_inline(b.content)}</p>")
        elif b.kind == "note":
            body.append(f'<p class="note">{_html_inline(b.content)}</p>')
        elif b.kind == "ul":
            body.append(
                "<ul>" + "".join(f"<li>{_html_inline(x)}</li>" for x in b.content) + "</ul>"
            )
        elif b.kind == "table":
            body.append(html.table_html(b.content))
        elif b.kind == "kv":
            body.append(html.key_values_html(b.content, b.extra or ("Field", "Value")))
        elif b.kind == "figure":
            png, caption = b.content
            body.append(html.figure_html(png, caption))
    return html.page(title, body)


# --------------------------------------------------------------------------- statistics


def _analyze(matrix: pd.DataFrame, reference: str, res: Results, practical: float, **kw):
    if matrix.shape[1] < 2 or matrix.shape[0] < 1 or reference not in matrix.columns:
        return None
    return stats.analyze(
        matrix,
        reference,
        higher_is_better=res.higher_is_better,
        practical=practical,
        family="pairs",  # one family: markers, verdicts and CD crossbars come from the same tests
        **kw,
    )


def _verdict_items(comp: stats.Comparison, dec: int) -> list[str]:
    items = []
    for _, r in comp.vs_reference.iterrows():
        wins = f"better in {round(r['win_rate'] * r['n'])}/{r['n']} blocks"
        delta = tables.fmt_ci(r["delta"], r["ci_low"], r["ci_high"], dec)
        if r["too_few"]:
            items.append(f"**{r['a']}** vs {r['b']}: Δ = {delta}, {wins}: {r['verdict']}.")
            continue
        items.append(
            f"**{r['a']}** vs {r['b']}: Δ = {delta}, r = {tables.fmt_num(r['r_rb'], 2, True)}, "
            f"{wins}, {int(r['n_zero'])} zero difference(s), "
            f"{tables.p_text(r['p_holm'], 'Holm p')} → **{r['verdict']}**."
        )
    return items


def _omnibus_text(comp: stats.Comparison, what: str) -> str:
    fr = comp.friedman
    head = f"{what}: N = {comp.n} blocks, k = {comp.k} methods."
    if comp.too_few:
        return (
            f"{head} {stats.TOO_FEW.capitalize()}: {tables.too_few_text(comp.n, comp.family_size, comp.alpha)}, so no "
            "p-values are reported; the numbers are descriptive only."
        )
    if not fr.available:
        return f"{head} {fr.note}; the Wilcoxon signed-rank test is the only test."
    return (
        f"{head} Friedman χ²({fr.k - 1}) = {fr.chi2:.2f}, {tables.p_text(fr.p)}; "
        f"Iman–Davenport F({fr.k - 1}, {(fr.k - 1) * (fr.n - 1)}) = {fr.f:.2f}, "
        f"{tables.p_text(fr.f_p)} — "
        + (
            "the methods differ; post hoc tests follow."
            if fr.significant(comp.alpha)
            else f"{stats.NO_EVIDENCE} between the methods (post hoc verdicts are gated on it)."
        )
        + f" Post hoc: {tables.family_text(comp)}."
    )


# --------------------------------------------------------------------------- appendix


def _distinct(values: Iterable[Any]) -> str:
    seen: list[str] = []
    for v in values:
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        if s not in seen:
            seen.append(s)
    return " | ".join(seen) if seen else "–"


def _appendix(res: Results, notes: list[str]) -> list[Block]:
    mf = data.manifest_frame(res)
    blocks = [Block("h2", "Appendix: protocol and environment")]
    if mf.empty:
        return blocks + [Block("p", "No manifests.")]
    rows: list[tuple[str, str]] = []
    for d, g in mf.groupby("dataset"):
        rows.append((f"{d}: protocol", _distinct(g["protocol"])))
        rows.append((f"{d}: model", _distinct(g["model"])))
        rows.append((f"{d}: data fingerprint", _distinct(g["data_fingerprint"])))
        diff = configs.protocol_differences([m for m in res.manifests if m.get("dataset") == d])
        if diff:
            notes.append(
                f"{d}: the methods' runs have different protocols ({configs.describe(diff)}); "
                "check the comparison is fair."
            )
        if g["data_fingerprint"].nunique() > 1:
            notes.append(
                f"{d}: the runs have different data fingerprints; check the comparison is fair."
            )
        known = g.loc[g["processor"] != "–", "processor"]
        if known.nunique() > 1:
            notes.append(
                f"{d}: the runs come from different processors ({_distinct(known)}); CPU "
                "results are bitwise reproducible on one processor only."
            )
    versions: dict[str, list[str]] = {}
    for m in res.manifests:
        for k, v in (m.get("versions") or {}).items():
            versions.setdefault(k, [])
            if str(v) not in versions[k]:
                versions[k].append(str(v))
    rows += [(f"version: {k}", " | ".join(v)) for k, v in sorted(versions.items())]
    rows += [
        ("device", _distinct(mf["device"].astype(str))),
        ("threads", _distinct(mf["threads"].astype(str))),
        ("processor", _distinct(mf["processor"])),
        ("git", _distinct(mf["git"])),
        ("runs", str(len(mf))),
        ("total compute time", f"{pd.to_numeric(mf['total_s'], errors='coerce').sum() / 3600:.2f} h"),
        ("peak memory (max)", f"{pd.to_numeric(mf['peak_memory_mb'], errors='coerce').max():.0f} MB"),
    ]  # fmt: skip
    blocks.append(Block("kv", rows))
    seeds = [
        (
            f"{d} / {m} / {lab}",
            f"seeds {', '.join(map(str, sorted(g['seed'])))}; work {_distinct(g['budget'])}",
        )
        for (d, m, lab), g in mf.groupby(["dataset", "method", "label"])
    ]
    blocks += [
        Block("h3", "Seeds and local work per run group"),
        Block("kv", seeds, ("Run group", "Seeds and work (the engine's budget record)")),
    ]
    per = (
        mf.assign(
            total_s=pd.to_numeric(mf["total_s"], errors="coerce"),
            peak_memory_mb=pd.to_numeric(mf["peak_memory_mb"], errors="coerce"),
        )
        .groupby(["dataset", "method", "label"])
        .agg(runs=("run_key", "count"), time_s=("total_s", "mean"), mem=("peak_memory_mb", "max"))
    )
    cost = [
        (f"{d} / {m} / {lab}", f"{r.runs} runs, {r.time_s:.1f} s per run, peak {r.mem:.0f} MB")
        for (d, m, lab), r in per.iterrows()
    ]
    blocks += [Block("h3", "Cost"), Block("kv", cost, ("Run group", "Time and memory"))]
    return blocks


# --------------------------------------------------------------------------- qualitative


def _qualitative_figures(res: Results, run_dir: Path, reference: str, macro, draw) -> list[str]:
    """One qualitative figure per dataset (:mod:`.qualitative`); returns why a dataset has none."""
    missing = []
    for d in res.datasets:
        ranking = macro["mean"].xs(d, level="dataset") if d in macro.index else pd.Series()
        sel, why = rqual.select(res, run_dir, d, reference, ranking)
        if sel is None or not sel.rows:
            missing.append(f"{d} ({why or 'no stored case has a Dice of the reference'})")
            continue
        draw(
            f"qualitative:{d}",
            f"qualitative_{tables._slug(d)}",
            _qualitative_caption(sel, res),
            lambda w, sel=sel: figures.qualitative_figure(sel, w),
        )
    return missing


def _qualitative_caption(sel: rqual.Selection, res: Results) -> str:
    roles = dict(sel.roles)
    n = sorted({r.candidates for r in sel.rows})
    others = (
        f"and of the best ({roles['best']}) and the worst ({roles['worst']}) of the other methods"
        if "best" in roles
        else (f"and of {roles['other']}" if "other" in roles else "")
    )
    volume = (
        ", over the whole volume; the slice shown is the one with the most ground-truth foreground"
        if sel.volume
        else ""
    )
    skipped = f" No stored case for {', '.join(sel.skipped)}." if sel.skipped else ""
    return (
        f"{sel.dataset}: qualitative examples (seed {sel.seed}). One row per site: among the "
        f"candidate test cases every run stores ({'/'.join(map(str, n))} per site here: the "
        "site's first test cases in SHA-256 order of their ids, the same for every method and "
        f"seed), the case with the median Dice of the reference {roles['reference']}. Columns: "
        "the image, the "
        f"ground truth, and the predictions at the selected (best-validation) round of the "
        f"reference {others} by client-macro test {res.metric_label} on {sel.dataset}. Each "
        f"prediction is titled with that case's Dice (mean over structures{volume}). Classes "
        f"have fixed colours.{skipped}"
    )


# --------------------------------------------------------------------------- entry point


def _default_reference(methods: list[str], notes: list[str]) -> str:
    """fedavg when present; never a silent switch to another method when it is not."""
    if "fedavg" in methods:
        return "fedavg"
    variants = [m for m in methods if m.startswith("fedavg [")]
    if variants:
        raise ReportError(
            f"fedavg has several configurations here ({', '.join(variants)}); name the "
            f"reference, e.g. --reference '{variants[-1]}'"
        )
    notes.append(
        f"fedavg is not among the methods, so the reference is {methods[0]} (the first in "
        "alphabetical order); pass --reference to choose another."
    )
    return methods[0]


def _diverged_blocks(run_dir: Path) -> list[Block]:
    """The diverged runs, left out of every table, test and figure, with round and reason."""
    from pflbench.summary import diverged_line

    rows = diverged_runs(run_dir)
    if rows.empty:
        return []
    return [
        Block("h2", f"Diverged runs ({len(rows)})"),
        Block("p", "Left out of every table, test and figure above (their last model broke down)."),
        Block("ul", [diverged_line(r)[2:] for r in rows.to_dict("records")]),
    ]


def _expectations(
    run_dir: Path, res: Results, select: dict[str, str] | None, split_configs: bool
) -> tuple[pd.DataFrame | None, tables.Table | None]:
    """The run folder's expectations judged on its results (other metrics loaded alike)."""
    try:
        expect = expectations.read(run_dir)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    if not expect:
        return None, None

    def results_for(metric: str) -> Results:
        if metric == res.metric:
            return res
        return data.load(run_dir, metric, select=select, split_configs=split_configs)

    frame = expectations.evaluate(expect, results_for)
    return frame, expectations.table(frame, res.decimals)


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    reference: str | None = None,
    metric: str = "dice",
    practical: float = stats.PRACTICAL,
    select: dict[str, str] | None = None,
    split_configs: bool = False,
) -> Path:
    """Build the report of every finished run under ``run_dir``; returns the report folder.

    ``out`` defaults to ``run_dir / "report"`` (replaced on each build). ``reference`` defaults to
    "fedavg" when present, else the first method. ``metric`` is one of dice, iou, hd95, assd
    (hd95/assd: lower is better; pass a ``practical`` threshold in their units, e.g. mm).
    ``select`` (``{"protocol.rounds": "3"}``) keeps the runs of matching configurations and
    ``split_configs`` shows each configuration of a method as its own row; without either, a
    method with several configurations in the folder is refused (:mod:`pflbench.configs`).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    res = data.load(run_dir, metric, select=select, split_configs=split_configs)
    all_methods = res.methods()
    if reference is None:
        reference = _default_reference(all_methods, res.notes)
    elif reference not in all_methods:
        raise ReportError(f"reference {reference!r} is not one of the methods {all_methods}")
    methods = res.methods(reference)
    hib, dec = res.higher_is_better, res.decimals
    notes = res.notes

    for sub in ("tables", "figures"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ statistics
    scores = res.headline()
    matrix = data.block_matrix(scores, methods, notes)
    overall = _analyze(matrix, reference, res, practical)
    per_dataset: dict[str, stats.Comparison | None] = {}
    for d in res.datasets:
        # within a dataset, use the methods that ran on it (a method missing elsewhere only
        # removes blocks from the overall comparison, not from this one)
        sd = scores[scores["dataset"] == d]
        sub = data.block_matrix(sd, [m for m in methods if m in set(sd["method"])])
        sub = sub.droplevel("dataset") if not sub.empty else sub
        per_dataset[d] = _analyze(sub, reference, res, practical, bayes=False)

    # ------------------------------------------------------------------ tables
    main = tables.main_table(res, methods, overall, per_dataset, reference, practical)
    ds_tables = [
        tables.dataset_table(res, d, methods, per_dataset[d], reference, practical)
        for d in res.datasets
    ]
    st_tables = [t for d in res.datasets if (t := tables.structure_table(res, d, methods))]
    comp_t = tables.comparison_table(overall, res) if overall is not None else None
    pairs_t = tables.pairs_table(overall, res) if overall is not None and overall.k > 2 else None
    perds_t = tables.per_dataset_table(per_dataset, res, reference)
    tvd_t = tables.tuned_default_table(res, practical)
    conf_t = tables.configurations_table(res)
    ublocks = data.unseen_blocks(res)
    unseen_t, unseen_tests = tables.unseen_table(ublocks, methods, res, practical)
    pub = published.read(run_dir)
    pub_tables = published.tables(res, pub) if pub is not None else []
    exp_frame, exp_t = _expectations(run_dir, res, select, split_configs)
    all_tables = [
        t
        for t in [
            main, exp_t, *ds_tables, *st_tables, comp_t, pairs_t, perds_t, unseen_t, tvd_t,
            conf_t, *pub_tables,
        ]
        if t is not None and not t.cells.empty
    ]  # fmt: skip
    tex_files = latex.write_tables(all_tables, out / "tables")
    (out / "tables" / "all_tables.tex").write_text(latex.document(tex_files), encoding="utf-8")
    (out / "tables" / "all_tables_twocolumn.tex").write_text(
        latex.document(tex_files, "twocolumn"), encoding="utf-8"
    )
    matrix.reset_index().to_csv(out / "tables" / "blocks.csv", index=False)
    if exp_frame is not None:
        exp_frame.to_csv(out / "tables" / expectations.CSV, index=False)
        for r in exp_frame[exp_frame["verdict"] == expectations.NOT_RUN].itertuples():
            notes.append(f"Expectation not evaluated ({r.claim}): {r.reason}.")
    if overall is not None:
        overall.vs_reference.to_csv(out / "tables" / "comparison.csv", index=False)
        overall.pairs.to_csv(out / "tables" / "pairs.csv", index=False)
    if unseen_t is not None:
        flat = ublocks.copy()
        flat.columns = [f"{m} · {c}" for m, c in flat.columns]
        flat.reset_index().to_csv(out / "tables" / "unseen_blocks.csv", index=False)
        unseen_tests.to_csv(out / "tables" / "unseen_tests.csv", index=False)

    # ------------------------------------------------------------------ figures
    st = figures.styles(methods, reference)
    figs: dict[str, tuple[Path, str]] = {}
    fig_dir = out / "figures"

    def draw(key: str, name: str, caption: str, make) -> None:
        """Full text width in figures/, one column of a two-column paper in figures/column/."""
        fig = make(figures.FULL_IN)
        if fig is None:
            return
        figs[key] = (figures.save(fig, fig_dir, name), caption)
        figures.save(make(figures.COLUMN_IN), fig_dir / "column", name)

    emphasis = f" {reference} (the reference) is drawn in black."
    if overall is not None and overall.k >= 2 and overall.n >= 2:
        draw(
            "cd",
            "cd_diagram",
            f"Critical-difference diagram: mean rank of each method over N = {overall.n} blocks "
            f"(dataset, client), k = {overall.k}, test {res.metric_label} (1 = best). Crossbars "
            f"join methods without a significant difference in the same tests as the table "
            f"markers and the text: two-sided Wilcoxon signed-rank, {tables.family_text(overall)}"
            f", adjusted p < {overall.alpha:g} and |Δ| > {practical:g}, gated on the "
            "Iman–Davenport test. Drawn with scikit-posthocs' critical_difference_diagram.",
            lambda w: figures.cd_figure(overall, st, w)[0],
        )
    conv, conv_metric = data.convergence(res)
    conv_label = data.metric_info(conv_metric)[2]
    draw(
        "convergence",
        "convergence",
        f"Validation {conv_label} against the round: for each seed the client-macro mean (each "
        "site equal, mean over structures), then the mean over seeds with a 95% t confidence "
        f"interval over seeds, clipped to [0, 1].{emphasis}",
        lambda w: figures.convergence_figure(conv, methods, st, conv_label, w),
    )
    blocks_long = matrix.stack().rename("value").reset_index().rename(columns={"level_2": "method"})
    blocks_long.columns = ["dataset", "client", "method", "value"]
    draw(
        "distributions",
        "client_distributions",
        f"Per-client test {res.metric_label} ({tables.direction(hib)}): one point per client "
        "(mean over seeds), box = quartiles over the clients of a dataset.",
        lambda w: figures.distribution_figure(blocks_long, methods, st, res.metric_label, w),
    )
    draw(
        "heatmap",
        "heatmap",
        f"Method × site test {res.metric_label} (mean over seeds).",
        lambda w: figures.heatmap_figure(matrix, res.metric_label, hib, w),
    )
    agg = data.client_aggregates(scores, hib)
    macro = agg.groupby(["dataset", "method"]).agg(
        mean=("macro", "mean"), std=("macro", "std"), worst=("worst", "mean")
    )
    comm = data.communication(res)
    if not comm.empty:
        by = comm.groupby(["dataset", "method"])["bytes"].mean()
        bdf = macro.join(by, how="inner").reset_index()
        draw(
            "bytes",
            "accuracy_vs_bytes",
            f"Client-macro test {res.metric_label} against the megabytes communicated per run "
            "(uploads + downloads over all rounds and clients; log scale, methods that send "
            "nothing at 0), mean over seeds; error bars: standard deviation over seeds." + emphasis,
            lambda w: figures.bytes_figure(bdf, methods, st, res.metric_label, w),
        )
    fdf = macro.reset_index().rename(columns={"mean": "macro"})
    draw(
        "fairness",
        "fairness",
        f"Fairness: worst-client against client-macro test {res.metric_label} per dataset "
        "and method (mean over seeds); the dashed line is worst = mean." + emphasis,
        lambda w: figures.fairness_figure(fdf, methods, st, res.metric_label, hib, w),
    )

    if unseen_t is not None:
        ucols = [
            data.IN_FEDERATION,
            *(r for r in data.REGIMES if r in set(ublocks.columns.get_level_values(1))),
        ]
        draw(
            "unseen",
            "unseen_sites",
            f"Held-out sites: test {res.metric_label} in the federation (selected checkpoint), "
            "as a zero-shot newcomer and after the few-shot steps; one faint point per block "
            "(dataset, held-out site, mean over seeds), the line joins the means over blocks."
            + emphasis,
            lambda w: figures.unseen_figure(ublocks, methods, st, ucols, res.metric_label, w),
        )

    missing_qual = _qualitative_figures(res, run_dir, reference, macro, draw)

    # ------------------------------------------------------------------ document
    seeds = res.seeds()
    doc: list[Block] = [
        Block("h1", "pflbench report"),
        Block(
            "ul",
            [
                f"Results: `{run_dir / 'results'}` ({len(res.manifests)} finished runs)",
                f"Datasets: {', '.join(res.datasets)}; methods: {', '.join(methods)}; "
                f"{tables.seeds_text(seeds)}",
                f"Metric: test {res.metric_label} ({tables.direction(hib)}) of the selected "
                "(best-validation) checkpoint; client score = mean over the client's test cases "
                "(each the mean over structures), block = (dataset, client), block score = mean "
                "over seeds",
                f"Reference: {reference}; practical threshold |Δ| > {practical:g}; α = 0.05 "
                "(Holm-adjusted)",
                "Configuration shown per method (tuned > fixed > default): "
                + ", ".join(
                    f"{m} = {'/'.join(sorted({res.headline_label[(d, mm)] for d, mm in res.headline_label if mm == m}))}"
                    for m in methods
                ),
            ],
        ),
        Block("h2", "Main results"),
        Block("table", main),
    ]
    if exp_t is not None:
        doc += [Block("h2", "Expectations"), Block("table", exp_t)]
    doc.append(Block("h2", "Statistical comparison over all datasets"))
    if overall is None:
        doc.append(Block("p", "No comparison: fewer than two methods or no complete block."))
    else:
        doc.append(Block("p", _omnibus_text(overall, "All datasets")))
        doc.append(Block("ul", _verdict_items(overall, dec)))
        doc.append(Block("p", tables._wording(overall)))
        doc += [Block("table", comp_t)]
        if "cd" in figs:
            doc.append(Block("figure", figs["cd"]))
        if pairs_t is not None:
            doc += [Block("h3", "All pairs"), Block("table", pairs_t)]
    doc.append(Block("h2", "Per dataset"))
    for d, t in zip(res.datasets, ds_tables, strict=True):
        doc += [Block("h3", d), Block("table", t)]
        st = next((s for s in st_tables if s.name == f"structures_{tables._slug(d)}"), None)
        if st is not None:
            doc.append(Block("table", st))
        comp = per_dataset[d]
        if comp is not None:
            doc.append(Block("p", _omnibus_text(comp, f"Tests within {d} (blocks = clients)")))
            if not comp.too_few:
                doc.append(Block("ul", _verdict_items(comp, dec)))
    if not perds_t.cells.empty:
        doc += [Block("h3", "Tests within each dataset"), Block("table", perds_t)]
    if unseen_t is not None:
        doc += [Block("h2", "Unseen sites"), Block("table", unseen_t)]
        if "unseen" in figs:
            doc.append(Block("figure", figs["unseen"]))
    if pub_tables:
        doc.append(Block("h2", "Published values beside ours"))
        for t in pub_tables:
            doc += [Block("h3", t.title), Block("table", t)]
    doc.append(Block("h2", "Figures"))
    for key in ("convergence", "distributions", "heatmap", "bytes", "fairness"):
        if key in figs:
            doc.append(Block("figure", figs[key]))
    doc += [Block("figure", figs[f"qualitative:{d}"]) for d in res.datasets
            if f"qualitative:{d}" in figs]  # fmt: skip
    if missing_qual:
        doc.append(Block("p", "No qualitative figure for " + "; ".join(missing_qual) + "."))
    if tvd_t is not None:
        doc += [Block("h2", "Tuned vs default configuration"), Block("table", tvd_t)]
    if conf_t is not None:
        doc += [Block("h2", "Configurations"), Block("table", conf_t)]
    appendix = _appendix(res, notes)
    doc += _diverged_blocks(run_dir)
    if notes:
        doc += [Block("h2", "Notes")] + [Block("note", n) for n in notes]
    doc += appendix
    doc.append(
        Block(
            "p",
            "Files: `tables/*.tex` (booktabs; `tables/all_tables.tex` and "
            "`tables/all_tables_twocolumn.tex` compile them in a one- and a two-column article), "
            "`figures/*.pdf|png`, `tables/*.csv` (blocks and test results).",
        )
    )
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (out / "report.html").write_text(render_html(doc, "pflbench report"), encoding="utf-8")
    return out
