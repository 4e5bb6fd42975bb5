"""From the tidy results to the numbers a report shows (evaluation reference §1).

Only :func:`pflbench.results.load_results` / :func:`~pflbench.results.load_manifests` are read.
Unit of analysis: case → client score per seed (mean over the client's test cases, each case the
mean over structures for the headline) → block score (mean over seeds), with blocks = (dataset,
client). Cases are never pooled across clients or seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pflbench import configs
from pflbench.results import diverged_runs, load_manifests, load_results

METRICS = {
    # name: (higher is better, decimals shown, label)
    "dice": (True, 3, "Dice"),
    "iou": (True, 3, "IoU"),
    "hd95": (False, 2, "HD95"),
    "assd": (False, 2, "ASSD"),
}
SURFACE = ("hd95", "assd")  # surface distances: an empty prediction takes the failure value
LABEL_PRIORITY = ("tuned", "fixed", "default")  # the headline label of a (dataset, method)
RUN = ["dataset", "method", "label", "seed"]


class ReportError(ValueError):
    """The results folder cannot give a report (no finished runs, unknown metric, ...)."""


def metric_info(metric: str) -> tuple[bool, int, str]:
    try:
        return METRICS[metric]
    except KeyError:
        raise ReportError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}") from None


@dataclass
class Results:
    """The tidy tables of every finished run under a folder, and the derived scores."""

    cases: pd.DataFrame
    rounds: pd.DataFrame
    comm: pd.DataFrame
    manifests: list[dict[str, Any]]
    metric: str = "dice"
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- derived, set by load()
    client_scores: pd.DataFrame = field(default_factory=pd.DataFrame)  # all labels
    structure_scores: pd.DataFrame = field(default_factory=pd.DataFrame)  # all labels
    headline_label: dict[tuple[str, str], str] = field(default_factory=dict)
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)  # all labels

    @property
    def surface(self) -> bool:
        """The metric is a surface distance (its tables count the failure values)."""
        return self.metric in SURFACE

    @property
    def higher_is_better(self) -> bool:
        return metric_info(self.metric)[0]

    @property
    def decimals(self) -> int:
        return metric_info(self.metric)[1]

    @property
    def metric_label(self) -> str:
        return metric_info(self.metric)[2]

    @property
    def datasets(self) -> list[str]:
        return sorted(self.headline()["dataset"].unique())

    def methods(self, reference: str | None = None) -> list[str]:
        """Headline methods: the reference first, then alphabetical."""
        ms = sorted(self.headline()["method"].unique())
        if reference in ms:
            ms.remove(reference)
            ms.insert(0, reference)
        return ms

    def sites(self, dataset: str) -> list[str]:
        """Sites of a dataset in manifest order (then any others seen in the results)."""
        order: list[str] = []
        for m in self.manifests:
            if m.get("dataset") == dataset:
                for s in m.get("sites") or []:
                    if s not in order:
                        order.append(str(s))
        seen = self.client_scores.loc[self.client_scores["dataset"] == dataset, "client"]
        order += sorted(set(seen.astype(str)) - set(order))
        return [s for s in order if s in set(seen.astype(str))]

    def seeds(self, dataset: str | None = None) -> list[int]:
        h = self.headline()
        if dataset is not None:
            h = h[h["dataset"] == dataset]
        return sorted(h["seed"].unique().tolist())

    def headline(self, scores: pd.DataFrame | None = None) -> pd.DataFrame:
        """Rows of the headline label of each (dataset, method) (tuned > fixed > default)."""
        s = self.client_scores if scores is None else scores
        if s.empty:
            return s
        want = pd.Series(self.headline_label, dtype=object)
        want = want.reindex(pd.MultiIndex.from_frame(s[["dataset", "method"]])).to_numpy()
        return s[s["label"].to_numpy(dtype=object) == want]


def _no_runs(run_dir: str | Path) -> str:
    """Why there is nothing to report; names the diverged runs when they are all there is."""
    from pflbench.summary import diverged_line

    where = Path(run_dir) / "results"
    div = diverged_runs(run_dir)
    if div.empty:
        return f"no finished runs with results under {where}"
    listed = "; ".join(diverged_line(r)[2:] for r in div.head(3).to_dict("records"))
    more = f" and {len(div) - 3} more" if len(div) > 3 else ""
    return f"no usable runs under {where}: every finished run diverged ({listed}{more})"


def load(
    run_dir: str | Path,
    metric: str = "dice",
    select: dict[str, str] | None = None,
    split_configs: bool = False,
) -> Results:
    """Read the tidy tables of the finished runs under ``run_dir`` and compute client scores.

    Runs are grouped by their configuration (:mod:`pflbench.configs`): a (dataset, method,
    label) with several configurations is refused unless ``select`` keeps one or
    ``split_configs`` shows each as its own method row.
    """
    metric_info(metric)
    cases = load_results(run_dir, "cases")
    if cases.empty or "selection" not in cases.columns:
        raise ReportError(_no_runs(run_dir))
    res = Results(
        cases=cases,
        rounds=load_results(run_dir, "rounds"),
        comm=load_results(run_dir, "comm"),
        manifests=load_manifests(run_dir),
        metric=metric,
    )
    _apply_configs(res, run_dir, select or {}, split_configs)
    if metric not in res.cases.columns:
        raise ReportError(f"the cases table has no {metric!r} column")
    res.client_scores, res.structure_scores = client_scores(res.cases, metric, res.notes)
    res.failures = failure_counts(res.cases)
    if res.client_scores.empty:
        raise ReportError("no test cases of the selected (best) checkpoint in the results")
    _check_every_method_scored(res)
    labels = res.client_scores.groupby(["dataset", "method"])["label"].agg(set)
    for key, labs in labels.items():
        pick = next((lab for lab in LABEL_PRIORITY if lab in labs), sorted(map(str, labs))[0])
        res.headline_label[key] = pick
    return res


def _apply_configs(res: Results, run_dir: str | Path, select: dict[str, str], split: bool) -> None:
    """Keep the selected runs, then refuse (or split into rows) mixed configurations."""
    try:
        kept = configs.select_runs(res.manifests, select)
        if not kept:
            raise ReportError(f"--select {select} matches no finished run under {run_dir}")
        rename = configs.split_labels(kept) if split else {}
        if not split:
            configs.check_configs(kept, str(Path(run_dir) / "results"))
    except configs.ConfigError as exc:
        raise ReportError(str(exc)) from None
    keys = {str(m.get("run_key")) for m in kept}
    if len(kept) < len(res.manifests):
        res.notes.append(
            f"--select {' '.join(f'{k}={v}' for k, v in select.items())}: "
            f"{len(kept)} of {len(res.manifests)} finished runs are reported."
        )
    res.manifests = [
        {**m, "method": rename.get(str(m.get("run_key")), m.get("method"))} for m in kept
    ]
    for name in ("cases", "rounds", "comm"):
        df = getattr(res, name)
        if df.empty or "run_key" not in df.columns:
            continue
        df = df[df["run_key"].astype(str).isin(keys)].copy()
        if rename:
            new = df["run_key"].astype(str).map(rename)
            df["method"] = new.fillna(df["method"])
        setattr(res, name, df)


def _check_every_method_scored(res: Results) -> None:
    """A method whose runs give no number for the metric is an error, never a silent drop
    (unless every one of its runs diverged before a test evaluation: then a note says so)."""
    have = set(map(tuple, res.client_scores[["dataset", "method"]].drop_duplicates().to_numpy()))
    runs: dict[tuple[str, str], list[dict]] = {}
    for m in res.manifests:
        runs.setdefault((str(m.get("dataset")), str(m.get("method"))), []).append(m)
    missing = sorted(set(runs) - have)
    diverged = [k for k in missing if all(m.get("status") == "diverged" for m in runs[k])]
    for k in diverged:
        res.notes.append(f"{'/'.join(k)}: every run diverged before a test evaluation; not shown.")
    missing = [k for k in missing if k not in diverged]
    if missing:
        raise ReportError(
            f"no finite {res.metric} for {', '.join('/'.join(x) for x in missing)} "
            "(were surface metrics computed? protocol.surface_metrics: false skips HD95/ASSD)"
        )


def client_scores(
    cases: pd.DataFrame,
    metric: str,
    notes: list[str] | None = None,
    rows: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Client score per (dataset, method, label, seed, client): headline and per structure.

    Headline: mean over the client's test cases of the per-case mean over structures.
    Per structure: mean over the client's test cases of that structure. A surface distance is
    never dropped: an empty prediction has the declared failure value
    (:func:`pflbench.metrics.failure_distance`), and a NaN HD95/ASSD (not computed, or results
    from before the failure value existed) is an error rather than a silently shorter mean.
    ``rows`` replaces the selected checkpoint's test cases (the unseen-site rows use it).
    """
    c = _test_cases(cases) if rows is None else _real_structures(rows.copy())
    v = pd.to_numeric(c[metric], errors="coerce").astype(float)
    bad = int((~np.isfinite(v)).sum())
    if bad and metric in SURFACE:
        if bad == len(v):
            raise ReportError(
                f"{metric} was not computed for these runs (protocol.surface_metrics: false); "
                "report dice or iou, or rerun with surface metrics on"
            )
        runs = sorted(c.loc[~np.isfinite(v), "run_key"].astype(str).unique())
        raise ReportError(
            f"{bad} of {len(v)} case × structure values of {metric} are NaN in {len(runs)} "
            f"run(s) (e.g. {runs[0]}): results from before empty predictions got the declared "
            "failure value; rerun them (pflbench run --force) to report surface distances"
        )
    if bad and notes is not None:
        notes.append(
            f"{bad} of {len(v)} case × structure values of {metric} are not finite and are "
            "left out of the means."
        )
    c["value"] = v.where(np.isfinite(v))
    c["client"] = c["client"].astype(str)
    keys = RUN + ["client"]
    per_case = c.groupby(keys + ["case_id"], dropna=False)["value"].mean()
    headline = per_case.groupby(level=keys, dropna=False).mean().rename("value").reset_index()
    per_struct = (
        c.groupby(keys + ["structure"], dropna=False)["value"].mean().rename("value").reset_index()
    )
    return headline.dropna(subset=["value"]), per_struct.dropna(subset=["value"])


def _test_cases(cases: pd.DataFrame) -> pd.DataFrame:
    """Test cases of the selected checkpoint, one row per real structure."""
    return _real_structures(
        cases[(cases["selection"] == "best") & (cases["split"] == "test")].copy()
    )


def _real_structures(c: pd.DataFrame) -> pd.DataFrame:
    structs = set(c["structure"].unique())
    if "mean" in structs and len(structs) > 1:  # never average a precomputed mean twice
        c = c[c["structure"] != "mean"]
    return c


def failure_counts(cases: pd.DataFrame) -> pd.DataFrame:
    """Per run and client: case × structure values that took the surface failure value
    (``failures``) out of all of them (``values``), from the ``surface_failure`` column."""
    c = _test_cases(cases)
    flag = (
        c["surface_failure"].fillna(False).astype(bool)
        if "surface_failure" in c.columns
        else pd.Series(False, index=c.index)
    )
    c = c.assign(failures=flag.astype(int), values=1, client=c["client"].astype(str))
    return c.groupby(RUN + ["client"], dropna=False)[["failures", "values"]].sum().reset_index()


# ------------------------------------------------------------------------------- aggregations


def seed_summary(values: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN with one seed) and number of seeds of ``value`` over seeds."""
    g = values.groupby(by, dropna=False)["value"]
    out = g.agg(mean="mean", std="std", n_seeds="count").reset_index()
    return out


def client_aggregates(scores: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """Per (dataset, method, label, seed): client-macro mean, worst client and SD across clients."""
    g = scores.groupby(RUN, dropna=False)["value"]
    worst = g.max() if not higher_is_better else g.min()
    out = pd.DataFrame(
        {"macro": g.mean(), "worst": worst, "client_sd": g.std(ddof=1), "n_clients": g.count()}
    )
    return out.reset_index()


def block_matrix(
    scores: pd.DataFrame, methods: list[str] | None = None, notes: list[str] | None = None
) -> pd.DataFrame:
    """Blocks (dataset, client) × methods matrix of the mean over seeds; incomplete blocks dropped."""
    m = scores.groupby(["dataset", "client", "method"])["value"].mean().unstack("method")
    if methods is not None:
        m = m.reindex(columns=[x for x in methods if x in m.columns])
    incomplete = m.isna().any(axis=1)
    if incomplete.any() and notes is not None:
        notes.append(
            f"{int(incomplete.sum())} block(s) without a result for every method were left out of "
            f"the tests: {', '.join('/'.join(map(str, i)) for i in m.index[incomplete])}."
        )
    m = m[~incomplete]
    m.columns.name = None
    return m


#: The columns of the unseen-site comparison: in-federation, then each regime.
IN_FEDERATION = "in_federation"
REGIMES = ("zero_shot", "few_shot")


def unseen_blocks(res: Results) -> pd.DataFrame:
    """Blocks (dataset, held-out site) × (method, column) of the unseen-site design, mean over
    seeds: the site's test score while in the federation (:attr:`Results.client_scores`, the
    selected checkpoint, averaged over the federations that contained it) and as a newcomer in
    each regime (split ``unseen``, scored as client scores are). Empty without unseen rows."""
    c = res.cases
    if "regime" not in c.columns or not (c["split"] == "unseen").any():
        return pd.DataFrame()
    frames = [res.headline().assign(column=IN_FEDERATION)]
    unseen = c[c["split"] == "unseen"]
    for regime in REGIMES:
        rows = unseen[unseen["regime"] == regime]
        if rows.empty:
            continue
        scores, _ = client_scores(c, res.metric, rows=rows)
        frames.append(res.headline(scores).assign(column=regime))
    long = pd.concat(frames, ignore_index=True)
    held = set(zip(unseen["dataset"], unseen["client"].astype(str), strict=True))
    long = long[[(d, str(s)) in held for d, s in zip(long["dataset"], long["client"], strict=True)]]
    out = (
        long.groupby(["dataset", "client", "method", "column"])["value"]
        .mean()
        .unstack(["method", "column"])
    )
    return out.sort_index(axis=1)


def convergence(res: Results) -> tuple[pd.DataFrame, str]:
    """Validation curve per (dataset, method, seed, round): client-macro of the chosen metric.

    Uses Dice (or IoU when that is the report metric) with structure "mean" from the rounds table.
    """
    metric = "iou" if res.metric == "iou" else "dice"
    r = res.rounds
    if r.empty or "split" not in r.columns:
        return pd.DataFrame(columns=RUN + ["round", "value"]), metric
    r = r[(r["split"] == "val") & (r["metric"] == metric) & (r["structure"] == "mean")]
    r = res.headline(r)
    out = (
        r.groupby(RUN + ["round"], dropna=False)["value"].mean().reset_index()
        if not r.empty
        else pd.DataFrame(columns=RUN + ["round", "value"])
    )
    return out, metric


def communication(res: Results) -> pd.DataFrame:
    """Total bytes (up + down, all rounds and clients) per run from the comm table."""
    c = res.comm
    if c.empty or "bytes_up" not in c.columns:
        return pd.DataFrame(columns=RUN + ["bytes"])
    c = res.headline(c)
    tot = c.groupby(RUN, dropna=False)[["bytes_up", "bytes_down"]].sum()
    return (tot["bytes_up"] + tot["bytes_down"]).rename("bytes").reset_index()


# ------------------------------------------------------------------------------- manifests


def _fmt(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def processor_name(processor: dict[str, Any] | None) -> str:
    """E.g. "AMD EPYC (AVX512)"; "–" for runs written before manifests recorded it."""
    if not processor:
        return "–"
    return f"{processor.get('model') or 'unknown CPU'} ({processor.get('torch_capability') or '?'})"


def manifest_frame(res: Results) -> pd.DataFrame:
    """One row per run with the manifest fields the appendix shows (flattened to text)."""
    rows = []
    for m in res.manifests:
        git = m.get("git") or {}
        timings = m.get("timings") or {}
        rows.append(
            {
                "run_key": m.get("run_key"),
                "dataset": m.get("dataset"),
                "method": m.get("method"),
                "label": m.get("label"),
                "seed": m.get("seed"),
                "params": _fmt(m.get("params", {})),
                # what the runs computed; where they ran (device, threads) has its own columns
                "protocol": _fmt(
                    {
                        k: v
                        for k, v in (m.get("protocol") or {}).items()
                        if k not in configs.LOCAL_PROTOCOL
                    }
                ),
                "model": _fmt(m.get("model", {})),
                "budget": _fmt(m.get("budget", {})),
                "data_fingerprint": m.get("data_fingerprint"),
                "device": m.get("device"),
                "threads": m.get("threads"),
                "git": f"{git.get('sha', '?')}{' (dirty)' if git.get('dirty') else ''}",
                "total_s": timings.get("total_s"),
                "peak_memory_mb": m.get("peak_memory_mb"),
                "bytes_up": m.get("bytes_up"),
                "bytes_down": m.get("bytes_down"),
                "versions": _fmt(m.get("versions", {})),
                "processor": processor_name(m.get("processor")),
            }
        )
    return pd.DataFrame(rows)
