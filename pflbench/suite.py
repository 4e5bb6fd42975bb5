"""The suite file: what to run, validated before anything runs.

Errors name the file, the key (as a dotted path) and what was expected, one line each.
Environment variables (``$VAR`` / ``${VAR}``) are expanded in every string of ``out`` and of the
dataset options; an unset variable is an error that names it.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, Literal

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


class Protocol(_Strict):
    """The federation protocol, identical for every method of a suite."""

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
    augment: bool = False
    shuffle: bool = True
    surface_metrics: bool = True
    #: Also score the test split at every evaluation round (test convergence curves). Selection
    #: never uses it; off by default because it doubles the evaluation cost.
    track_test: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> Protocol:
        if self.local_steps is not None and "local_epochs" not in self.model_fields_set:
            self.local_epochs = None
        if (self.local_epochs is None) == (self.local_steps is None):
            raise ValueError("give exactly one of local_epochs and local_steps")
        return self


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
    tuning: Tuning | None = None
    workers: int | Literal["auto"] = Field(
        1,
        description="worker processes `pflbench run` starts when --workers is not given; auto: "
        "one per protocol.threads CPUs (one per CPU with threads: 1)",
    )

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

    @model_validator(mode="after")
    def _unique_labels(self) -> Suite:
        for what, items in (("datasets", self.datasets), ("methods", self.methods)):
            keys = [i.key for i in items]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"{what}: {dup} appear more than once; give each a distinct label")
        return self


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
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msg = msg.replace("\r", "\\r").replace("\n", "\\n")
            lines.append(f"{source}: {_loc(loc)}: {msg}")
        raise SuiteError("\n".join(lines)) from None
    if suite.out is not None:
        suite.out = expand_env(suite.out, f"{source}: out")
    for i, d in enumerate(suite.datasets):
        d.options = expand_env(d.options, f"{source}: datasets[{i}].options")
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
    try:
        registry("models").load(suite.model.name)
    except RegistryError as exc:
        problems.append(f"{source}: model: {exc}")
    if problems:
        raise SuiteError("\n".join(problems))


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


def peek_suite(path: str | Path) -> dict[str, Any]:
    """The suite file's raw mapping, unvalidated, or {} if it cannot be read: for the decisions
    ``pflbench run`` takes before the (slower) validation, which reports any problem later."""
    try:
        raw = read_yaml(Path(path))
    except SuiteError:
        return {}
    return raw if isinstance(raw, dict) else {}


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    return parse_suite(read_yaml(path), str(path))
