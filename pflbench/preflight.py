"""Checks made before any training: a sweep must not find out after hours of work that it cannot
write its results, that the device it asked for is missing or that a dataset folder is absent.

Each problem is one line naming the thing and the fix; ``pflbench run`` and ``pflbench worker``
print them all and exit 2 with nothing trained.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pflbench.suite import Suite

#: Room a run's tidy results take at most on the suites we ship (rounds, cases, manifest; ~0.2 MB
#: measured on the quick suite), with a margin: the free-disk check asks for this per planned run.
RESULT_MB_PER_RUN = 2.0


def check_output(out: Path, planned_runs: int) -> list[str]:
    """The run folder can be created and written, and has room for the planned results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".pflbench-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return [f"{out}: the run folder cannot be written ({reason}); choose another --out"]
    free_mb = shutil.disk_usage(out).free / 2**20
    need_mb = planned_runs * RESULT_MB_PER_RUN + 64
    if free_mb < need_mb:
        return [
            f"{out}: {free_mb:.0f} MiB free, about {need_mb:.0f} MiB needed for {planned_runs} "
            "runs' results; free some space or choose another --out"
        ]
    return []


def check_device(device: str) -> list[str]:
    """``device: cuda`` needs a CUDA device that torch can see."""
    if device != "cuda":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    built = "a CUDA build" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return [
        f"protocol.device: cuda, but torch {torch.__version__} ({built}) sees no CUDA device"
        f"{hint}; use device: auto or cpu, or run on a machine with a GPU"
    ]


def check_datasets(suite: Suite) -> list[str]:
    """Every dataset that names a ``root`` folder finds it."""
    problems = []
    for i, d in enumerate(suite.datasets):
        root = d.options.get("root")
        if root is None:
            continue
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            problems.append(
                f"datasets[{i}] ({d.key}): root folder {path} does not exist; fix `root` (or "
                f"$PFLBENCH_DATA) and check it with `pflbench data check {d.name} --root DIR`"
            )
    return problems


def preflight(suite: Suite, out: Path, planned_runs: int) -> list[str]:
    """All problems that would stop the sweep, before anything is trained."""
    return (
        check_output(out, planned_runs)
        + check_device(suite.protocol.device)
        + check_datasets(suite)
    )
