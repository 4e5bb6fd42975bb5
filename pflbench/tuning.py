"""Fair tuning with Optuna: the search space, the objective, the studies and the queued runs.

Layout of a sweep in the storage (``S`` = suite name, ``D``/``M`` = dataset and method keys)::

    S/tune/D/M            one tuning study per (dataset, method): the same budget, sampler (TPE,
                          seeded), pruner (median on the per-round validation value) and objective
                          (client-macro validation Dice, maximized) for every method
    S/runs/D/M/default    the default configuration on every reporting seed (enqueued trials)
    S/runs/D/M/tuned      the best configuration on every reporting seed (enqueued trials; they are
                          only taken once the tuning study of (D, M) has used its budget)
    S/runs/D/M/fixed      untuned suites run through the queue: one enqueued trial per seed

Tuning runs are built in ``mode="tune"``, so the test split never exists while tuning, and are
written under ``<out>/tuning/`` so reports (which read ``<out>/results/``) never see them. The
budget counts complete, pruned and failed trials; a trial failed because its worker died is
replaced by its retry and does not count, and trials created past the budget by racing workers are
closed at once and marked ``over_budget``. The best configuration is chosen among the first
``trials`` budget trials.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import pandas as pd
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from pflbench.params import Param
from pflbench.registry import get_method
from pflbench.results import results_dir
from pflbench.runner import DataCache, RunSpec, execute
from pflbench.suite import DatasetSpec, MethodSpec, Protocol, SearchRange, Suite, Tuning

#: The objective of a diverged trial: worse than any real Dice, so it is never the best.
POOR = 0.0
TUNING_DIR = "tuning"

Label = Literal["fixed", "default", "tuned"]


class SweepError(ValueError):
    """A sweep that cannot go on as asked (changed suite on an old storage, nothing to run)."""


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """One searched dimension: shared (protocol) or a method's declared parameter."""

    name: str
    source: Literal["shared", "method"]
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices or ()))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def _shared_dim(name: str, rng: SearchRange) -> Dim:
    if rng.choices is not None:
        return Dim(name, "shared", "categorical", choices=tuple(rng.choices))
    kind = "float" if name == "lr" else "int"
    return Dim(name, "shared", kind, rng.low, rng.high, rng.log)


def _method_dim(name: str, p: Param) -> Dim:
    if p.choices is not None:
        return Dim(name, "method", "categorical", choices=tuple(p.choices))
    kind = "int" if p.kind is int else "float"
    return Dim(name, "method", kind, p.low, p.high, p.log)


def search_space(tuning: Tuning, method: MethodSpec) -> dict[str, Dim]:
    """The shared ranges plus the method's declared tunable parameters (those the suite does not
    fix in the method's ``params``), in a stable order."""
    space: dict[str, Dim] = {}
    for name, rng in tuning.search.items():
        if rng is not None:
            space[name] = _shared_dim(name, rng)
    if tuning.method_params:
        cls = get_method(method.name)
        for name, p in sorted(cls.params.items()):
            if not p.tunable or name in method.params:
                continue
            if name in space:
                raise SweepError(
                    f"method {method.key}: parameter {name!r} has the name of a shared search "
                    "dimension; rename the parameter"
                )
            space[name] = _method_dim(name, p)
    return space


def default_config(protocol: Protocol, method: MethodSpec, space: dict[str, Dim]) -> dict[str, Any]:
    """The value every searched dimension takes without tuning (protocol and method defaults)."""
    cls = get_method(method.name)
    shared = {
        "lr": protocol.optimizer.lr,
        "local_epochs": protocol.local_epochs,
        "local_steps": protocol.local_steps,
        "batch_size": protocol.batch_size,
    }
    return {
        name: shared[name] if d.source == "shared" else cls.params[name].default
        for name, d in space.items()
    }


def configure(
    protocol: Protocol,
    method: MethodSpec,
    config: dict[str, Any],
    space: dict[str, Dim],
    threads: int | None = None,
) -> tuple[Protocol, MethodSpec]:
    """The protocol and method of one configuration (and this worker's thread share, which is
    not part of the run key)."""
    pdata = protocol.model_dump()
    for name, value in config.items():
        dim = space.get(name)
        if dim is None or dim.source != "shared":
            continue
        if name == "lr":
            pdata["optimizer"]["lr"] = float(value)
        else:
            pdata[name] = int(value)
    if threads is not None:
        pdata["threads"] = threads if protocol.threads is None else min(protocol.threads, threads)
    params = dict(method.params)
    for name, value in config.items():
        dim = space.get(name)
        if dim is not None and dim.source == "method":
            params[name] = value
    return Protocol.model_validate(pdata), method.model_copy(update={"params": params})


def make_sampler(tuning: Tuning, worker_seed: int = 0) -> optuna.samplers.BaseSampler:
    """The suite's sampler. Every worker but the first offsets the seed, so parallel workers do
    not propose the same random start-up configurations; ``constant_liar`` keeps TPE from
    proposing what a peer is running."""
    seed = tuning.sampler.seed + worker_seed
    if tuning.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=tuning.sampler.startup_trials, constant_liar=True
    )


def make_pruner(tuning: Tuning) -> optuna.pruners.BasePruner:
    p = tuning.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.startup_trials,
        n_warmup_steps=p.warmup_steps,
        interval_steps=p.interval_steps,
    )


# ---------------------------------------------------------------------------------------------
# Scores read back from a finished run
# ---------------------------------------------------------------------------------------------


def _val_dice(run_dir: Path) -> pd.DataFrame:
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    return rounds[
        (rounds["split"] == "val") & (rounds["structure"] == "mean") & (rounds["metric"] == "dice")
    ]


def run_score(out: str | Path, run_key: str) -> tuple[float, dict[str, Any]]:
    """Client-macro validation Dice of a finished run at each client's selected round (the value
    the engine selects models by); ``POOR`` for a diverged run. Returns (score, manifest)."""
    d = results_dir(out) / run_key
    manifest = json.loads((d / "manifest.json").read_text())
    if manifest.get("status") == "diverged":
        return POOR, manifest
    val = _val_dice(d)
    selected = manifest.get("selected_rounds") or {}
    last = manifest.get("rounds_done")
    scores = []
    for client in manifest.get("sites", sorted(val["client"].unique())):
        r = selected.get(client, last)
        v = val[(val["client"] == client) & (val["round"] == r)]["value"]
        scores.append(float(v.iloc[0]) if len(v) else float("nan"))
    score = float(np.nanmean(scores)) if scores and not all(map(math.isnan, scores)) else POOR
    return score, manifest


def round_scores(out: str | Path, run_key: str) -> list[tuple[int, float]]:
    """Client-macro validation Dice per evaluated round (what ``on_eval`` reported)."""
    val = _val_dice(results_dir(out) / run_key)
    per_round = val.groupby("round")["value"].mean()
    return [(int(r), float(v)) for r, v in per_round.items()]


# ---------------------------------------------------------------------------------------------
# Study layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRef:
    """One study of a sweep."""

    name: str
    kind: Literal["tune", "runs"]
    dataset: DatasetSpec
    method: MethodSpec
    label: Label | None = None

    def cells(self, suite: Suite) -> list[dict[str, Any]]:
        """The enqueued trials of a runs study (its user attributes), one per reporting seed
        (and per held-out set of ``evaluation.unseen``, named in the cell only when set)."""
        if self.kind != "runs":
            return []
        return [
            {
                "cell": f"{self.dataset.key}/{self.method.key}/{self.label}/s{seed}"
                + (f"/out_{'+'.join(held)}" if held else ""),
                "dataset": self.dataset.key,
                "method": self.method.key,
                "label": self.label,
                "seed": seed,
                **({"held_out": list(held)} if held else {}),
            }
            for seed in suite.seeds
            for held in held_out_sets(suite, self.dataset)
        ]

    def total(self, suite: Suite) -> int:
        if self.kind == "tune":
            assert suite.tuning is not None
            return suite.tuning.trials
        return len(suite.seeds) * len(held_out_sets(suite, self.dataset))

    def fingerprint(self, suite: Suite) -> str:
        """Hash of what the study's trials mean; a changed suite must not reuse old trials."""
        blob: dict[str, Any] = {
            "kind": self.kind,
            "label": self.label,
            "dataset": self.dataset.model_dump(mode="json"),
            "method": self.method.model_dump(mode="json"),
            "protocol": suite.protocol_for(self.dataset).key_dict(),
            "model": suite.model.model_dump(mode="json"),
        }
        if self.kind == "tune" or self.label == "tuned":
            assert suite.tuning is not None
            blob["tuning"] = suite.tuning.model_dump(mode="json")
        if self.kind == "runs":
            blob["seeds"] = suite.seeds
            if suite.evaluation.unseen is not None:  # absent otherwise: old studies stay valid
                blob["evaluation"] = suite.evaluation.model_dump(mode="json")
        text = json.dumps(blob, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep_studies(suite: Suite) -> list[StudyRef]:
    """Every study of a sweep: tuning first, then the runs, in suite order."""
    refs: list[StudyRef] = []
    labels: tuple[Label, ...] = ("tuned", "default") if suite.tuning else ("fixed",)
    for d in suite.datasets:
        for m in suite.methods:
            if suite.tuning is not None:
                refs.append(StudyRef(f"{suite.name}/tune/{d.key}/{m.key}", "tune", d, m))
            for label in labels:
                refs.append(
                    StudyRef(f"{suite.name}/runs/{d.key}/{m.key}/{label}", "runs", d, m, label)
                )
    return refs


def tune_ref(suite: Suite, ref: StudyRef) -> StudyRef:
    return StudyRef(
        f"{suite.name}/tune/{ref.dataset.key}/{ref.method.key}", "tune", ref.dataset, ref.method
    )


def _alive_cells(trials: list[FrozenTrial]) -> set[str]:
    alive = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    return {t.user_attrs["cell"] for t in trials if t.state in alive and "cell" in t.user_attrs}


def ensure_sweep(
    storage: BaseStorage,
    suite: Suite,
    *,
    heal: bool = False,
    ready_wait_s: float = 30.0,
    log: Callable[[str], None] | None = None,
) -> list[StudyRef]:
    """Create the sweep's studies and enqueue the run cells, once, whoever comes first.

    Study creation is atomic in every storage, so among racing processes exactly one creates a
    study and enqueues its cells; the others wait until it says ``ready``. ``heal`` (the
    ``pflbench run`` coordinator) re-enqueues cells that have no live trial left, e.g. runs whose
    retries were used up by crashes, so running the suite again resumes it.
    """
    refs = sweep_studies(suite)
    pending: list[tuple[StudyRef, optuna.Study]] = []
    for ref in refs:
        fp = ref.fingerprint(suite)
        try:
            study = optuna.create_study(
                study_name=ref.name, storage=storage, direction="maximize", load_if_exists=False
            )
        except DuplicatedStudyError:
            study = optuna.load_study(study_name=ref.name, storage=storage)
            old = study.user_attrs.get("fingerprint")
            if old is not None and old != fp:
                raise SweepError(
                    f"study {ref.name!r} in this storage was made from a different suite "
                    "configuration (dataset, method, protocol, model, seeds or tuning changed); "
                    "use a new --out folder or --storage for the changed suite"
                ) from None
            if ref.kind == "runs":
                pending.append((ref, study))
            continue
        study.set_user_attr("fingerprint", fp)
        study.set_user_attr("kind", ref.kind)
        study.set_user_attr("dataset", ref.dataset.key)
        study.set_user_attr("method", ref.method.key)
        study.set_user_attr("label", ref.label)
        study.set_user_attr("total", ref.total(suite))
        for cell in ref.cells(suite):
            study.enqueue_trial({}, user_attrs=cell)
        study.set_user_attr("ready", True)
    deadline = time.monotonic() + ready_wait_s
    for ref, study in pending:
        # healing too waits for the creator: cells it has not enqueued yet are not missing
        while not study.user_attrs.get("ready") and time.monotonic() < deadline:
            time.sleep(0.5)
        if heal or not study.user_attrs.get("ready"):
            alive = _alive_cells(study.get_trials(deepcopy=False))
            missing = [c for c in ref.cells(suite) if c["cell"] not in alive]
            for cell in missing:
                study.enqueue_trial({}, user_attrs=cell)
            if missing:
                # two healers racing may both have enqueued a cell: close the extra copies
                dropped = drop_duplicates(study)
                if log is not None:
                    log(
                        f"{ref.name}: re-enqueued {len(missing) - dropped} run(s) with no live "
                        "trial"
                    )
            study.set_user_attr("ready", True)
    return refs


def drop_duplicates(study: optuna.Study) -> int:
    """Close (as ``duplicate``) every waiting trial of a cell that has a live trial with a lower
    number. Every process applies the same rule and claiming a trial is
    atomic, so racing callers agree; returns how many this call closed."""
    storage = study._storage
    by_cell: dict[str, list[FrozenTrial]] = {}
    alive = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    for t in study.get_trials(deepcopy=False):
        if t.state in alive and "cell" in t.user_attrs and not t.user_attrs.get("duplicate"):
            by_cell.setdefault(t.user_attrs["cell"], []).append(t)
    n = 0
    for trials in by_cell.values():
        # the lowest number, whatever its state: a racing caller's trial in the middle of being
        # closed is never the lowest, so every caller keeps the same one
        keep = min(trials, key=lambda t: t.number)
        for t in trials:
            if t is keep or t.state != TrialState.WAITING:
                continue
            try:
                mine = storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
            except UpdateFinishedTrialError:  # a racing caller closed it first
                continue
            if mine:
                storage.set_trial_user_attr(t._trial_id, "duplicate", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Budget accounting
# ---------------------------------------------------------------------------------------------


def infra_failed(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials replaced by a retry (their worker died): not part of the budget."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that use the budget, in trial-number order: everything except replaced trials and
    trials closed as ``over_budget`` or ``duplicate``."""
    gone = infra_failed(trials)
    return sorted(
        (
            t
            for t in trials
            if t.number not in gone
            and not t.user_attrs.get("over_budget")
            and not t.user_attrs.get("duplicate")
        ),
        key=lambda t: t.number,
    )


def tuning_finished(trials: list[FrozenTrial], budget: int) -> bool:
    """All of the first ``budget`` budget trials are finished (complete, pruned or failed)."""
    b = budget_trials(trials)[:budget]
    return len(b) == budget and all(t.state.is_finished() for t in b)


def best_trial(trials: list[FrozenTrial], budget: int) -> FrozenTrial | None:
    """The best complete, non-diverged trial among the first ``budget`` budget trials."""
    done = [
        t
        for t in budget_trials(trials)[:budget]
        if t.state == TrialState.COMPLETE
        and not t.user_attrs.get("diverged")
        and t.value is not None
    ]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, -t.number))


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def _report(trial: optuna.Trial, step: int, score: float, where: str) -> None:
    if not math.isfinite(score):
        return
    trial.report(score, step)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at {where} (validation Dice {score:.4f})")


def tuning_objective(
    trial: optuna.Trial,
    suite: Suite,
    dataset: DatasetSpec,
    method: MethodSpec,
    out: str | Path,
    cache: DataCache | None = None,
    *,
    threads: int | None = None,
    extra: dict[str, Any] | None = None,
) -> float:
    """Mean over the tuning seeds of the client-macro validation Dice (maximized).

    Runs are built in tuning mode (no test split), each evaluation is reported at step
    ``seed_index × rounds + round`` for the pruner, and a diverged run ends the trial with
    ``POOR`` and the ``diverged`` attribute instead of an error. A run already DONE (same
    configuration seen before, or a retried trial) is read back and its rounds re-reported.
    """
    tuning = suite.tuning
    if tuning is None:
        raise SweepError(f"suite {suite.name!r} has no tuning section")
    cache = cache or DataCache()
    space = search_space(tuning, method)
    config = {name: dim.suggest(trial) for name, dim in space.items()}
    protocol, mspec = configure(suite.protocol_for(dataset), method, config, space, threads)
    tune_out = Path(out) / TUNING_DIR
    rounds = protocol.rounds
    scores: list[float] = []
    keys: list[str] = []
    for i, seed in enumerate(tuning.seeds):
        spec = RunSpec(
            dataset=dataset,
            method=mspec,
            seed=seed,
            protocol=protocol,
            model=suite.model,
            mode="tune",
            extra={"trial": trial.number, **(extra or {})},
        )
        base = i * rounds

        def on_eval(r: int, score: float, base: int = base, seed: int = seed) -> None:
            _report(trial, base + r, score, f"round {r}, tuning seed {seed}")

        key, manifest = execute(spec, tune_out, cache, on_eval=on_eval)
        keys.append(key)
        trial.set_user_attr("run_keys", keys)
        if manifest is None:
            for r, score in round_scores(tune_out, key):
                _report(trial, base + r, score, f"round {r}, tuning seed {seed} (from disk)")
        score, manifest = run_score(tune_out, key)
        if manifest.get("status") == "diverged":
            trial.set_user_attr("diverged", True)
            trial.set_user_attr("error", str(manifest.get("error", ""))[:500])
            return POOR
        scores.append(score)
    trial.set_user_attr("diverged", False)
    return float(np.mean(scores))


def final_config(
    suite: Suite, ref: StudyRef, tune_trials: list[FrozenTrial] | None
) -> tuple[dict[str, Any], int | None]:
    """The configuration a runs study uses: ``{}`` (the suite's own) for fixed and default, the
    best tuning trial's parameters for tuned. Returns (config, best trial number)."""
    if ref.label != "tuned":
        return {}, None
    assert suite.tuning is not None and tune_trials is not None
    best = best_trial(tune_trials, suite.tuning.trials)
    if best is None:
        raise SweepError(
            f"{ref.dataset.key} · {ref.method.key}: no tuning trial completed without diverging "
            "(all pruned, failed or diverged), so there is no tuned configuration"
        )
    return dict(best.params), best.number


# Only the names: a cached FederatedData would keep every site's images alive for the life of
# the process, beside the runner's own copy, and within reach of any client hook.
_SITE_NAMES: dict[str, list[str]] = {}


def held_out_sets(suite: Suite, dataset: DatasetSpec) -> list[tuple[str, ...]]:
    """The held-out sets of a dataset's runs (``[()]``: the whole federation, no unseen sites);
    the dataset is loaded once per process for its site names only when the suite asks."""
    if suite.evaluation.unseen is None:
        return [()]
    key = DataCache.key(dataset)
    if key not in _SITE_NAMES:
        _SITE_NAMES[key] = list(DataCache.load(dataset).site_names)
    return suite.evaluation.held_out_sets(_SITE_NAMES[key], dataset.key)


def final_spec(
    suite: Suite,
    ref: StudyRef,
    seed: int,
    config: dict[str, Any],
    threads: int | None = None,
    held_out: tuple[str, ...] = (),
) -> RunSpec:
    """The reporting run of one cell of a runs study."""
    space = search_space(suite.tuning, ref.method) if suite.tuning is not None else {}
    protocol, mspec = configure(suite.protocol_for(ref.dataset), ref.method, config, space, threads)
    assert ref.label is not None
    # not part of the run key: what the report's configurations table cites
    extra = (
        {
            "search_space": {n: asdict(d) for n, d in space.items()},
            "tuning_budget": suite.tuning.trials,
        }
        if suite.tuning is not None
        else {}
    )
    return RunSpec(
        dataset=ref.dataset,
        method=mspec,
        seed=seed,
        protocol=protocol,
        model=suite.model,
        label=ref.label,
        mode="final",
        extra=extra,
        held_out=held_out,
        evaluation=suite.evaluation if held_out else None,
    )


# ---------------------------------------------------------------------------------------------
# Reading a sweep back
# ---------------------------------------------------------------------------------------------


def study_rows(storage: BaseStorage, suite: Suite) -> list[dict[str, Any]]:
    """The rows of :func:`study_table`, read with plain storage calls (cheap enough to poll)."""
    rows = []
    for ref in sweep_studies(suite):
        try:
            study_id = storage.get_study_id_from_name(ref.name)
        except KeyError:
            continue
        trials = storage.get_all_trials(study_id, deepcopy=False)
        total = ref.total(suite)
        b = budget_trials(trials)
        if ref.kind == "tune":
            b = b[:total]
        else:  # a run re-enqueued after a failure: its latest trial speaks for it
            b = sorted(
                {t.user_attrs.get("cell", t.number): t for t in b}.values(), key=lambda t: t.number
            )
        states = [t.state for t in b]
        rows.append(
            {
                "study": ref.name,
                "kind": ref.kind,
                "dataset": ref.dataset.key,
                "method": ref.method.key,
                "label": ref.label or "",
                "total": total,
                "trials": len(b),
                "done": sum(st.is_finished() for st in states),
                "complete": states.count(TrialState.COMPLETE),
                "pruned": states.count(TrialState.PRUNED),
                "failed": states.count(TrialState.FAIL),
                "running": states.count(TrialState.RUNNING),
                "waiting": states.count(TrialState.WAITING),
                "diverged": sum(bool(t.user_attrs.get("diverged")) for t in b),
                "retried": len(infra_failed(trials)),
                "over_budget": sum(bool(t.user_attrs.get("over_budget")) for t in trials),
            }
        )
    return rows


def study_table(storage: BaseStorage, suite: Suite) -> pd.DataFrame:
    """One row per study, read from the storage: budget, states, diverged, retried, extra.

    ``trials`` counts the budget trials (the first ``total`` for tuning studies, the latest trial
    of each cell for runs studies), ``done`` those finished; ``retried`` counts trials replaced
    after their worker died and ``over_budget`` trials closed because racing workers overshot the
    budget (neither is in ``trials``).
    """
    return pd.DataFrame(study_rows(storage, suite))
