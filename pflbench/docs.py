"""Reference tables generated from the registry, so the README cannot drift from the code.

``python -m pflbench.docs`` rewrites the blocks between the markers in README.md (the methods
table and the fidelity table); a test fails when the README is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pflbench.params import Param
from pflbench.registry import registry

START, END = "<!-- methods:start -->", "<!-- methods:end -->"
FIDELITY_START, FIDELITY_END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"


def builtin_methods() -> dict[str, type]:
    """The methods this package ships (installed plugins are not the README's to document)."""
    return {
        name: cls
        for name, cls in sorted(registry("methods").load_all().items())
        if cls.__module__.startswith("pflbench.methods.")
    }


def methods_table() -> str:
    """Markdown: every built-in or installed method, its paper and its hyperparameters."""
    rows = [
        "| method | paper | hyperparameters (default, search space, accepted values) |",
        "|---|---|---|",
    ]
    for name, cls in builtin_methods().items():
        params = getattr(cls, "params", {})
        hp = "; ".join(_param_text(k, p) for k, p in params.items()) or "–"
        rows.append(f"| `{name}` | {getattr(cls, 'paper', '')} | {hp} |")
    return "\n".join(rows)


def fidelity_table() -> str:
    """Markdown: what each method was checked against, what it shares and keeps, what it
    evaluates, its extra passes and every declared deviation (from the classes' declarations)."""
    rows = [
        "| method | paper | official code read | shared | personal | evaluated model "
        "| extra passes | declared deviations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cls in builtin_methods().items():
        deviations = getattr(cls, "deviations", ())
        dev = "<br>".join(f"{i}. {d}" for i, d in enumerate(deviations, 1)) or "none"
        cells = [
            f"`{name}`",
            getattr(cls, "paper", ""),
            getattr(cls, "official_code", "") or "–",
            getattr(cls, "shares", ""),
            getattr(cls, "personal", ""),
            getattr(cls, "evaluates", ""),
            getattr(cls, "extra_passes", ""),
            dev,
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _param_text(name: str, p: Param) -> str:
    accepts = p.accepts()
    return f"`{name}`={p.default!r} {p.describe()}" + (f" ({accepts})" if accepts else "")


def _replace_block(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render(readme: str) -> str:
    readme = _replace_block(readme, START, END, methods_table())
    return _replace_block(readme, FIDELITY_START, FIDELITY_END, fidelity_table())


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0] if argv else "README.md")
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
