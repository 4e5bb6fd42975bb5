"""The suite file: what to run, validated before anything runs.

Errors name the file, the key (as a dotted path) and what was expected, one line each.
Environment variables (``$VAR`` / ``${VAR}``) are expanded in every string of ``out`` and of the
dataset options; an unset variable is an error that names it.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pflbench.configs import LOCAL_PROTOCOL
from pflbench.params import ParamError
from pflbench.registry import RegistryError, registry

#: Most worker processes one ``pflbench run`` starts (each imports torch and holds a model);
#: more machines join with ``pflbench worker`` instead.
MAX_WORKERS = 256


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: A label names folders, files and study names: letters, digits and ``_ . + = @ -``, starting
#: with a letter or digit (a leading dot would hide the results), at most :data:`LABEL_MAX` long.
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=@-]*")
LABEL_MAX = 64


def _check_label(value: str | None) -> str | None:
    if value is None:
        return value
    if len(value) > LABEL_MAX:
        raise PydanticCustomError(
            "label",
            "label is {n} characters long; at most {max} are allowed",
            {"n": len(value), "max": LABEL_MAX},
        )
    if not LABEL_RE.fullmatch(value):
        raise PydanticCustomError(
            "label",
            "label '{v}' must start with a letter or digit and hold only letters, digits and "
            "_ . + = @ - (it names result folders and study names)",
            {"v": value},
        )
    return value


def _name_or_mapping(value: Any) -> Any:
    """A bare name is short for ``{name: NAME}`` (datasets, methods, models)."""
    if isinstance(value, str):
        return {"name": value}
    return value


class DatasetSpec(_Strict):
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    split_seed: int = 0
    #: Protocol keys for this dataset only, merged over the suite's ``protocol`` (mappings such
    #: as ``optimizer`` key by key), e.g. the benchmark's learning rate per dataset.
    protocol: dict[str, Any] = Field(default_factory=dict)

    _short = model_validator(mode="before")(_name_or_mapping)
    _label = field_validator("label")(_check_label)

    @property
    def key(self) -> str:
        return self.label or self.name


class MethodSpec(_Strict):
    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    _short = model_validator(mode="before")(_name_or_mapping)
    _label = field_validator("label")(_check_label)

    @property
    def key(self) -> str:
        return self.label or self.name


class ModelSpec(_Strict):
    name: str = "unet"
    options: dict[str, Any] = Field(default_factory=dict)

    _short = model_validator(mode="before")(_name_or_mapping)


class OptimizerSpec(_Strict):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class StepSchedule(_Strict):
    """Multiply the learning rate by ``gamma`` at the start of rounds ``every``, 2·``every``, …

    The rate of (1-based) round r is lr·gamma^⌊r / every⌋: FL-MedSegBench's ``lr_scheduler``
    halves the rate before 0-based round i whenever (i + 1) is a multiple of its step size, i.e.
    one round earlier than a PyTorch ``StepLR`` stepped after each round would. ``every`` below
    1 is a fraction of T, rounded down (0.25 is the benchmark's ``T // 4``).
    """

    name: Literal["step"] = "step"
    every: float = Field(gt=0, description="rounds between decays, or a fraction of T when < 1")
    gamma: float = Field(0.5, gt=0, le=1)

    @field_validator("every")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"every must be a whole number of rounds or a fraction < 1, got {v}")
        return v

    def every_rounds(self, rounds: int) -> int:
        return max(1, int(self.every * rounds)) if self.every < 1 else int(self.every)

    def factor(self, round: int, rounds: int) -> float:
        """The multiplier of the base rate in (1-based) round ``round`` of ``rounds``."""
        return self.gamma ** (round // self.every_rounds(rounds))


Augmentation = Literal["flips", "rot90"]


class Protocol(_Strict):
    """The federation protocol, identical for every method of a suite.

    The keys of :data:`KEYED_WHEN_SET` enter a run's key only when they differ from their
    default, so that adding them left every earlier run key (and every default number) as it was.
    """

    rounds: int = Field(gt=0, description="communication rounds T")
    local_epochs: int | None = Field(1, gt=0)
    local_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    client_fraction: float = Field(1.0, gt=0, le=1)
    eval_every: int = Field(1, gt=0)
    selection: Literal["best_after_half", "best", "last"] = "best_after_half"
    threads: int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    store: Literal["memory", "disk"] = "memory"
    #: Mixed precision: "bf16" / "fp16" run every forward pass (training, Fisher passes,
    #: evaluation) under torch.autocast in bfloat16 / float16 with float32 weights and optimizer
    #: state; fp16 steps every optimizer the engine hands out through a gradient scaler (the
    #: gradient-only passes of ResFIM's Fisher and FedALA's weight learning are unscaled: use
    #: bf16 there). It changes numbers, so it is part of the run key.
    amp: Literal["off", "bf16", "fp16"] = "off"
    #: Keep the model's weights (and so its activations) in channels_last memory layout: faster
    #: convolutions on recent GPUs; on the CPU the same numbers up to rounding.
    channels_last: bool = False
    #: Where the sites' images live during a run on a GPU: auto keeps them on the device when
    #: they fit in half its free memory (no copy per batch), else in pinned host memory
    #: (asynchronous copies); host leaves them in ordinary host memory. The same numbers either
    #: way: where it runs, not what it computes (not part of a run key).
    data_placement: Literal["auto", "host"] = "auto"
    #: True is ["flips"] (horizontal and vertical, p 0.5 each); "rot90" adds a rotation by a
    #: uniform multiple of 90° with p 0.5 (square images only), as albumentations'
    #: RandomRotate90 in FL-MedSegBench.
    augment: bool | list[Augmentation] = False
    shuffle: bool = True
    surface_metrics: bool = True
    #: Also score the test split at every evaluation round (test convergence curves). Selection
    #: never uses it; off by default because it doubles the evaluation cost.
    track_test: bool = False
    #: reset: a fresh optimizer every round; persist: one optimizer per client for the whole run
    #: (Adam moments and step counts carry over), as FL-MedSegBench. A method may force its own.
    optimizer_state: Literal["reset", "persist"] = "reset"
    lr_schedule: StepSchedule | None = None
    #: Each client's share of the average: ∝ training images (samples), ∝ training batches
    #: ⌈n / batch_size⌉ (batches, FL-MedSegBench's len(train_loader)), or equal (uniform).
    aggregation_weights: Literal["samples", "batches", "uniform"] = "samples"
    #: The soft Dice smoothing term ε in (2·|P∩G| + ε) / (|P| + |G| + ε); the benchmark uses 1e-6.
    loss_smoothing: float = Field(1.0, gt=0)
    #: First round best_after_half may select: after_half is 1-based round r > T // 2;
    #: benchmark is FL-MedSegBench's 0-based index r − 1 > T // 2 (one round later).
    selection_start: Literal["after_half", "benchmark"] = "after_half"
    #: Test cases per site whose predicted masks at the selected round a final run stores for
    #: the report's qualitative figure (:mod:`pflbench.qualitative`); 0 stores none. What is
    #: stored, not what is computed: never part of a run key.
    qualitative_cases: int = Field(3, ge=0, le=50)

    @field_validator("augment")
    @classmethod
    def _distinct_augment(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"augmentations must be distinct, got {v}")
        return v

    @property
    def augmentations(self) -> tuple[str, ...]:
        """The augmentation set: () for none, ("flips",) for ``augment: true``."""
        if isinstance(self.augment, bool):
            return ("flips",) if self.augment else ()
        return tuple(a for a in ("flips", "rot90") if a in self.augment)

    def lr_factor(self, round: int) -> float:
        """The multiplier of the base learning rate in (1-based) round ``round``."""
        return 1.0 if self.lr_schedule is None else self.lr_schedule.factor(round, self.rounds)

    def first_selectable(self) -> int:
        """The first (1-based) round best_after_half may select."""
        half = self.rounds // 2
        return half + (2 if self.selection_start == "benchmark" else 1)

    def key_dict(self) -> dict[str, Any]:
        """What of the protocol enters a run key: not where it runs (threads, device, store) nor
        what it stores besides its numbers (qualitative_cases: :data:`UNKEYED`), and the :data:`KEYED_WHEN_SET` keys only when set to something other than the default."""
        out = self.model_dump(mode="json", exclude=set(UNKEYED))
        for k in KEYED_WHEN_SET:
            if getattr(self, k) == type(self).model_fields[k].default:
                out.pop(k)
        return out

    @model_validator(mode="after")
    def _one_budget(self) -> Protocol:
        if self.local_steps is not None and "local_epochs" not in self.model_fields_set:
            self.local_epochs = None
        if (self.local_epochs is None) == (self.local_steps is None):
            raise ValueError("give exactly one of local_epochs and local_steps")
        return self


#: Protocol keys that say where a run ran or what it stores besides its numbers, never what it
#: computed: not part of a run key, nor of a configuration (:data:`pflbench.configs.LOCAL_PROTOCOL`).
UNKEYED = LOCAL_PROTOCOL

#: Protocol keys added after run keys existed: part of a run key only when not at the default.
KEYED_WHEN_SET = (
    "optimizer_state",
    "lr_schedule",
    "aggregation_weights",
    "loss_smoothing",
    "selection_start",
    "amp",
    "channels_last",
)

#: Protocol keys a dataset may not override: they decide how a sweep's workers are laid out.
SUITE_ONLY = frozenset({"threads"})


def merge_protocol(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``; mappings (``optimizer``, ``lr_schedule``) merge key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_protocol(out[k], v)
        else:
            out[k] = v
    return out


#: The shared search dimensions every method gets (the protocol's own knobs), with their type.
SHARED_SEARCH: dict[str, type] = {
    "lr": float,
    "local_epochs": int,
    "local_steps": int,
    "batch_size": int,
}


class SearchRange(_Strict):
    """A numeric range (``low``, ``high``, ``log``) or a list of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        numeric = self.low is not None or self.high is not None
        if numeric == (self.choices is not None):
            raise ValueError("give either low and high, or choices")
        if self.choices is not None:
            if not self.choices or len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices must be non-empty and distinct, got {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


def _default_search() -> dict[str, SearchRange | None]:
    return {
        "lr": SearchRange(low=1e-4, high=1e-1, log=True),
        "local_epochs": SearchRange(low=1, high=3),
        "batch_size": SearchRange(choices=[4, 8, 16]),
    }


class SamplerSpec(_Strict):
    name: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    startup_trials: int = Field(10, ge=0, description="random trials before TPE models the space")


class PrunerSpec(_Strict):
    name: Literal["median", "none"] = "median"
    startup_trials: int = Field(5, ge=0, description="completed trials before pruning starts")
    warmup_steps: int = Field(0, ge=0, description="evaluations before a trial can be pruned")
    interval_steps: int = Field(1, ge=1)


class Tuning(_Strict):
    """One study per (dataset, method), all with the same budget, sampler, pruner and objective.

    ``search`` holds the shared ranges (a key set to null is held at the protocol's value);
    with ``method_params`` each method's declared tunable parameters are searched too, except those
    the suite fixes in the method's ``params``. The best and the default configuration are then run
    on the suite's ``seeds`` (the reporting seeds), which must not overlap ``tuning.seeds``.
    """

    trials: int = Field(
        gt=0, description="trials per (dataset, method), pruned and failed included"
    )
    seeds: list[int] = Field(min_length=1, description="tuning seeds (disjoint from `seeds`)")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    search: dict[str, SearchRange | None] = Field(default_factory=_default_search)
    method_params: bool = True

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"tuning seeds must be distinct, got {v}")
        return v

    @field_validator("search")
    @classmethod
    def _shared_only(cls, v: dict[str, SearchRange | None]) -> dict[str, SearchRange | None]:
        for name, rng in v.items():
            kind = SHARED_SEARCH.get(name)
            if kind is None:
                raise ValueError(
                    f"unknown search key {name!r}; shared keys: {', '.join(SHARED_SEARCH)} "
                    "(method parameters come from each method's declared ranges)"
                )
            if rng is None or kind is not int:
                continue
            bounds = rng.choices if rng.choices is not None else [rng.low, rng.high]
            if any(isinstance(b, bool) or float(b) != int(b) or int(b) < 1 for b in bounds):
                raise ValueError(f"{name}: values must be integers >= 1, got {bounds}")
        return v


class PublishedDataset(_Strict):
    """A paper's numbers for one dataset of the suite (Dice %)."""

    #: Our site name → the published value.
    sites: dict[str, float] = Field(default_factory=dict)
    #: Our site name → the name the paper uses, where they differ.
    names: dict[str, str] = Field(default_factory=dict)
    average: float | None = Field(None, description="the paper's client average, if recovered")
    note: str = ""


class Published(_Strict):
    """``report.published``: values a paper reports, printed beside ours (never a target)."""

    source: str = Field(min_length=1, description="where the numbers come from (paper, table)")
    method: str = Field(min_length=1, description="the suite's method key they belong to")
    datasets: dict[str, PublishedDataset] = Field(min_length=1)


#: better / worse: a difference beyond the margin in that direction; not_worse: non-inferiority
#: within the margin; equivalent: the difference lies within ±margin.
Relation = Literal["better", "worse", "not_worse", "equivalent"]


class Expectation(_Strict):
    """One claim a suite expects its results to show: ``method`` is ``relation`` to ``other``.

    Judged by :mod:`pflbench.report.expectations` with the report's own procedure (blocks =
    (dataset, site), mean over seeds; Wilcoxon signed-rank, Holm over all expectations; bootstrap
    CI of Δ). ``margin`` is the practical margin in metric units: the threshold a better/worse
    difference must exceed (default: the report's practical threshold, 0.01) and the equivalence
    / non-inferiority margin, which must be given for those relations (it is part of the claim).
    """

    dataset: str = Field(min_length=1, description="a dataset key of the suite, or 'all'")
    method: str = Field(min_length=1)
    relation: Relation
    other: str = Field(min_length=1, description="the method it is compared with")
    metric: Literal["dice", "iou", "hd95", "assd"] = "dice"
    margin: float | None = Field(None, gt=0)
    #: Only these sites of the dataset are blocks (e.g. the tiny sites of a federation).
    sites: list[str] | None = Field(None, min_length=1)
    source: str = Field(min_length=1, description="where the claim comes from (paper, premise)")
    #: The claim in words; by default made from the fields.
    claim: str = ""

    @model_validator(mode="after")
    def _needs_margin(self) -> Expectation:
        if self.relation in ("equivalent", "not_worse") and self.margin is None:
            raise ValueError(
                f"relation {self.relation!r} needs a margin > 0 (the practical margin in metric "
                "units, e.g. margin: 0.02), since it is part of the claim"
            )
        if self.method == self.other:
            raise ValueError(f"method and other are both {self.method!r}; compare two methods")
        return self


Regime = Literal["zero_shot", "few_shot"]


class Evaluation(_Strict):
    """``evaluation``: sites held out of the federation and scored as newcomers.

    ``unseen: leave_one_out`` runs one federation per site without it; a list of site names runs
    one federation without all of them. Each held-out site's test split is scored with the
    method's newcomer model (:meth:`pflbench.method.Method.newcomer_model`) in each ``regime``:
    ``zero_shot`` (no labels; unlabelled images only where the method says so) and ``few_shot``
    (``few_shot_steps`` labelled steps on the site's train split, the same K for every method).
    ``newcomer_personal: average`` gives every method the clients' personal entries, uploaded
    once after the last round and averaged, instead of its own declared rule (``method``).
    """

    unseen: Literal["leave_one_out"] | list[str] | None = None
    regimes: list[Regime] = Field(default_factory=lambda: ["zero_shot", "few_shot"], min_length=1)
    few_shot_steps: int = Field(5, ge=1, description="labelled local steps of few_shot (K)")
    newcomer_personal: Literal["method", "average"] = "method"

    @field_validator("unseen")
    @classmethod
    def _sites(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("name at least one site, or use leave_one_out")
            if len(set(v)) != len(v):
                raise ValueError(f"sites appear more than once: {v}")
        return v

    @field_validator("regimes")
    @classmethod
    def _distinct_regimes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"regimes appear more than once: {v}")
        return v

    def held_out_sets(self, sites: Sequence[str], dataset: str) -> list[tuple[str, ...]]:
        """The held-out sets of one dataset (empty: no unseen evaluation); an unknown site name
        is an error naming the dataset and its sites."""
        if self.unseen is None:
            return []
        if self.unseen == "leave_one_out":
            if len(sites) < 2:
                raise SuiteError(
                    f"evaluation.unseen: leave_one_out needs at least two sites; dataset "
                    f"{dataset!r} has {list(sites)}"
                )
            return [(s,) for s in sites]
        unknown = [s for s in self.unseen if s not in sites]
        if unknown:
            raise SuiteError(
                f"evaluation.unseen: {unknown} are not sites of dataset {dataset!r} "
                f"(its sites: {list(sites)})"
            )
        if len(self.unseen) >= len(sites):
            raise SuiteError(
                f"evaluation.unseen: holding out {self.unseen} leaves no site of dataset "
                f"{dataset!r} to train the federation"
            )
        return [tuple(self.unseen)]


class Suite(_Strict):
    name: str
    description: str = ""
    out: str | None = None
    datasets: list[DatasetSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    protocol: Protocol
    report: dict[str, Any] = Field(default_factory=dict)
    #: Claims the results are expected to show, judged in the report (``--check-expectations``).
    expect: list[Expectation] = Field(default_factory=list)
    tuning: Tuning | None = None
    evaluation: Evaluation = Field(default_factory=Evaluation)
    workers: int | Literal["auto"] = Field(
        1,
        description="worker processes `pflbench run` starts when --workers is not given; auto: "
        "one per protocol.threads CPUs (one per CPU with threads: 1)",
    )

    workers_per_gpu: int | Literal["auto"] | None = Field(
        None,
        description="with GPUs visible and no --workers, start this many workers on each GPU "
        "(instead of `workers`); auto: as many as fit by the peak GPU memory of a one-step probe "
        "of each method (pflbench.packing). Ignored without GPUs.",
    )

    @field_validator("workers_per_gpu")
    @classmethod
    def _positive_per_gpu(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= MAX_WORKERS:
            raise PydanticCustomError(
                "workers_per_gpu",
                "must be ≥ 1 and ≤ {max}, or 'auto'; got {v}",
                {"v": v, "max": MAX_WORKERS},
            )
        return v

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_WORKERS:
            raise PydanticCustomError(
                "workers",
                "must be ≥ 1 and ≤ {max}, or 'auto'; got {v}",
                {"v": v, "max": MAX_WORKERS},
            )
        return v

    @field_validator("tuning")
    @classmethod
    def _tuning_fits(cls, v: Tuning | None, info: ValidationInfo) -> Tuning | None:
        if v is None:
            return v
        reporting = info.data.get("seeds")
        if reporting is not None:
            both = sorted(set(v.seeds) & set(reporting))
            if both:
                raise PydanticCustomError(
                    "seeds_overlap",
                    "seeds {both} are both tuning seeds (tuning.seeds) and reporting seeds "
                    "(seeds); they must be disjoint",
                    {"both": both},
                )
        protocol = info.data.get("protocol")
        if protocol is not None:
            budget = "local_steps" if protocol.local_steps is not None else "local_epochs"
            other = "local_epochs" if budget == "local_steps" else "local_steps"
            if v.search.get(other) is not None:
                if "search" in v.model_fields_set:
                    raise PydanticCustomError(
                        "search_budget",
                        "tuning.search.{other}: the protocol budgets local work in {budget}; "
                        "search {budget} instead",
                        {"other": other, "budget": budget},
                    )
                v.search = {k: r for k, r in v.search.items() if k != other}
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    def protocol_for(self, dataset: DatasetSpec) -> Protocol:
        """The suite's protocol with ``dataset.protocol`` merged over it."""
        return dataset_protocol(self.protocol, dataset.protocol)

    @model_validator(mode="after")
    def _unique_labels(self) -> Suite:
        for what, items in (("datasets", self.datasets), ("methods", self.methods)):
            keys = [i.key for i in items]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"{what}: {dup} appear more than once; give each a distinct label")
        return self


def dataset_protocol(base: Protocol, override: dict[str, Any]) -> Protocol:
    """``override`` (a dataset's ``protocol`` keys) merged over ``base`` and validated.

    Setting one local budget (``local_epochs`` / ``local_steps``) replaces the other.
    """
    if not override:
        return base
    bad = sorted(SUITE_ONLY & set(override))
    if bad:
        raise ValueError(f"{bad[0]} is set for the whole suite only (protocol.{bad[0]})")
    raw = base.model_dump()
    for budget, other in (("local_epochs", "local_steps"), ("local_steps", "local_epochs")):
        if override.get(budget) is not None and other not in override:
            raw[other] = None
    return Protocol.model_validate(merge_protocol(raw, override))


def _dataset_protocol_problems(suite: Suite, source: str) -> list[str]:
    problems = []
    for i, d in enumerate(suite.datasets):
        where = f"{source}: datasets[{i}].protocol"
        try:
            dataset_protocol(suite.protocol, d.protocol)
        except ValidationError as exc:
            for err in exc.errors():
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
                problems.append(f"{where}.{_loc(loc)}: {msg}" if loc else f"{where}: {msg}")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _published_problems(suite: Suite, source: str) -> list[str]:
    """``report.published`` is well formed and names the suite's own datasets and method."""
    raw = suite.report.get("published")
    if raw is None:
        return []
    where = f"{source}: report.published"
    try:
        pub = Published.model_validate(raw)
    except ValidationError as exc:
        return [
            f"{where}.{_loc(tuple(e['loc']))}: "
            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        ]
    problems = []
    datasets = [d.key for d in suite.datasets]
    for d in pub.datasets:
        if d not in datasets:
            problems.append(f"{where}.datasets.{d}: not a dataset of the suite ({datasets})")
    methods = [m.key for m in suite.methods]
    if pub.method not in methods:
        problems.append(f"{where}.method: {pub.method!r} is not a method of the suite")
    return problems


def _unknown(kind: str, value: str, known: list[str]) -> str:
    """ "'fedbm' is not a method of the suite; did you mean 'fedbn'? (methods: ...)" """
    close = difflib.get_close_matches(value, known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{value!r} is not a {kind} of the suite{hint} ({kind}s: {', '.join(known)})"


def _expect_problems(suite: Suite, source: str) -> list[str]:
    """Each expectation names the suite's own datasets (or 'all') and methods."""
    datasets = [d.key for d in suite.datasets]
    methods = [m.key for m in suite.methods]
    problems = []
    for i, e in enumerate(suite.expect):
        where = f"{source}: expect[{i}]"
        if e.dataset != "all" and e.dataset not in datasets:
            problems.append(
                f"{where}.dataset: " + _unknown("dataset", e.dataset, datasets + ["all"])
            )
        for key in ("method", "other"):
            name = getattr(e, key)
            if name not in methods:
                problems.append(f"{where}.{key}: " + _unknown("method", name, methods))
        if e.sites is not None and e.dataset == "all":
            problems.append(f"{where}.sites: sites need one dataset, not 'all'")
    return problems


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def expand_env(value: Any, where: str) -> Any:
    """Expand environment variables in strings, recursively; an unset variable is an error."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var = m.group(1) or m.group(2)
            if var not in os.environ:
                raise SuiteError(f"{where}: environment variable ${var} is not set (in {value!r})")
            return os.environ[var]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


_PLAIN_KEY = re.compile(r"[\w@+=\[\]'-]+")


def _loc(loc: tuple[Any, ...]) -> str:
    """A key path for a message; an odd key (empty, dots, a newline) is quoted, so a message
    stays one line and unambiguous."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = str(part) if _PLAIN_KEY.fullmatch(str(part)) else repr(str(part))
        out += f".{name}" if out else name
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that holds the last key of ``loc`` (for "did you mean" hints)."""
    cls: type[BaseModel] | None = Suite
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(str(part))
        cls = _inner_model(field.annotation) if field is not None else None
    return cls


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _message(err: Any, loc: tuple[Any, ...]) -> str:
    """pydantic's error in the words of a suite file."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        cls = _model_at(loc)
        known = sorted(cls.model_fields) if cls is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=2, cutoff=0.6) if loc else []
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return f"unknown key{hint}" + (f" (known keys: {', '.join(known)})" if known else "")
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def parse_suite(raw: Any, source: str) -> Suite:
    """Validate a suite mapping; ``source`` names the file in errors."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: a suite must be a mapping of keys, got {type(raw).__name__}")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            lines.append(f"{source}: {_loc(loc)}: {_message(err, loc)}".replace("\r", "\\r"))
        raise SuiteError("\n".join(lines)) from None
    if suite.out is not None:
        suite.out = expand_env(suite.out, f"{source}: out")
    for i, d in enumerate(suite.datasets):
        d.options = expand_env(d.options, f"{source}: datasets[{i}].options")
    problems = (
        _dataset_protocol_problems(suite, source)
        + _published_problems(suite, source)
        + _expect_problems(suite, source)
    )
    if problems:
        raise SuiteError("\n".join(problems))
    check_plugins(suite, source)
    return suite


def check_plugins(suite: Suite, source: str) -> None:
    """Names resolve, method parameters are valid, declared data roots exist."""
    problems: list[str] = []
    for i, m in enumerate(suite.methods):
        try:
            cls = registry("methods").load(m.name)
            cls(**m.params)
        except (RegistryError, ParamError) as exc:
            problems.append(f"{source}: methods[{i}]: {exc}")
    for i, d in enumerate(suite.datasets):
        try:
            cls = registry("datasets").load(d.name)
        except RegistryError as exc:
            problems.append(f"{source}: datasets[{i}]: {exc}")
            continue
        root = d.options.get("root")
        if root is not None and not Path(root).is_dir():
            tree = getattr(cls, "expected_tree", "")
            hint = f"\nexpected a folder laid out as:\n{tree}" if tree else ""
            problems.append(
                f"{source}: datasets[{i}].options.root: data folder {root!r} does not exist{hint}"
            )
            continue
        problem = _check_options(cls, d.options)
        if problem:
            problems.append(f"{source}: datasets[{i}].options: {problem}")
            continue
        problems += _expect_site_problems(suite, d, cls, source)
    try:
        registry("models").load(suite.model.name)
    except RegistryError as exc:
        problems.append(f"{source}: model: {exc}")
    if problems:
        raise SuiteError("\n".join(problems))


def _expect_site_problems(suite: Suite, d: DatasetSpec, cls: type, source: str) -> list[str]:
    """Expectation sites that the dataset does not have, where the plugin can name its sites
    without reading data (``site_names``); otherwise the report checks them."""
    wanted = [(i, e) for i, e in enumerate(suite.expect) if e.sites and e.dataset == d.key]
    if not wanted:
        return []
    try:
        known = list(getattr(cls(**d.options), "site_names", None) or [])
    except Exception:  # noqa: BLE001 - a plugin that cannot tell: the report checks later
        return []
    if not known:
        return []
    return [
        f"{source}: expect[{i}].sites: "
        + _unknown("site", s, known).replace("of the suite", f"of {d.key}")
        for i, e in wanted
        for s in e.sites or []
        if s not in known
    ]


def _check_options(cls: type, options: dict[str, Any]) -> str | None:
    """Unknown or invalid dataset options, found by building the plugin (no data is read)."""
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [k for k in params if k != "self"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            return f"unknown option(s) {unknown} for dataset {cls.name!r}; valid options: {', '.join(valid)}"
    try:
        cls(**options)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


#: Deepest nesting a suite file may have (a real suite needs about 6; PyYAML would recurse
#: until the interpreter gives up).
MAX_DEPTH = 64


class _SuiteLoader(yaml.SafeLoader):
    """Safe YAML with what a suite never needs refused, each as an error with a line number:
    duplicate keys (the second silently won), anchors and aliases (a few lines of them expand
    to billions of nodes once walked), nesting deeper than :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "anchors and aliases (&name, *name) are not supported in suites",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The parsed file, or a one-line :class:`SuiteError` naming the file (and line) and what is
    wrong: not UTF-8, malformed YAML, duplicate keys, aliases, too deep."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SuiteError(
            f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the suite as UTF-8"
        ) from None
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the suite file: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_SuiteLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise SuiteError(f"{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise SuiteError(f"{path}: malformed YAML: nested too deeply") from None


def apply_overrides(raw: Any, overrides: Sequence[str], where: str) -> Any:
    """``raw`` with each ``KEY=VALUE`` override applied (Hydra-style dotted paths; list items by
    index: ``datasets.0.options.size=32``; VALUE is YAML: ``seeds=[0,1]``). The result is then
    validated like the file, so a wrong key or value gets the same error as in the file."""
    if not overrides:
        return raw
    raw = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        path = [p for p in key.strip().split(".") if p]
        if not sep or not path:
            raise SuiteError(f"{where}: --set {item!r}: expected KEY=VALUE, e.g. protocol.rounds=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SuiteError(
                f"{where}: --set {item!r}: the value is not valid YAML ({exc})"
            ) from None
        node = raw
        for i, part in enumerate(path):
            last = i == len(path) - 1
            shown = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SuiteError(
                        f"{where}: --set {item!r}: {shown} must be an index below {len(node)}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:  # e.g. a short-form entry (`- fedavg`) that has no keys to set
                parent = ".".join(path[:i])
                raise SuiteError(
                    f"{where}: --set {item!r}: {parent} is {node!r}, not a mapping or a list"
                )
    return raw


def load_suite(path: str | Path, overrides: Sequence[str] = ()) -> Suite:
    """Read and validate a suite file, with ``--set`` overrides applied first."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    label = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
    return parse_suite(apply_overrides(read_yaml(path), overrides, str(path)), label)
