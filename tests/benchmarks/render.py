"""Markdown table of a ``--benchmark-json`` run: each row's median as a ratio to its group's
reference row, so a published run reads the same way every time::

    python tests/benchmarks/render.py reports/benchmarks/2026-11-26.json > table.md

The reference of a group is the row that measures the baseline (plain PyTorch, FedBN, the batch
Fisher, MedPy, a bare FFT); a group without one gets no ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# substrings of a benchmark name that mark its group's reference row
REFERENCE_MARKS = ("plain", "fedbn", "[batch]", "medpy", "fft_round_trip")


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.2f} ms"


def _reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    refs = [r for r in rows if any(mark in r["name"] for mark in REFERENCE_MARKS)]
    return refs[0] if len(refs) == 1 else None


def render(run: dict[str, Any]) -> str:
    machine = run["machine_info"]
    cpu = machine.get("cpu", {})
    lines = [
        "| machine | |",
        "|---|---|",
        f"| CPU | {cpu.get('brand_raw', '?')} |",
        f"| cores | {cpu.get('count', '?')} |",
        f"| Python | {machine.get('python_version', '?')} |",
        f"| OS | {machine.get('system', '?')} {machine.get('release', '')} |",
        f"| date | {run.get('datetime', '?')} |",
        f"| commit | {run.get('commit_info', {}).get('id', '?')[:10]}"
        f"{' (dirty)' if run.get('commit_info', {}).get('dirty') else ''} |",
        "",
        "Ratio = median of the row / median of the group's reference row (*ref*).",
        "",
        "| group | benchmark | median | mean ± sd | rounds | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for bench in run["benchmarks"]:
        groups.setdefault(bench["group"] or "", []).append(bench)
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["name"])
        ref = _reference(rows)
        for bench in rows:
            s = bench["stats"]
            if ref is None:
                ratio = "–"
            elif bench is ref:
                ratio = "ref"
            else:
                ratio = f"{s['median'] / ref['stats']['median']:.2f}×"
            lines.append(
                f"| {group} | `{bench['name']}` | {_time(s['median'])} | "
                f"{_time(s['mean'])} ± {_time(s['stddev'])} | {s['rounds']} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="a file written by --benchmark-json")
    args = ap.parse_args()
    print(render(json.loads(args.json.read_text())), end="")


if __name__ == "__main__":
    main()
