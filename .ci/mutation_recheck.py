"""Recheck named mutants against the current tests, in one process (the "after" counts).

A full ``.ci/mutation`` rerun pays mutmut's instrumented pass over every test file again; after
writing tests against a run's survivors, only those mutants need rechecking. This sets
``MUTANT_UNDER_TEST`` per mutant and runs ``pytest -x`` in-process over the given test files
inside the run's mutant tree (copy the new test files into ``<stage>/mutants/tests`` first):

    python .ci/mutation_recheck.py .mutation/mutants after.tsv names.txt tests/test_x.py ...

``names.txt``: one mutant name a line (``mutmut results`` prints them). Writes one line a mutant
to ``after.tsv``: name, killed / survived / timeout, the first failing test, seconds. A rerun
skips the names already in ``after.tsv``. The test files must pass with no mutant, or it stops.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

TIMEOUT_S = 300


class FirstFailure:
    """A pytest plugin that remembers the first failing test."""

    def __init__(self) -> None:
        self.nodeid: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and self.nodeid is None:
            self.nodeid = report.nodeid


class MutantTimeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise MutantTimeout


def run_tests(args: list[str], mutant: str) -> tuple[int, str | None]:
    os.environ["MUTANT_UNDER_TEST"] = mutant
    first = FirstFailure()
    return int(pytest.main(args, plugins=[first])), first.nodeid


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    tree, out, names_file, *tests = argv
    names = [n.strip() for n in open(names_file) if n.strip()]
    out = os.path.abspath(out)
    os.chdir(tree)
    sys.path.insert(0, os.getcwd())
    args = ["-x", "-q", "-p", "no:cacheprovider", "--benchmark-disable", *tests]
    rc, failed = run_tests(args, "")
    if rc != 0:
        print(
            f"the tests fail with no mutant (exit {rc}, {failed}): fix them first", file=sys.stderr
        )
        return 1
    done = {line.split("\t")[0] for line in open(out)} if os.path.exists(out) else set()
    signal.signal(signal.SIGALRM, _alarm)
    with open(out, "a") as fh:
        for name in names:
            if name in done:
                continue
            start = time.time()
            signal.alarm(TIMEOUT_S)
            try:
                rc, failed = run_tests(args, name)
                status, why = ("killed", failed or f"exit {rc}") if rc else ("survived", "")
            except MutantTimeout:
                status, why = "timeout", f"{TIMEOUT_S} s"
            finally:
                signal.alarm(0)
            fh.write(f"{name}\t{status}\t{why}\t{time.time() - start:.1f}s\n")
            fh.flush()
    os.environ["MUTANT_UNDER_TEST"] = ""
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
