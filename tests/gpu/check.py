"""The prepared GPU check (issue 18): one script, under 5 minutes on one GPU, for the day a GPU
is lent. It is not a pytest test (it needs a device and writes a report); ``check.sh`` runs it.

    python tests/gpu/check.py                      # on CUDA: every check, report to reports/benchmarks/
    python tests/gpu/check.py --device cpu --tiny --out /tmp/gpu-check.md   # the CI dry run

Checks, each a section of the Markdown report:
1. every registered built-in method for ``--rounds`` rounds at ``--size`` px on the device: any
   device error (a CPU tensor meeting a CUDA one, a missing ``.to``) fails the check;
2. float32 vs bf16 vs fp16 (with its gradient scaler) autocast, and channels_last, on a short
   FedAvg run: client-macro test Dice within ``--tol`` of float32, and training images/s of each;
3. images/s of the engine's local training vs a plain PyTorch loop over the same batches;
4. throughput of 1, 2 and 4 runs packed on one device (separate processes, the way
   ``--workers`` / ``workers_per_gpu`` packs them), as training images/s summed over the
   processes, and what ``workers_per_gpu: auto`` would choose from one run's peak memory.
The exit code is 1 when check 1 or 2 fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def federation(size: int, images: int, sites: int = 3):
    from pflbench.datasets.synthetic import Synthetic

    return Synthetic(flavour="fundus", size=size, images_per_site=[images] * sites, seed=0).load()


def protocol(device: str, rounds: int, **over):
    from pflbench.suite import OptimizerSpec, Protocol

    base = dict(
        rounds=rounds,
        local_epochs=1,
        batch_size=8,
        device=device,
        surface_metrics=False,
        optimizer=OptimizerSpec(lr=1e-3),
    )
    base.update(over)
    return Protocol(**base)


def run_once(method: str, data, proto, seed: int = 0):
    from pflbench.data import make_splits
    from pflbench.engine import Federation
    from pflbench.registry import get_method
    from pflbench.suite import ModelSpec

    fed = Federation(
        data, make_splits(data), get_method(method)(), ModelSpec(name="unet"), proto, seed
    )
    return fed.run()


def macro_test_dice(out) -> float:
    cases = out.cases.query("split == 'test' and selection == 'best'")
    return float(cases.groupby("client")["dice"].mean().mean())


def check_methods(args, data) -> list[tuple[str, str, str, float]]:
    from pflbench.docs import builtin_methods

    rows = []
    for name in sorted(builtin_methods()):
        t0 = time.perf_counter()
        placement = "?"
        try:
            out = run_once(name, data, protocol(args.device, args.rounds))
            status, placement = out.info["status"], out.info["data_placement"]
        except Exception as exc:  # the check is whether any method fails on the device
            status = f"FAILED: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        rows.append((name, status, placement, time.perf_counter() - t0))
        print(f"{name}: {status}", flush=True)
    return rows


#: The precision variants of check 2: (label, protocol overrides).
VARIANTS = [
    ("fp32", {}),
    ("bf16", {"amp": "bf16"}),
    ("fp16 + scaler", {"amp": "fp16"}),
    ("fp32, channels_last", {"channels_last": True}),
    ("bf16, channels_last", {"amp": "bf16", "channels_last": True}),
]


def check_amp(args, data) -> list[tuple[str, float, float]]:
    """(variant, client-macro test Dice, training images/s) of each precision variant."""
    rows = []
    for label, over in VARIANTS:
        out = run_once("fedavg", data, protocol(args.device, args.amp_rounds, **over))
        ips = out.info["budget"]["local"] / out.info["timings"]["train_s"]
        rows.append((label, macro_test_dice(out), ips))
        print(f"{label}: Dice {rows[-1][1]:.3f}, {ips:.1f} images/s", flush=True)
    return rows


def plain_loop_images_per_s(args, data) -> float:
    """A plain PyTorch loop (Adam, the same loss, the same batches) over site 0's images."""
    from pflbench.engine import build_model
    from pflbench.suite import ModelSpec
    from pflbench.training import segmentation_loss

    device = torch.device(args.device)
    model = build_model(ModelSpec(name="unet"), data, 0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = data.sites[0].images.to(device), data.sites[0].labels.to(device)
    n = 0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for i in range(0, len(x_all), 8):
            x, y = x_all[i : i + 8], y_all[i : i + 8]
            if len(x) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            segmentation_loss(model(x), y).backward()
            opt.step()
            n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t0)


def engine_images_per_s(args, data) -> float:
    return engine_run(args, data)[0]


def engine_run(args, data) -> tuple[float, float]:
    """(training images/s, peak device memory MiB; 0 on the CPU) of one FedAvg run."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = run_once("fedavg", data, protocol(args.device, args.rounds))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return out.info["budget"]["local"] / out.info["timings"]["train_s"], peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def packed_throughput(args, k: int) -> float:
    """Training images/s summed over ``k`` processes sharing the device."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one-run",
        "--device",
        args.device,
        "--size",
        str(args.size),
        "--images",
        str(args.images),
        "--rounds",
        str(args.rounds),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
    total = 0.0
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"packed run failed with exit code {p.returncode}")
        total += json.loads(stdout.strip().splitlines()[-1])["images_per_s"]
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=24, help="images per site (3 sites)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp-rounds", type=int, default=4)
    ap.add_argument("--tol", type=float, default=0.1, help="largest |Dice fp32 − Dice bf16|")
    ap.add_argument("--pack", default="1,2,4", help="run counts to pack on one device")
    ap.add_argument("--out", type=Path, default=None, help="the Markdown report")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="the CI dry run: 16 px, 6 images per site, 1 round, packs of 1 and 2",
    )
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.images, args.rounds, args.amp_rounds, args.pack = 16, 6, 1, 1, "1,2"
        args.tol = 1.0  # one round at 16 px decides nothing about precision: the path is checked
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    data = federation(args.size, args.images)
    if args.one_run:
        print(json.dumps({"images_per_s": engine_images_per_s(args, data)}))
        return 0

    from pflbench.packing import per_gpu_from_peak

    started = time.perf_counter()
    methods = check_methods(args, data)
    variants = check_amp(args, data)
    (engine_ips, peak_mb), plain_ips = engine_run(args, data), plain_loop_images_per_s(args, data)
    packed = {k: packed_throughput(args, k) for k in map(int, args.pack.split(","))}
    wall = time.perf_counter() - started
    if args.device == "cuda":
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        auto = per_gpu_from_peak(peak_mb, total_mb, cap=os.cpu_count() or 1)
        auto_line = (
            f"One run peaks at {peak_mb:.0f} MiB of {total_mb:.0f} MiB: `workers_per_gpu: auto` "
            f"would pack {auto} runs (capped by {os.cpu_count()} CPUs)."
        )
    else:
        auto_line = "No GPU: `workers_per_gpu: auto` is not measured."
    fp32 = variants[0][1]

    device_name = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.device} (no GPU)"
    )
    failed = [m for m, s, _, _ in methods if s.startswith("FAILED")]
    amp_ok = all(abs(fp32 - d) <= args.tol for _, d, _ in variants)
    lines = [
        f"# GPU check, {date.today().isoformat()}",
        "",
        f"Device: {device_name}; torch {torch.__version__}. Command: `python tests/gpu/check.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + f"`. Synthetic fundus, 3 sites × {args.images} images at {args.size} px, default "
        f"U-Net, batch 8. Wall time {wall:.0f} s.",
        "",
        f"## 1. Every method, {args.rounds} rounds on the device",
        "",
        "| method | status | data placement | wall s |",
        "|---|---|---|---|",
        *[f"| {m} | {s} | {p} | {t:.1f} |" for m, s, p, t in methods],
        "",
        f"## 2. Precision and layout (FedAvg, {args.amp_rounds} rounds, client-macro test Dice)",
        "",
        f"Tolerance |Δ Dice| ≤ {args.tol} against fp32: {'met' if amp_ok else 'NOT MET'}.",
        "",
        "| variant | Dice | Δ vs fp32 | training images/s | speed-up vs fp32 |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {d:.3f} | {d - fp32:+.3f} | {ips:.1f} | {ips / variants[0][2]:.2f} |"
            for label, d, ips in variants
        ],
        "",
        "## 3. Engine vs a plain PyTorch loop (training images/s, one process)",
        "",
        "| engine | plain loop | ratio |",
        "|---|---|---|",
        f"| {engine_ips:.1f} | {plain_ips:.1f} | {engine_ips / plain_ips:.2f} |",
        "",
        "## 4. Runs packed on one device (training images/s summed over the processes)",
        "",
        "| runs | images/s | vs one run |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {v / packed[min(packed)]:.2f} |" for k, v in packed.items()],
        "",
        auto_line,
        "",
    ]
    text = "\n".join(lines)
    out = args.out or ROOT / "reports" / "benchmarks" / f"gpu-check-{date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"report: {out}")
    return 1 if failed or not amp_ok else 0


if __name__ == "__main__":
    sys.exit(main())
