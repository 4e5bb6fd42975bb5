"""The end-of-run summary: Dice per method × site, printed and written as Markdown.

Reads the tidy results only: test Dice at the selected (best-validation) round, mean over the
client's cases and structures, then mean ± std over seeds; the last column is the client-macro
mean. In tuning-only folders (no test rows) the validation split is used and the title says so.
Diverged runs are left out of the table and listed below it, with the round and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pflbench.configs import split_labels
from pflbench.results import diverged_runs, load_manifests, load_results


def run_labels(out: str | Path) -> dict[str, str]:
    """run_key → the row label of the summary: the method, "(tuned)"/"(default)" for a sweep's
    labels, and the differing keys where one method has several configurations in the folder
    (those are never averaged together; see :mod:`pflbench.configs`)."""
    manifests = load_manifests(out)
    split = split_labels(manifests)
    labels = {}
    for m in manifests:
        key = str(m.get("run_key"))
        name = split.get(key, str(m.get("method")))
        if m.get("label") in ("tuned", "default"):  # sweeps run both: keep them apart
            name = f"{name} ({m.get('label')})"
        labels[key] = name
    return labels


def _cell(mean: float, std: float) -> str:
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"  # one seed: no spread


def dice_table(out: str | Path) -> tuple[pd.DataFrame, str]:
    """(table of strings "mean ± std" indexed by dataset/method with a site column each, split).

    Rows are configurations, never a mix of them: seeds of one configuration are averaged.
    """
    cases = load_results(out, "cases")
    if cases.empty:
        return pd.DataFrame(), "test"
    split = "test" if (cases["split"] == "test").any() else "val"
    sel = cases[(cases["selection"] == "best") & (cases["split"] == split)].copy()
    sel["method"] = sel["run_key"].astype(str).map(run_labels(out)).fillna(sel["method"])
    per_client = (
        sel.groupby(["dataset", "method", "seed", "client"], sort=False)["dice"]
        .mean()
        .reset_index()
    )
    macro = (
        per_client.groupby(["dataset", "method", "seed"], sort=False)["dice"].mean().reset_index()
    )
    macro["client"] = "mean"
    both = pd.concat([per_client, macro], ignore_index=True)
    agg = both.groupby(["dataset", "method", "client"], sort=False)["dice"].agg(["mean", "std"])
    cells = agg.apply(lambda r: _cell(r["mean"], r["std"]), axis=1).rename("dice")
    table = cells.reset_index().pivot(index=["dataset", "method"], columns="client", values="dice")
    sites = [c for c in dict.fromkeys(per_client["client"]) if c in table.columns]
    table = table[sites + ["mean"]]
    return table, split


def write_summary(out: str | Path, table: tuple[pd.DataFrame, str] | None = None) -> Path | None:
    """Write ``summary.md`` from ``table`` (a :func:`dice_table` result, read here if None) and
    the diverged runs; atomically, so a full disk never leaves a truncated summary."""
    table, split = table if table is not None else dice_table(out)
    diverged = diverged_section(out)
    if table.empty and not diverged:
        return None
    path = Path(out) / "summary.md"
    text = ""
    if not table.empty:
        text = (
            f"# Dice per method × site ({split} split, best-validation round, mean ± std over "
            "seeds)\n\n"
        )
        rows = table.reset_index().fillna("–")  # a site the dataset does not have
        text += rows.to_markdown(index=False) + "\n"
    if diverged:
        text += ("\n" if text else "") + diverged
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def diverged_section(out: str | Path) -> str:
    """Markdown list of the diverged runs (left out of the table), or "" when there are none."""
    rows = diverged_runs(out)
    if rows.empty:
        return ""
    lines = [f"## Diverged runs ({len(rows)}, left out of the table above)", ""]
    lines += [diverged_line(r) for r in rows.to_dict("records")]
    return "\n".join(lines) + "\n"


def diverged_line(row: dict) -> str:
    label = f" ({row['label']})" if row.get("label") not in (None, "fixed") else ""
    return (
        f"- {row['dataset']} · {row['method']}{label} · seed {row['seed']}: diverged in round "
        f"{row['round']}: {row['reason']} (`{row['run_key']}`)"
    )
