"""Throughput of ``pflbench run --workers 2`` against ``--workers 1`` on a batch of small runs.

The goal is ≥ 1.6× on 2 cores. Timed end to end through the command line (process start-up and
storage included), in two settings: ``threads: 1`` pinned in the suite (the bitwise-reproducible
setting; one worker then uses one core) and threads left free (one worker gets every core for
torch's intra-op threads, two workers get half each). As pytest-benchmark tests::

    python -m pytest tests/benchmarks/test_bench_workers.py -m slow --benchmark-enable

or as a measured run that prints the times and ratios (``--repeat`` alternates the counts and
keeps the best of each; measure on an otherwise idle machine)::

    python tests/benchmarks/test_bench_workers.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pflbench.results import iter_runs

SEEDS = tuple(range(24))
METHODS = ("local", "fedavg")


def write_batch_suite(folder: Path, threads: int | None = None) -> Path:
    """48 small runs (2 methods × 24 seeds, 32 px), under a second each."""
    raw = {
        "name": "bench-workers",
        "datasets": [
            {
                "name": "synthetic",
                "options": {
                    "flavour": "prostate",
                    "size": 32,
                    "sites": 2,
                    "images_per_site": [12, 12],
                },
            }
        ],
        "methods": list(METHODS),
        "seeds": list(SEEDS),
        "model": {"name": "unet", "options": {"base": 8, "depth": 2}},
        "protocol": {
            "rounds": 8,
            "local_epochs": 2,
            "batch_size": 4,
            "device": "cpu",
            "threads": threads,
            "optimizer": {"name": "adam", "lr": 0.03},
        },
    }
    path = folder / f"bench-workers-{threads or 'free'}.yaml"
    path.write_text(json.dumps(raw))
    return path


def run_batch(suite: Path, out: Path, workers: int) -> float:
    """Wall seconds of one ``pflbench run`` into a fresh folder; checks every run finished."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pflbench.cli", "run", str(suite), "--workers", str(workers)]
    cmd += ["--out", str(out), "--no-report", "-q"]
    t0 = time.perf_counter()
    subprocess.run(
        cmd, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - t0
    done = [m for _, m in iter_runs(out)]
    assert len(done) == len(SEEDS) * len(METHODS), f"{len(done)} runs finished"
    return wall


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, None], ids=["threads1", "threads-free"])
@pytest.mark.parametrize("workers", [1, 2])
def test_bench_run_workers(benchmark, tmp_path, workers, threads):
    suite = write_batch_suite(tmp_path, threads)
    out = tmp_path / "out"
    cpus = len(os.sched_getaffinity(0))
    benchmark.extra_info.update(runs=len(SEEDS) * len(METHODS), cpus=cpus, workers=workers)
    benchmark.pedantic(run_batch, args=(suite, out, workers), rounds=1, iterations=1)
    share = max(1, cpus // workers)
    assert {m["threads"] for _, m in iter_runs(out)} == {share if threads is None else 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="alternating measurements per count")
    ap.add_argument("--threads", choices=["1", "free", "both"], default="both")
    args = ap.parse_args()
    settings = {"1": [1], "free": [None], "both": [1, None]}[args.threads]
    cpus = len(os.sched_getaffinity(0))
    runs = len(SEEDS) * len(METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        for threads in settings:
            suite = write_batch_suite(Path(tmp), threads)
            times: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeat):
                for workers in (1, 2):
                    wall = run_batch(suite, Path(tmp) / f"out{workers}", workers)
                    times[workers].append(wall)
                    print(
                        f"threads {threads or 'free'}, --workers {workers}: {wall:.1f} s",
                        flush=True,
                    )
            best1, best2 = min(times[1]), min(times[2])
            pairs = sorted(a / b for a, b in zip(times[1], times[2], strict=True))
            print(
                f"{runs} runs, threads {threads or 'free'}, {cpus} CPUs (load average "
                f"{os.getloadavg()[0]:.1f}): --workers 1 {best1:.1f} s, --workers 2 {best2:.1f} s, "
                f"throughput ratio {best1 / best2:.2f}x (best of each); per pair "
                f"{', '.join(f'{r:.2f}' for r in pairs)}, median {statistics.median(pairs):.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
