"""Report figures with matplotlib only.

Figures are plain :class:`matplotlib.figure.Figure` objects rendered by the Agg (PNG) and PDF
canvases: no pyplot, so no global state, no window and no change of the user's backend.
Each ``*_figure`` function returns a figure (or None when there is nothing to draw);
:func:`save` writes it as PDF and PNG without timestamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from scipy import stats as sps

from pflbench import stats

DPI = 200
#: Paper widths (inches): one column of a two-column article, and the full text width.
COLUMN_IN, FULL_IN = 3.5, 7.0
#: Okabe–Ito colours (colour-blind safe) without black, which marks the reference method.
COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#999999", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", ":", "-.")


def styles(methods: list[str], reference: str | None = None) -> dict[str, dict]:
    """A style per method: colour × marker × line style, so up to 8 × 4 = 32 methods stay
    distinguishable in print and in grey; the reference is black, thicker and drawn on top."""
    out: dict[str, dict] = {}
    i = 0
    for m in methods:
        if m == reference:
            out[m] = {"color": "black", "marker": "o", "ls": "-", "lw": 2.2, "zorder": 5}
            continue
        out[m] = {
            "color": COLOURS[i % len(COLOURS)],
            "marker": MARKERS[(i // len(COLOURS) + i) % len(MARKERS)],
            "ls": LINES[(i // len(COLOURS)) % len(LINES)],
            "lw": 1.2,
            "zorder": 3,
        }
        i += 1
    return out


def palette(methods: list[str], reference: str | None = None) -> dict[str, dict]:
    """Alias of :func:`styles` (the figures take a style per method)."""
    return styles(methods, reference)


def _legend(fig: Figure, methods: list[str], st: dict[str, dict], line: bool = True) -> None:
    """One legend for the figure, below the axes (outside the data)."""
    handles = [
        Line2D([], [], color=st[m]["color"], marker=st[m]["marker"], markersize=4,
               ls=st[m]["ls"] if line else "", lw=st[m]["lw"], label=m)
        for m in methods if m in st
    ]  # fmt: skip
    width = fig.get_size_inches()[0]
    ncol = max(1, min(len(handles), int(width / 1.15)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=6.5,
               frameon=False, handlelength=2.2, columnspacing=1.0)  # fmt: skip


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


def _grid(n: int, width: float, panel_h: float, ncols: int):
    """``n`` panels in ``ncols`` columns at ``width`` inches in all."""
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig = new_figure(width, panel_h * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _small(ax) -> None:
    ax.tick_params(labelsize=6.5)
    ax.xaxis.label.set_size(7)
    ax.yaxis.label.set_size(7)
    ax.title.set_size(7.5)
    ax.grid(alpha=0.3, lw=0.5)


# ------------------------------------------------------------------------------ CD diagram


def cd_figure(
    comp: stats.Comparison, st: dict[str, dict], width: float = FULL_IN
) -> tuple[Figure, list[set[str]]]:
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
    fig = new_figure(width, 0.7 + 0.16 * k)
    ax = fig.subplots()
    artists = sp.critical_difference_diagram(
        mean_rank,
        comp.sig_matrix,
        ax=ax,
        alpha=comp.alpha,
        color_palette={m: st[m]["color"] for m in mean_rank.index},
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
        label_props={"fontsize": 6.5},
        text_h_margin=0.3,
    )
    bars = []
    for lines in artists["crossbars"]:  # one ax.plot() result per crossbar
        xs = np.asarray(lines[0].get_xdata(), dtype=float)
        bars.append({m for m, r in mean_rank.items() if np.isclose(xs, r).any()})
    ax.tick_params(labelsize=6.5)
    ax.set_xlabel("mean rank (1 = best)", fontsize=7)
    return fig, bars


def joined(bars: list[set[str]], a: str, b: str) -> bool:
    """Whether one crossbar of the CD diagram joins ``a`` and ``b``."""
    return any({a, b} <= bar for bar in bars)


# ------------------------------------------------------------------------------ curves


def convergence_figure(
    conv: pd.DataFrame,
    methods: list[str],
    st: dict[str, dict],
    metric_label: str,
    width: float = FULL_IN,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Figure | None:
    """Validation client-macro metric vs round: the mean over seeds of each seed's client-macro
    mean, with a t 95% CI over seeds clipped to the metric's range; integer rounds."""
    if conv.empty:
        return None
    datasets = sorted(conv["dataset"].unique())
    ncols = 1 if width < 5 else min(2, len(datasets))
    fig, axes = _grid(len(datasets), width, 1.9 if width < 5 else 2.2, ncols)
    for ax, d in zip(axes, datasets, strict=True):
        sub = conv[conv["dataset"] == d]
        for m in methods:
            x = sub[sub["method"] == m]
            if x.empty:
                continue
            g = x.groupby("round")["value"].agg(["mean", "std", "count"]).sort_index()
            n = g["count"].to_numpy()
            half = np.where(
                n > 1, sps.t.ppf(0.975, np.maximum(n - 1, 1)) * g["std"].fillna(0) / np.sqrt(n), 0
            )
            r = g.index.to_numpy(dtype=float)
            s = st[m]
            ax.plot(r, g["mean"], color=s["color"], ls=s["ls"], lw=s["lw"], marker=s["marker"],
                    markersize=3, zorder=s["zorder"], label=m)  # fmt: skip
            lo = np.clip(g["mean"] - half, *bounds)
            hi = np.clip(g["mean"] + half, *bounds)
            ax.fill_between(r, lo, hi, color=s["color"], alpha=0.12, lw=0)
        ax.set_title(d)
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric_label}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(*bounds)
        _small(ax)
    _legend(fig, [m for m in methods if m in set(conv["method"])], st)
    return fig


def distribution_figure(
    blocks: pd.DataFrame,
    methods: list[str],
    st: dict[str, dict],
    metric_label: str,
    width: float = FULL_IN,
) -> Figure | None:
    """Per-client scores (mean over seeds; one point per client) per method, one panel per
    dataset stacked in a grid that fits the page width."""
    if blocks.empty:
        return None
    datasets = sorted(blocks["dataset"].unique())
    fig, axes = _grid(len(datasets), width, 1.7 if width < 5 else 1.9, 1)
    for ax, d in zip(axes, datasets, strict=True):
        sub = blocks[blocks["dataset"] == d]
        order = [m for m in methods if m in set(sub["method"])]
        data = [sub.loc[sub["method"] == m, "value"].to_numpy(float) for m in order]
        box = ax.boxplot(
            data, positions=range(len(order)), widths=0.6, showfliers=False, patch_artist=True,
            medianprops={"color": "k", "lw": 0.8}, boxprops={"lw": 0.6},
            whiskerprops={"lw": 0.6}, capprops={"lw": 0.6},
        )  # fmt: skip
        for patch, m in zip(box["boxes"], order, strict=True):
            patch.set_facecolor(st[m]["color"])
            patch.set_alpha(0.5)
        rng = np.random.default_rng(0)  # deterministic jitter
        for pos, y in enumerate(data):
            ax.scatter(pos + rng.uniform(-0.15, 0.15, y.size), y, s=4, color="k", zorder=3)
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_title(f"{d} ({sub['client'].nunique()} clients)")
        ax.set_ylabel(f"test {metric_label}")
        _small(ax)
    return fig


def heatmap_figure(
    matrix: pd.DataFrame, metric_label: str, higher_is_better: bool, width: float = FULL_IN
) -> Figure | None:
    """Methods × (dataset / site) of the block scores (mean over seeds)."""
    if matrix.empty:
        return None
    data = matrix.T  # methods × blocks
    labels = [f"{d}/{c}" for d, c in data.columns]
    n_rows, n_cols = data.shape
    fig = new_figure(width, min(8.5, 0.9 + 0.17 * n_rows + 0.05 * max(map(len, labels))))
    ax = fig.subplots()
    cmap = "viridis" if higher_is_better else "viridis_r"
    im = ax.imshow(data.to_numpy(float), aspect="auto", cmap=cmap)
    ax.set_xticks(range(n_cols), labels, rotation=60, ha="right", fontsize=5.5)
    ax.set_yticks(range(n_rows), list(data.index), fontsize=6)
    if n_cols * n_rows <= 400 and width >= 5:
        vals = data.to_numpy(float)
        mid = np.nanmean(vals)
        for i in range(n_rows):
            for j in range(n_cols):
                v = vals[i, j]
                if np.isfinite(v):
                    dark = (v < mid) if higher_is_better else (v > mid)
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=4.5,
                            color="w" if dark else "k")  # fmt: skip
    ds = [d for d, _ in data.columns]
    for j in range(1, n_cols):
        if ds[j] != ds[j - 1]:
            ax.axvline(j - 0.5, color="w", lw=2)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"test {metric_label}", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return fig


def _bytes_axis(ax, values: np.ndarray) -> float:
    """Log x axis in MB with readable ticks (1-2-5); methods that send nothing sit at a "0"
    tick left of the smallest positive value. Returns the x position used for 0."""
    pos = values[values > 0]
    if not len(pos):
        return 0.0
    zero = float(pos.min()) / 4
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    if (values <= 0).any():
        ticks = [t for t in ax.get_xticks() if t > zero * 1.5] + [zero]
        ax.set_xticks(sorted(ticks), [f"{t:g}" if t != zero else "0" for t in sorted(ticks)])
    ax.set_xlim(zero / 1.6 if (values <= 0).any() else pos.min() / 1.6, pos.max() * 1.6)
    return zero


def bytes_figure(
    df: pd.DataFrame,
    methods: list[str],
    st: dict[str, dict],
    metric_label: str,
    width: float = FULL_IN,
) -> Figure | None:
    """Client-macro test metric against total communicated MB per run (mean over seeds)."""
    df = df.dropna(subset=["bytes", "mean"])
    if df.empty:
        return None
    datasets = sorted(df["dataset"].unique())
    ncols = 1 if width < 5 else min(2, len(datasets))
    fig, axes = _grid(len(datasets), width, 1.9 if width < 5 else 2.2, ncols)
    for ax, d in zip(axes, datasets, strict=True):
        sub = df[df["dataset"] == d]
        mb = sub["bytes"].to_numpy(float) / 1e6
        zero = _bytes_axis(ax, mb)
        for m in methods:
            x = sub[sub["method"] == m]
            if x.empty:
                continue
            b = x["bytes"].to_numpy(float) / 1e6
            b = np.where(b > 0, b, zero)
            s = st[m]
            ax.errorbar(b, x["mean"], yerr=x["std"].fillna(0), fmt=s["marker"], color=s["color"],
                        markersize=4, capsize=2, lw=0.8, zorder=s["zorder"], label=m)  # fmt: skip
        ax.set_title(d)
        ax.set_xlabel("MB communicated per run (up + down, all clients and rounds)")
        ax.set_ylabel(f"test {metric_label}")
        _small(ax)
    _legend(fig, [m for m in methods if m in set(df["method"])], st, line=False)
    return fig


def fairness_figure(
    df: pd.DataFrame,
    methods: list[str],
    st: dict[str, dict],
    metric_label: str,
    higher_is_better: bool,
    width: float = FULL_IN,
) -> Figure | None:
    """Worst client against the client-macro mean per dataset and method (mean over seeds)."""
    if df.empty:
        return None
    datasets = sorted(df["dataset"].unique())
    ncols = 1 if width < 5 else min(2, len(datasets))
    fig, axes = _grid(len(datasets), width, 2.0 if width < 5 else 2.6, ncols)
    for ax, d in zip(axes, datasets, strict=True):
        sub = df[df["dataset"] == d]
        for m in methods:
            x = sub[sub["method"] == m]
            if x.empty:
                continue
            s = st[m]
            ax.scatter(x["macro"], x["worst"], color=s["color"], marker=s["marker"], s=16,
                       zorder=s["zorder"])  # fmt: skip
        lo = float(np.nanmin(sub[["macro", "worst"]].to_numpy()))
        hi = float(np.nanmax(sub[["macro", "worst"]].to_numpy()))
        ax.plot([lo, hi], [lo, hi], color="0.6", ls="--", lw=0.8)
        ax.set_title(f"{d} (dashed: worst = mean)")
        ax.set_xlabel(f"client-macro test {metric_label}")
        ax.set_ylabel(f"worst-client {metric_label}")
        _small(ax)
    _legend(fig, [m for m in methods if m in set(df["method"])], st, line=False)
    return fig


# ------------------------------------------------------------------------------ qualitative

#: Fixed colour of each foreground class id (1, 2, …), the same in every figure; background is
#: left transparent over the image.
CLASS_COLOURS = ("#D55E00", "#56B4E9", "#F0E442", "#009E73", "#CC79A7", "#0072B2", "#E69F00")


def class_overlay(label: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """H×W class ids → H×W×4 RGBA: class k in ``CLASS_COLOURS[(k - 1) % 7]``, 0 transparent."""
    from matplotlib.colors import to_rgba  # noqa: PLC0415

    lut = np.zeros((256, 4))
    for k in range(1, 256):
        lut[k] = to_rgba(CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], alpha)
    return lut[np.asarray(label, dtype=np.uint8)]


def _show_image(ax, image: np.ndarray, shape: tuple[int, ...], dim: float = 1.0) -> None:
    """The (stored shrunk) image stretched over the H×W pixel grid of the masks."""
    img = np.asarray(image, dtype=float) / 255.0 * dim
    extent = (-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, extent=extent)
    else:
        ax.imshow(img, extent=extent)


def qualitative_figure(sel, width: float = FULL_IN) -> Figure | None:
    """Rows: one chosen test case per site; columns: image, ground truth, then the prediction of
    each shown method (reference, best, worst) over the dimmed image, titled with its Dice."""
    from matplotlib.patches import Patch  # noqa: PLC0415

    if sel is None or not sel.rows:
        return None
    ncols = 2 + len(sel.roles)
    panel = width / ncols
    small = width < 5
    fs = 4.6 if small else 6.5
    title = 2.9 * fs / 72  # two lines of title per panel, in inches
    fig = new_figure(width, len(sel.rows) * (0.94 * panel + title) + 0.3)
    axes = fig.subplots(len(sel.rows), ncols, squeeze=False)
    for r, row in enumerate(sel.rows):
        ax = axes[r, 0]
        _show_image(ax, row.image, row.label.shape)
        where = f"{row.site}\n{row.case_id}" + (f", slice {row.slice_index}" if sel.volume else "")
        ax.set_ylabel(where, fontsize=fs)
        _show_image(axes[r, 1], row.image, row.label.shape, dim=0.6)
        axes[r, 1].imshow(class_overlay(row.label), interpolation="nearest")
        if r == 0:
            ax.set_title("image", fontsize=fs)
            axes[r, 1].set_title("ground truth", fontsize=fs)
        for c, (role, method) in enumerate(sel.roles, start=2):
            ax = axes[r, c]
            _show_image(ax, row.image, row.label.shape, dim=0.6)
            ax.imshow(class_overlay(row.preds[method]), interpolation="nearest")
            d = row.dice[method]
            ax.set_title(f"{role}: {method}\nDice {d:.3f}" if np.isfinite(d) else
                         f"{role}: {method}\nDice –", fontsize=fs)  # fmt: skip
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_linewidth(0.4)
    present = sorted({int(k) for row in sel.rows for m in (row.label, *row.preds.values())
                      for k in np.unique(m) if k > 0})  # fmt: skip
    handles = [
        Patch(color=CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)],
              label=sel.classes[k] if k < len(sel.classes) else f"class {k}")
        for k in present
    ]  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                   fontsize=fs, frameon=False)  # fmt: skip
    return fig


def unseen_figure(
    blocks: pd.DataFrame,
    methods: list[str],
    st: dict[str, dict],
    columns: list[str],
    metric_label: str,
    width: float = FULL_IN,
) -> Figure | None:
    """In-federation → zero-shot → few-shot test score of the held-out sites: per method the
    mean over blocks (dataset, held-out site) joined by a line, each block a faint point."""
    shown = [m for m in methods if any((m, c) in blocks.columns for c in columns)]
    if blocks.empty or not shown:
        return None
    fig = new_figure(width, 2.6 if width >= 5 else 2.3)
    ax = fig.subplots()
    x = np.arange(len(columns))
    offsets = np.linspace(-0.15, 0.15, len(shown)) if len(shown) > 1 else np.zeros(1)
    for off, m in zip(offsets, shown, strict=True):
        s = st[m]
        vals = [blocks[(m, c)] if (m, c) in blocks.columns else None for c in columns]
        means = [float(v.mean()) if v is not None else np.nan for v in vals]
        for j, v in enumerate(vals):
            if v is not None:
                ax.scatter(np.full(len(v), x[j] + off), v, s=6, color=s["color"], alpha=0.3,
                           marker=s["marker"], lw=0)  # fmt: skip
        ax.plot(x + off, means, color=s["color"], marker=s["marker"], ls=s["ls"], lw=s["lw"],
                markersize=4, zorder=s["zorder"])  # fmt: skip
    ax.set_xticks(x, [c.replace("_", " ") for c in columns])
    ax.set_ylabel(f"test {metric_label}")
    _small(ax)
    _legend(fig, shown, st)
    return fig
