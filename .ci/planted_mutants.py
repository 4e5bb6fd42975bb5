"""Plant each of the bugs that once survived every test (issue 22), run the tests meant to catch
it, and restore the file: every one must fail. Usage: ``python .ci/planted_mutants.py [name…]``.

Edits the source in place for the duration of one pytest call (restored in ``finally``); run it
on a clean checkout. Exit status 1 when a planted bug survives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE, PERSONAL = "tests/test_engine.py", "tests/test_methods_personal.py"

#: name -> (file, [(original, planted)], test file, -k expression of the tests that must fail)
PLANTED = {
    "plain-mean": (
        "pflbench/aggregation.py",
        [
            ("num[k].add_(t.to(torch.float64), alpha=w)", "num[k].add_(t.to(torch.float64))"),
            ("den[k] = den[k] + w\n", "den[k] = den[k] + 1.0\n"),
            ("ws = share.to(torch.float64) * w", "ws = share.to(torch.float64)"),
        ],
        ENGINE,
        "masked_average_weights or mixes_masked or unequal_sites",
    ),
    "upload-weight-one": (
        "pflbench/method.py",
        [("weight=client.weight)", "weight=1.0)")],
        ENGINE,
        "unequal_sites",
    ),
    "best-rows-from-last-model": (
        "pflbench/engine.py",
        [('("best", self.best[cid][1], snap)', '("best", self.best[cid][1], current)')],
        ENGINE,
        "best_rows_are",
    ),
    "fedprox-2mu": (
        "methods/fedprox.py",
        [("proximal_term(anchor, self.mu)", "proximal_term(anchor, 2 * self.mu)")],
        PERSONAL,
        "hand_computed_proximal",
    ),
    "apfl-w-loss-times-1-minus-alpha": (
        "methods/apfl.py",
        [("step(opt_w, client.loss(out_w, y), where)", "step(opt_w, (1 - alpha) * client.loss(out_w, y), where)")],
        PERSONAL,
        "w_trajectory or w_follows",
    ),
    "disk-store-is-memory": (
        "pflbench/state.py",
        [("        return DiskStore(root)", "        return MemoryStore()")],
        ENGINE,
        "disk_store_keeps",
    ),
}  # fmt: skip


def plant(name: str) -> bool:
    """True when the planted bug is caught (the tests fail)."""
    rel, edits, tests, select = PLANTED[name]
    path = ROOT / rel
    original = path.read_text()
    text = original
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"{rel}: cannot plant {name!r}: {old!r} is not there exactly once")
        text = text.replace(old, new)
    path.write_text(text)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, "-k", select],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(original)
    failed = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("FAILED")]
    print(f"{name}: {'caught by ' + ', '.join(failed) if failed else 'SURVIVED'}")
    return res.returncode == 1 and bool(failed)


def main() -> None:
    names = sys.argv[1:] or list(PLANTED)
    caught = [plant(n) for n in names]
    sys.exit(0 if all(caught) else 1)


if __name__ == "__main__":
    main()
