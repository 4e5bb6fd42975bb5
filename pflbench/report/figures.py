"""Report figures with matplotlib only.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered by the Agg (PNG) and PDF
canvases: no pyplot, so no global state, no window and no change of the user's backend.
Each ``*_figure`` function returns a figure (or None when there is nothing to draw);
:func:`save` writes it as PDF and PNG without timestamps.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats as sps

from pflbench import stats

DPI = 130


def palette(methods: list[str]) -> dict[str, tuple]:
    cmap = mpl.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def save(fig: Figure, folder: Path, name: str) -> Path:
    """Write ``name``.pdf and ``name``.png (deterministic metadata); returns the PNG path."""
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    png = folder / f"{name}.png"
    fig.savefig(png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return png


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int, width: float = 4.6, height: float = 3.4, ncols: int = 3):
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig = new_figure(width * ncols, height * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# ------------------------------------------------------------------------------ CD diagram


def cd_figure(comp: stats.Comparison, colors: dict) -> tuple[Figure, list[set[str]]]:
    """Mean ranks with crossbars from :attr:`~pflbench.stats.Comparison.sig_matrix`, drawn by
    ``scikit_posthocs.critical_difference_diagram`` (a dependency: one drawing everywhere).

    The crossbars join methods with no significant pairwise difference in the same Wilcoxon
    tests and Holm family as the table markers and the text; no Nemenyi bar is drawn (it is a
    different test and would tell another story). Returns the figure and the crossbars as drawn
    (sets of methods), so the caption and the tests can check them against the markers.
    """
    import scikit_posthocs as sp  # noqa: PLC0415 - heavy import, only when drawing

    mean_rank = comp.friedman.mean_ranks.astype(float)
    k = len(mean_rank)
    fig = new_figure(7.0, 0.9 + 0.28 * k)
    ax = fig.subplots()
    artists = sp.critical_difference_diagram(
        mean_rank,
        comp.sig_matrix,
        ax=ax,
        alpha=comp.alpha,
        color_palette={m: colors[m] for m in mean_rank.index},
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
        label_props={"fontsize": 8},
        text_h_margin=0.3,
    )
    bars = []
    for lines in artists["crossbars"]:  # one ax.plot() result per crossbar
        xs = np.asarray(lines[0].get_xdata(), dtype=float)
        bars.append({m for m, r in mean_rank.items() if np.isclose(xs, r).any()})
    ax.set_xlabel("mean rank (1 = best)", fontsize=8)
    return fig, bars


def joined(bars: list[set[str]], a: str, b: str) -> bool:
    """Whether one crossbar of the CD diagram joins ``a`` and ``b``."""
    return any({a, b} <= bar for bar in bars)


# ------------------------------------------------------------------------------ curves


def convergence_figure(
    conv: pd.DataFrame, methods: list[str], colors: dict, metric_label: str
) -> Figure | None:
    """Validation client-macro metric vs round, mean with a t 95% CI over seeds, per dataset."""
    if conv.empty:
        return None
    datasets = sorted(conv["dataset"].unique())
    fig, axes = _grid(len(datasets))
    for ax, d in zip(axes, datasets, strict=True):
        sub = conv[conv["dataset"] == d]
        for m in methods:
            x = sub[sub["method"] == m]
            if x.empty:
                continue
            g = x.groupby("round")["value"].agg(["mean", "std", "count"]).sort_index()
            half = np.where(
                g["count"] > 1,
                sps.t.ppf(0.975, np.maximum(g["count"] - 1, 1))
                * g["std"].fillna(0)
                / np.sqrt(g["count"]),
                0.0,
            )
            rounds = g.index.to_numpy(dtype=float)
            ax.plot(rounds, g["mean"], color=colors[m], label=m, lw=1.5)
            ax.fill_between(rounds, g["mean"] - half, g["mean"] + half, color=colors[m], alpha=0.2)
        ax.set_title(d, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric_label} (client-macro)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def distribution_figure(
    blocks: pd.DataFrame, methods: list[str], colors: dict, metric_label: str
) -> Figure | None:
    """Per-client scores (mean over seeds; one point per client) per method and dataset."""
    if blocks.empty:
        return None
    datasets = sorted(blocks["dataset"].unique())
    fig, axes = _grid(len(datasets), width=max(4.6, 0.8 * len(methods) + 1.5))
    for ax, d in zip(axes, datasets, strict=True):
        sub = blocks[blocks["dataset"] == d]
        order = [m for m in methods if m in set(sub["method"])]
        data = [sub.loc[sub["method"] == m, "value"].to_numpy(float) for m in order]
        box = ax.boxplot(
            data, positions=range(len(order)), widths=0.6, showfliers=False, patch_artist=True,
            medianprops={"color": "k"},
        )  # fmt: skip
        for patch, m in zip(box["boxes"], order, strict=True):
            patch.set_facecolor(colors[m])
            patch.set_alpha(0.45)
        rng = np.random.default_rng(0)  # deterministic jitter
        for pos, y in enumerate(data):
            ax.scatter(pos + rng.uniform(-0.15, 0.15, y.size), y, s=12, color="k", zorder=3)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax.set_title(f"{d} ({sub['client'].nunique()} clients)", fontsize=10)
        ax.set_ylabel(f"test {metric_label} per client")
        ax.grid(axis="y", alpha=0.3)
    return fig


def heatmap_figure(
    matrix: pd.DataFrame, metric_label: str, higher_is_better: bool
) -> Figure | None:
    """Methods × (dataset / site) of the block scores (mean over seeds)."""
    if matrix.empty:
        return None
    data = matrix.T  # methods × blocks
    labels = [f"{d}/{c}" for d, c in data.columns]
    n_rows, n_cols = data.shape
    fig = new_figure(max(5.0, 0.55 * n_cols + 2.5), max(2.5, 0.45 * n_rows + 1.5))
    ax = fig.subplots()
    cmap = "viridis" if higher_is_better else "viridis_r"
    im = ax.imshow(data.to_numpy(float), aspect="auto", cmap=cmap)
    ax.set_xticks(range(n_cols), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), list(data.index), fontsize=9)
    if n_cols * n_rows <= 400:
        vals = data.to_numpy(float)
        mid = np.nanmean(vals)
        for i in range(n_rows):
            for j in range(n_cols):
                v = vals[i, j]
                if np.isfinite(v):
                    dark = (v < mid) if higher_is_better else (v > mid)
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                        color="w" if dark else "k",
                    )  # fmt: skip
    # separators between datasets
    ds = [d for d, _ in data.columns]
    for j in range(1, n_cols):
        if ds[j] != ds[j - 1]:
            ax.axvline(j - 0.5, color="w", lw=2)
    fig.colorbar(im, ax=ax, label=f"test {metric_label} (mean over seeds)")
    return fig


def bytes_figure(
    df: pd.DataFrame, methods: list[str], colors: dict, metric_label: str
) -> Figure | None:
    """Client-macro test metric against total communicated bytes per run (mean over seeds)."""
    df = df.dropna(subset=["bytes", "mean"])
    if df.empty:
        return None
    datasets = sorted(df["dataset"].unique())
    fig, axes = _grid(len(datasets))
    for ax, d in zip(axes, datasets, strict=True):
        sub = df[df["dataset"] == d]
        for m in methods:
            x = sub[sub["method"] == m]
            if x.empty:
                continue
            b = x["bytes"].to_numpy(float)
            ax.errorbar(
                b, x["mean"], yerr=x["std"].fillna(0), fmt="o",
                color=colors[m], label=m, capsize=3,
            )  # fmt: skip
        pos = sub.loc[sub["bytes"] > 0, "bytes"]
        if len(pos) and (sub["bytes"] > 0).all():
            ax.set_xscale("log")
        elif len(pos):  # some methods send nothing (local training): keep 0 on the axis
            ax.set_xscale("symlog", linthresh=float(pos.min()) / 2)
        ax.set_title(d, fontsize=10)
        ax.set_xlabel("bytes communicated per run (up + down, all clients)")
        ax.set_ylabel(f"test {metric_label} (client-macro)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def fairness_figure(
    df: pd.DataFrame, methods: list[str], colors: dict, metric_label: str, higher_is_better: bool
) -> Figure | None:
    """Worst client against the client-macro mean per dataset and method (mean over seeds)."""
    if df.empty:
        return None
    marks = "osD^vP*Xh"
    datasets = sorted(df["dataset"].unique())
    fig = new_figure(6.2, 5.0)
    ax = fig.subplots()
    for i, d in enumerate(datasets):
        for m in methods:
            x = df[(df["dataset"] == d) & (df["method"] == m)]
            if x.empty:
                continue
            ax.scatter(x["macro"], x["worst"], color=colors[m], marker=marks[i % len(marks)], s=45)
    lo = float(np.nanmin(df[["macro", "worst"]].to_numpy()))
    hi = float(np.nanmax(df[["macro", "worst"]].to_numpy()))
    ax.plot([lo, hi], [lo, hi], color="0.6", ls="--", lw=1, label="worst = mean")
    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [
        Line2D([], [], color="0.3", marker=marks[i % len(marks)], ls="", label=d)
        for i, d in enumerate(datasets)
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel(f"client-macro test {metric_label}")
    ax.set_ylabel(f"worst-client test {metric_label}")
    ax.set_title("Fairness: worst client vs mean (closer to the diagonal = more even)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig
