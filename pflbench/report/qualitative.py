"""What the qualitative figure of a dataset shows, chosen from the stored ``qualitative.npz`` files.

Every final run stores the same candidate test cases per site (:mod:`pflbench.qualitative`); this
module picks, with fixed rules and from result files only:

* **methods**: the reference, and the best and the worst of the other methods by the report's own
  ranking (the client-macro test metric of the dataset table, mean over seeds; ties by name);
* **seed**: the lowest seed for which each of these methods has a stored file (its headline label,
  tuned > fixed > default), so every panel of a row shows the same case of one seed's runs;
* **case per site**: among the candidates stored by every shown method, the reference's
  median-Dice case (case Dice = mean over structures, from the cases table of that run; candidates
  sorted by Dice then case id, the lower median for an even number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pflbench.qualitative import Case
from pflbench.results import is_diverged, read_qualitative, results_dir

from .data import Results, _test_cases


@dataclass
class Row:
    """One site's chosen case: what is drawn and each shown method's Dice of it."""

    site: str
    case_id: str
    slice_index: int
    image: np.ndarray
    label: np.ndarray
    preds: dict[str, np.ndarray]
    dice: dict[str, float]
    candidates: int


@dataclass
class Selection:
    dataset: str
    seed: int
    roles: list[tuple[str, str]]  # (role, method): reference, best, worst
    rows: list[Row]
    classes: list[str]
    volume: bool = False
    skipped: list[str] = field(default_factory=list)


def roles(reference: str, ranking: pd.Series, higher_is_better: bool) -> list[tuple[str, str]]:
    """(role, method) of the shown methods: the reference, then the best and the worst of the
    others on ``ranking`` (method → score); one other method is shown as "other"."""
    others = ranking.drop(reference, errors="ignore").dropna()
    order = sorted(others.index, key=lambda m: (-others[m] if higher_is_better else others[m], m))
    out = [("reference", reference)]
    if len(order) == 1:
        out.append(("other", order[0]))
    elif len(order) > 1:
        out += [("best", order[0]), ("worst", order[-1])]
    return out


def median_case(dice: dict[str, float]) -> str:
    """The median-Dice case among candidates (case id → Dice): sorted by Dice then case id, the
    lower median for an even number."""
    order = sorted(dice, key=lambda c: (dice[c], c))
    return order[(len(order) - 1) // 2]


def _case_dice(res: Results, run_key: str) -> dict[tuple[str, str], float]:
    c = _test_cases(res.cases[res.cases["run_key"].astype(str) == run_key])
    if c.empty:
        return {}
    c = c.assign(client=c["client"].astype(str), case_id=c["case_id"].astype(str))
    per = pd.to_numeric(c["dice"], errors="coerce").groupby([c["client"], c["case_id"]]).mean()
    return {k: float(v) for k, v in per.items()}


def select(
    res: Results,
    run_dir: Path,
    dataset: str,
    reference: str,
    ranking: pd.Series,
) -> tuple[Selection | None, str]:
    """The figure's content for ``dataset``, or None and the reason there is none."""
    shown = roles(reference, ranking, res.higher_is_better)
    runs: dict[str, dict[int, dict]] = {}
    for m in res.manifests:
        method = str(m.get("method"))
        if m.get("dataset") != dataset or is_diverged(m):
            continue
        if m.get("label") != res.headline_label.get((dataset, method)):
            continue
        runs.setdefault(method, {})[int(m.get("seed"))] = m
    methods = [m for _, m in shown]
    seeds = sorted(set.intersection(*(set(runs.get(m, {})) for m in methods)))
    base = results_dir(run_dir)
    for seed in seeds:
        stored: dict[str, tuple[list[Case], list[str]]] = {}
        for m in methods:
            man = runs[m][seed]
            got = read_qualitative(base / str(man.get("run_key")), man)
            if got is None:
                break
            stored[m] = got
        if len(stored) == len(methods):
            return _rows(res, dataset, seed, shown, runs, stored), ""
    if not seeds:
        return None, "no seed has a finished run of each shown method"
    return None, (
        "its runs store no predicted masks (results from before they were stored, or "
        "protocol.qualitative_cases: 0)"
    )


def _rows(res, dataset, seed, shown, runs, stored) -> Selection:
    reference = shown[0][1]
    dice = {m: _case_dice(res, str(runs[m][seed].get("run_key"))) for _, m in shown}
    by_case = {m: {(c.client, c.case_id): c for c in cases} for m, (cases, _) in stored.items()}
    ref_cases, classes = stored[reference]
    sel = Selection(dataset=dataset, seed=seed, roles=shown, rows=[], classes=classes)
    sel.volume = any(m.get("case_level") == "volume" for m in res.manifests
                     if m.get("dataset") == dataset)  # fmt: skip
    for site in res.sites(dataset):
        keys = [(c.client, c.case_id) for c in ref_cases if c.client == site]
        keys = [k for k in keys if all(k in by_case[m] for m in by_case)]
        scored = {
            k[1]: dice[reference][k] for k in keys if np.isfinite(dice[reference].get(k, np.nan))
        }
        if not scored:
            sel.skipped.append(site)
            continue
        case = median_case(scored)
        ref = by_case[reference][(site, case)]
        sel.rows.append(
            Row(
                site=site,
                case_id=case,
                slice_index=ref.slice_index,
                image=ref.image,
                label=ref.label,
                preds={m: by_case[m][(site, case)].pred for _, m in shown},
                dice={m: dice[m].get((site, case), float("nan")) for _, m in shown},
                candidates=len(scored),
            )
        )
    return sel
