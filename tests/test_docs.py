"""The README's generated parts match the code."""

from __future__ import annotations

from pathlib import Path

from pflbench.docs import render
from pflbench.registry import registry

README = Path(__file__).parent.parent / "README.md"


def test_readme_methods_table_is_current():
    text = README.read_text()
    assert render(text) == text, "README.md is stale: run `python -m pflbench.docs README.md`"


def test_every_builtin_method_cites_a_paper_and_imports():
    reg = registry("methods")
    methods = reg.load_all()
    assert not reg.errors, reg.errors
    for name, cls in methods.items():
        assert cls.paper, f"{name} has no paper citation"
        assert (cls.__doc__ or "").strip(), f"{name} has no docstring"
