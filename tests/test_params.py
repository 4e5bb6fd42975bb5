"""Declared hyperparameters: types, search ranges and the values a method accepts at all."""

from __future__ import annotations

import pytest

from pflbench.params import Param, ParamError, resolve_params
from pflbench.registry import get_method


def test_valid_bounds_are_inclusive_and_named_in_the_error():
    p = Param(0.5, 0.1, 0.9, valid=(0, 1))
    assert p.check("rho", 0, "m") == 0.0 and p.check("rho", 1, "m") == 1.0
    with pytest.raises(ParamError, match=r"m: parameter 'rho' = 1.5 must be in \[0, 1\]"):
        p.check("rho", 1.5, "m")
    q = Param(3, valid=(1, None))
    with pytest.raises(ParamError, match=r"'k' = 0 must be ≥ 1"):
        q.check("k", 0, "m")
    assert q.describe() == "fixed" and q.accepts() == "≥ 1" and Param(1).accepts() == ""


def test_a_declaration_outside_its_own_valid_range_is_refused():
    with pytest.raises(ValueError, match="default 2 lies outside"):
        Param(2, valid=(0, 1))
    with pytest.raises(ValueError, match="high 5.0 lies outside"):
        Param(0.5, 0.1, 5.0, valid=(0, 1))


@pytest.mark.parametrize(
    "method, params, key",
    [
        ("ditto", {"lam": -1.0}, "lam"),
        ("ditto", {"personal_epochs": 0}, "personal_epochs"),
        ("fedprox", {"mu": -0.1}, "mu"),
        ("apfl", {"alpha": 1.5}, "alpha"),
        ("fedala", {"s": 0.0}, "s"),
        ("fedrep", {"head_epochs": 0}, "head_epochs"),
        ("resfim", {"beta": 0.7}, "beta"),
    ],
)
def test_methods_refuse_values_they_cannot_use(method, params, key):
    cls = get_method(method)
    with pytest.raises(ParamError, match=rf"method {method}: parameter '{key}'"):
        resolve_params(cls.params, params, f"method {method}")
