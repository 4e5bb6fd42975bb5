"""Reference tables generated from the registry, so the README cannot drift from the code.

``python -m pflbench.docs`` rewrites the block between the markers in README.md; a test fails when
the README is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pflbench.params import Param
from pflbench.registry import registry

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def methods_table() -> str:
    """Markdown: every built-in or installed method, its paper and its hyperparameters."""
    rows = [
        "| method | paper | hyperparameters (default, search space, accepted values) |",
        "|---|---|---|",
    ]
    for name, cls in sorted(registry("methods").load_all().items()):
        params = getattr(cls, "params", {})
        hp = "; ".join(_param_text(k, p) for k, p in params.items()) or "–"
        rows.append(f"| `{name}` | {getattr(cls, 'paper', '')} | {hp} |")
    return "\n".join(rows)


def _param_text(name: str, p: Param) -> str:
    accepts = p.accepts()
    return f"`{name}`={p.default!r} {p.describe()}" + (f" ({accepts})" if accepts else "")


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{methods_table()}\n{END}{tail}"


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
