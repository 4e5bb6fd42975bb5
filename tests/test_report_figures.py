"""Report figures for a paper: distinguishable styles, honest bands, readable axes, page widths."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pflbench.report import figures


def test_styles_keep_24_methods_apart_and_emphasise_the_reference():
    methods = [f"m{i}" for i in range(23)] + ["fedavg"]
    st = figures.styles(methods, "fedavg")
    keys = {(s["color"], s["marker"], s["ls"]) for s in st.values()}
    assert len(keys) == 24  # no two methods share colour, marker and line style
    assert st["fedavg"]["color"] == "black" and st["fedavg"]["lw"] > max(
        s["lw"] for m, s in st.items() if m != "fedavg"
    )
    # the first methods differ in colour alone (the common small-table case)
    assert len({st[f"m{i}"]["color"] for i in range(8)}) == 8


def _conv() -> pd.DataFrame:
    rows = []
    for m, level in (("fedavg", 0.95), ("local", 0.05)):
        for seed, noise in ((0, -0.2), (1, 0.2), (2, 0.0)):
            for r in (3, 6):
                rows.append(dict(dataset="d", method=m, label="fixed", seed=seed, round=r,
                                 value=float(np.clip(level + noise, 0, 1))))  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize("width", [figures.COLUMN_IN, figures.FULL_IN])
def test_convergence_band_stays_in_the_metric_range_with_integer_rounds(width):
    conv = _conv()
    st = figures.styles(["fedavg", "local"], "fedavg")
    fig = figures.convergence_figure(conv, ["fedavg", "local"], st, "Dice", width)
    ax = fig.axes[0]
    fig.canvas.draw()
    ys = np.concatenate([p.get_paths()[0].vertices[:, 1] for p in ax.collections])
    assert ys.min() >= 0.0 and ys.max() <= 1.0  # a t-interval of 3 seeds would reach past both
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert fig.get_size_inches()[0] == pytest.approx(width)
    assert fig.legends and not ax.get_legend()  # one legend, outside the axes


def test_bytes_axis_has_readable_ticks_and_a_zero_for_local():
    df = pd.DataFrame(
        dict(dataset="d", method=["local", "fedavg", "fedrep"], mean=[0.5, 0.6, 0.7],
             std=[0.01] * 3, bytes=[0.0, 22.1e6, 24.0e6])
    )  # fmt: skip
    st = figures.styles(["fedavg", "local", "fedrep"], "fedavg")
    fig = figures.bytes_figure(df, ["fedavg", "local", "fedrep"], st, "Dice")
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    lo, hi = ax.get_xlim()
    inside = [lab for lab, t in zip(labels, ax.get_xticks(), strict=True) if lo <= t <= hi]
    assert "0" in inside and len(inside) >= 3 and ax.get_xscale() == "log"


def test_distributions_are_a_grid_at_page_width():
    blocks = pd.DataFrame(
        [dict(dataset=d, client=f"c{c}", method=f"m{m}", value=0.1 * c)
         for d in ("a", "b") for c in range(6) for m in range(14)]
    )  # fmt: skip
    methods = [f"m{m}" for m in range(14)]
    st = figures.styles(methods, "m0")
    for width in (figures.COLUMN_IN, figures.FULL_IN):
        fig = figures.distribution_figure(blocks, methods, st, "Dice", width)
        w, h = fig.get_size_inches()
        assert w == pytest.approx(width) and h < 9.0  # was 3317 px wide in one row
