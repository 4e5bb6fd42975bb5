"""How many runs share one GPU (``workers_per_gpu: auto``): a short probe of each dataset ×
method measures the peak device memory of a run, and the GPU's memory is divided by it.

A small U-Net at batch 8 leaves most of a modern GPU idle, so one run per GPU wastes it; packing
several runs (processes) on one GPU is how the sweep fills it. The probe is one round of one
local step in tuning mode (no test split, no surface distances): it allocates what a run holds
at once (the model, its copies in the client store, a training step's activations, a method's
extra passes, the resident site data), not what a run accumulates over rounds.
"""

from __future__ import annotations

from typing import Any

import torch

#: The share of a GPU's memory the packed runs may plan to use.
HEADROOM = 0.85
#: A CUDA context per process (kernels, cuDNN workspaces), outside max_memory_allocated.
CONTEXT_MB = 600.0


def per_gpu_from_peak(peak_mb: float, total_mb: float, cap: int) -> int:
    """Runs that fit on a GPU of ``total_mb`` when each peaks at ``peak_mb`` (plus its context),
    at least one, at most ``cap`` (the CPUs per GPU that feed them)."""
    if peak_mb < 0 or total_mb <= 0:
        raise ValueError(f"peak {peak_mb} MiB and total {total_mb} MiB must be positive")
    return max(1, min(cap, int(HEADROOM * total_mb // (peak_mb + CONTEXT_MB))))


def probe_peak_mb(suite: Any, device: torch.device) -> float:
    """The largest peak device memory (MiB) over one probe run per dataset × method of ``suite``."""
    from pflbench.engine import Federation, build_method
    from pflbench.runner import DataCache, plan

    if device.type != "cuda":
        raise ValueError(f"the packing probe measures GPU memory; {device} is not a GPU")
    cache = DataCache()
    seen: set[tuple[str, str]] = set()
    peak = 0.0
    for spec in plan(suite, cache):
        pair = (spec.dataset.key, spec.method.key)
        if pair in seen:
            continue
        seen.add(pair)
        data, splits, _ = cache.get(spec.dataset)
        protocol = spec.protocol.model_copy(
            update={
                "rounds": 1,
                "local_steps": 1,
                "local_epochs": None,
                "eval_every": 1,
                "device": "cuda",
                "surface_metrics": False,
            }
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        method = build_method(spec.method)
        Federation(data, splits, method, spec.model, protocol, spec.seed, mode="tune").run()
        peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**20)
    return peak


def auto_per_gpu(suite: Any, cpus: int | None = None) -> tuple[int, float, float]:
    """(runs per GPU, probe peak MiB, GPU total MiB) for the first visible GPU."""
    from pflbench.pool import cpu_count, visible_gpus

    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).total_memory / 2**20
    peak = probe_peak_mb(suite, device)
    gpus = max(1, len(visible_gpus()))
    cap = max(1, (cpus or cpu_count()) // gpus)
    return per_gpu_from_peak(peak, total, cap), peak, total
