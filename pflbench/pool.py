"""The local worker processes of ``pflbench run --workers N``: thread and GPU shares, start, stop.

Children are started before the parent has imported torch or set the sweep up, so that their own
start-up (a couple of seconds of imports) overlaps the parent's; each waits on its stdin for the
word ``go``, sent once the sweep's studies exist. Kept free of torch imports for that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GO = "go"


def cpu_count() -> int:
    """CPUs this process may use (affinity and cgroup-limited containers included)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, n)


def thread_share(workers: int, cpus: int | None = None) -> int:
    """Torch threads per worker: the CPUs split evenly, at least one each."""
    return max(1, (cpus or cpu_count()) // max(1, workers))


def resolve_workers(value: Any, threads: Any = None, cpus: int | None = None) -> int:
    """Worker processes for a ``workers`` setting: an int as is; ``auto`` one per ``threads``
    CPUs (all CPUs to one worker when threads are not pinned); anything else 1."""
    cpus = cpus or cpu_count()
    if value == "auto":
        per = threads if isinstance(threads, int) and threads > 0 else cpus
        return max(1, cpus // per)
    return value if isinstance(value, int) and value > 0 else 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, else every device torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if sys.platform == "linux" and not Path("/proc/driver/nvidia").exists():
        return []  # no NVIDIA driver: no need to import torch to find out
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_workers(per_gpu: int, gpus: int, cpus: int | None = None) -> int:
    """Workers for ``workers_per_gpu``: ``per_gpu`` on each GPU, but never more than the CPUs
    (each run still needs a core to feed its GPU)."""
    if per_gpu < 1 or gpus < 1:
        raise ValueError(f"need at least one worker per GPU and one GPU, got {per_gpu}, {gpus}")
    return max(1, min(per_gpu * gpus, cpus or cpu_count()))


def choose_workers(
    cli: Any,
    suite_workers: Any,
    threads: Any,
    per_gpu: int | str | None,
    gpus: Sequence[str],
    probe: Any = None,
) -> int:
    """The worker count of ``pflbench run``: ``--workers`` when given; else, with GPUs visible
    and ``workers_per_gpu`` set, that many per GPU (``auto``: ``probe()``, called only then,
    returns it); else the suite's ``workers``."""
    if cli is not None:
        return resolve_workers(cli, threads)
    if per_gpu is not None and gpus:
        n = probe() if per_gpu == "auto" else per_gpu
        return gpu_workers(int(n), len(gpus))
    return resolve_workers(suite_workers, threads)


def gpu_assignment(workers: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per worker: GPUs dealt round-robin (so ``workers_per_gpu`` × GPUs
    workers put that many on each GPU); None without GPUs. Worker 0 is the process that starts
    the others and keeps its default device, the first visible GPU."""
    gpus = visible_gpus()
    if not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(workers)]


def start_children(
    suite_path: str,
    out: str | Path | None,
    storage_url: str | None,
    workers: int,
    overrides: Sequence[str] = (),
) -> list[subprocess.Popen[bytes]]:
    """Start workers 1..N-1 as ``pflbench worker --wait-go`` processes with their thread share
    and GPU; they do their imports, then wait for :func:`release` before reading the suite.
    The storage URL goes to them in ``PFLBENCH_STORAGE``, never on their command lines.
    ``out`` and ``storage_url`` may be left to the suite's defaults, as on the command line;
    ``overrides`` (``--set``) reach every child, so that all workers read the same suite."""
    share = thread_share(workers)
    gpus = gpu_assignment(workers)
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(1, workers):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(share)
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        if storage_url is not None:  # by environment: a password on a command line is in `ps`
            env["PFLBENCH_STORAGE"] = storage_url
        cmd = [sys.executable, "-m", "pflbench.cli", "worker", suite_path]
        cmd += ["--out", str(out)] if out is not None else []
        for item in overrides:
            cmd += ["--set", item]
        cmd += ["--threads", str(share), "--index", str(i), "--quiet", "--wait-go"]
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE))
    return procs


def release(procs: list[subprocess.Popen[bytes]]) -> None:
    """Let waiting children start taking trials."""
    for p in procs:
        if p.stdin is None:
            continue
        try:
            p.stdin.write(f"{GO}\n".encode())
            p.stdin.close()
        except (BrokenPipeError, OSError):  # a child that already died: its exit code tells
            pass


def wait_for_go() -> bool:
    """In a child: block until the parent says go (True) or closes the pipe without it (False,
    e.g. the parent failed to set the sweep up)."""
    return sys.stdin.readline().strip() == GO


def stop_children(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM: each child closes its running trial as failed and queues its retry."""
    for p in procs:
        if p.stdin is not None and not p.stdin.closed:
            try:
                p.stdin.close()  # a child still waiting for go exits
            except OSError:
                pass
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
