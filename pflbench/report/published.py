"""Published numbers beside ours: a suite's ``report.published`` block, in the report.

A reproduction suite (``suites/resfim-paper.yaml``) carries the values a paper reports; ``pflbench
run`` copies them into the run folder (``published.json``) and the report prints, per dataset,
one table of our per-site test Dice of the named method next to a column clearly labelled as the
published value, with "not recovered" where the paper's number could not be read. They are a
reference to compare with, never a target: nothing here feeds back into a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from pflbench.suite import Published

FILE = "published.json"
NOT_RECOVERED = "not recovered"


def parse(raw: Any, where: str) -> Published:
    """Validate a ``report.published`` mapping; errors name ``where`` and the key."""
    try:
        return Published.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ValueError(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}") from None


def write(report_options: dict[str, Any], out_dir: str | Path) -> Path | None:
    """Copy the suite's ``report.published`` into the run folder (removing a stale copy)."""
    path = Path(out_dir) / FILE
    raw = report_options.get("published")
    if raw is None:
        path.unlink(missing_ok=True)
        return None
    pub = parse(raw, "report.published")
    path.write_text(json.dumps(pub.model_dump(mode="json"), indent=2), encoding="utf-8")
    return path


def read(run_dir: str | Path) -> Published | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    return parse(json.loads(path.read_text(encoding="utf-8")), str(path))


def tables(res: Any, pub: Published) -> list[Any]:
    """One :class:`~pflbench.report.tables.Table` per published dataset present in ``res``."""
    from .tables import Table

    out = []
    scores = res.headline()
    for dataset, spec in pub.datasets.items():
        if dataset not in res.datasets:
            continue
        ours = scores[(scores["dataset"] == dataset) & (scores["method"] == pub.method)]
        sites = res.sites(dataset)
        col_pub = "published (Dice %)"
        col_ours = f"ours: {pub.method} (Dice %, mean ± SD over seeds)"
        cells = pd.DataFrame("–", index=[*sites, "Avg"], columns=[col_pub, col_ours])
        for site in sites:
            value = spec.sites.get(site)
            alias = spec.names.get(site)
            text = NOT_RECOVERED if value is None else f"{value:.2f}"
            cells.loc[site, col_pub] = text + (f" (as {alias})" if alias else "")
            per_seed = 100 * ours.loc[ours["client"] == site, "value"]
            cells.loc[site, col_ours] = _mean_sd(per_seed)
        cells.loc["Avg", col_pub] = NOT_RECOVERED if spec.average is None else f"{spec.average:.2f}"
        macro = 100 * ours.groupby("seed")["value"].mean() if not ours.empty else pd.Series()
        cells.loc["Avg", col_ours] = _mean_sd(macro)
        seeds = sorted(ours["seed"].unique().tolist())
        missing = [s for s in spec.sites if s not in sites]
        notes = [spec.note] if spec.note else []
        if missing:
            notes.append(f"published sites not among ours: {', '.join(missing)}")
        if ours.empty:
            notes.append(f"no finished {pub.method} runs on {dataset}")
        caption = (
            f"{dataset}: published values ({pub.source}) beside our test Dice of "
            f"{pub.method} (best-validation checkpoint, {len(seeds)} seed(s)). The published "
            "column is the paper's number, not ours; it is a reference, not a target. Avg is the "
            "unweighted mean over clients." + (" " + " ".join(notes) if notes else "")
        )
        out.append(
            Table(
                name=f"published_{_slug(dataset)}",
                title=f"{dataset}: published {pub.method} values beside ours",
                cells=cells,
                caption=caption,
                index_name="Site",
                notes=notes,
            )
        )
    return out


def _mean_sd(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())
