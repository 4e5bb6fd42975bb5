"""Per-module table of a mutmut run (read from ``mutmut results --all true`` in the staged tree).

Writes ``<out>.md`` and ``<out>.json``: mutants, killed, survived, timeouts, no tests, not checked
and the kill rate over the checked mutants, per module, with the command and its wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

KEY = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+)$")
COLUMNS = ["killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked"]


def module_of(mutant: str) -> str:
    """``pflbench.aggregation.x_masked_average__mutmut_3`` -> ``pflbench.aggregation``."""
    parts = mutant.split(".")
    for i, p in enumerate(parts):
        if p.startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return mutant.rpartition(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wall", type=int, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    text = subprocess.run(
        ["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        m = KEY.match(line)
        if not m:
            continue
        mod, status = module_of(m["name"]), m["status"].strip()
        counts[mod][status] += 1
        if status in ("survived", "no tests", "timeout", "suspicious"):
            survivors[mod].append(f"{m['name']}: {status}")
    rows = []
    for mod in sorted(counts):
        c = counts[mod]
        checked = sum(v for k, v in c.items() if k != "not checked")
        killed = c["killed"]
        rate = killed / checked if checked else None
        rows.append(
            {
                "module": mod,
                "mutants": sum(c.values()),
                **{k: c[k] for k in COLUMNS},
                "kill_rate": rate,
            }
        )
    report = {
        "command": args.command,
        "wall_s": args.wall,
        "modules": rows,
        "not_killed": dict(survivors),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    head = ["module", "mutants", *COLUMNS, "killed / checked"]
    lines = [
        f"`{args.command}`, wall time {args.wall} s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        rate = "–" if r["kill_rate"] is None else f"{100 * r['kill_rate']:.1f} %"
        lines.append(
            "| "
            + " | ".join([r["module"], str(r["mutants"]), *(str(r[k]) for k in COLUMNS), rate])
            + " |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
