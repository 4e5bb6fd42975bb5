"""Declared hyperparameters: a default (the paper's) and a search range for tuning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ParamError(ValueError):
    """A hyperparameter that is unknown or outside its declared type or range."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method.

    ``low``/``high`` (with ``log``) give a numeric search range; ``choices`` a categorical one.
    A parameter with neither is fixed during tuning. ``valid`` = (min, max), inclusive, either
    None for unbounded: the values the method accepts at all, checked on every value a suite
    gives; the default and the search range must lie inside it. A default of ``None`` means
    "follow the suite" (e.g. Ditto's personal budget); ``value_type`` then says what a given value must
    be.
    """

    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""
    #: False for switches whose values are validated against ``choices`` but never searched
    #: (ablation switches are chosen by the suite, not by the tuner).
    search: bool = True
    valid: tuple[float | None, float | None] | None = None
    #: The value type when the default (None) does not say it.
    value_type: type | None = None

    def __post_init__(self) -> None:
        if self.valid is None:
            return
        for what, value in (("default", self.default), ("low", self.low), ("high", self.high)):
            if value is not None and not self._inside(value):
                raise ValueError(f"{what} {value!r} lies outside valid {self.valid}")

    def _inside(self, value: float) -> bool:
        lo, hi = self.valid or (None, None)
        return (lo is None or value >= lo) and (hi is None or value <= hi)

    def accepts(self) -> str:
        """The valid bounds in words ("≥ 1", "in [0, 1]"), "" when unbounded."""
        return self._valid_text() if self.valid is not None else ""

    def _valid_text(self) -> str:
        lo, hi = self.valid or (None, None)
        if hi is None:
            return f"≥ {lo:g}"
        if lo is None:
            return f"≤ {hi:g}"
        return f"in [{lo:g}, {hi:g}]"

    @property
    def kind(self) -> type:
        return self.value_type if self.value_type is not None else type(self.default)

    @property
    def tunable(self) -> bool:
        if not self.search:
            return False
        return self.choices is not None or (self.low is not None and self.high is not None)

    def check(self, name: str, value: Any, owner: str) -> Any:
        """Coerce and validate ``value``; the error names the owner and the parameter."""
        if value is None and self.default is None:
            return None
        if self.choices is not None:
            # compare types too: 1 == True, but an integer is not a valid boolean switch
            if not any(value == c and type(value) is type(c) for c in self.choices):
                raise ParamError(
                    f"{owner}: parameter {name!r} = {value!r} is not one of {list(self.choices)}"
                )
            return value
        kind = self.kind
        if kind is bool:
            if not isinstance(value, bool):
                raise ParamError(
                    f"{owner}: parameter {name!r} must be true or false, got {value!r}"
                )
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(f"{owner}: parameter {name!r} must be a number, got {value!r}")
            if kind is int and float(value) != int(value):
                raise ParamError(f"{owner}: parameter {name!r} must be an integer, got {value!r}")
            value = kind(value)
            if not self._inside(value):
                raise ParamError(
                    f"{owner}: parameter {name!r} = {value!r} must be {self._valid_text()}"
                )
        return value

    def describe(self) -> str:
        if self.choices is not None:
            values = "{" + ", ".join(map(str, self.choices)) + "}"
            return values if self.search else f"switch {values}"
        if self.tunable:
            return f"[{self.low}, {self.high}]" + (" log" if self.log else "")
        return "fixed"


def resolve_params(
    declared: Mapping[str, Param], given: Mapping[str, Any], owner: str
) -> dict[str, Any]:
    """Defaults overlaid with ``given``; unknown names are refused with the valid ones listed."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(sorted(declared)) or "none"
        raise ParamError(f"{owner}: unknown parameter(s) {unknown}; valid parameters: {valid}")
    out = {k: p.default for k, p in declared.items()}
    for k, v in given.items():
        out[k] = declared[k].check(k, v, owner)
    return out
