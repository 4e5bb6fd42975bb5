"""What suites/resfim-paper.yaml costs: one measured round per dataset at full image size on this
machine, and a projection of the whole suite (a measurement script, not a test).

    python tests/benchmarks/paper_cost.py [--images 24] [--threads 2] [--method resfim]

Per dataset it builds two sites of ``--images`` random images at the dataset's full input size
(prostate and vessels 3×256×256, gland 3×192×384), runs one round of the suite's method through
the engine under the suite's protocol for that dataset and model (evaluation and the final
per-case scoring included), and prints the engine's timings. The projection scales the measured
per-image training and validation costs to the site sizes given in ``SIZES`` (assumptions, stated
there) for T rounds, and converts training FLOPs into GPU-hours at an assumed effective
throughput (``--gpu-tflops``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation, build_method, build_model
from pflbench.suite import MethodSpec, parse_suite

SUITE = Path(__file__).resolve().parents[2] / "suites" / "resfim-paper.yaml"

#: Images per dataset used for the projection: ASSUMPTIONS, not read from data (none is here).
#: prostate: 116 SAML cases × ~18 foreground slices; vessels: the six public sets' image counts
#: (CHASE 28, DR HAGIS 40, DRIVE 40, HRF 45, LES-AV 22, ORVS 49); gland: MGD-1K's 1000 images
#: (the benchmark's "Subset" may be smaller) + CAMG taken as 1000.
SIZES = {"prostate": 116 * 18, "vessel": 224, "gland": 2000}
HW = {"prostate": (256, 256), "vessel": (256, 256), "gland": (192, 384)}


def random_federation(n: int, hw: tuple[int, int], seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    sites = []
    for s in range(2):
        x = rng.random((n, 3, *hw), dtype=np.float32)
        y = (x[:, 0] > 0.7).astype(np.int64)
        ids = [f"s{s}-{i}" for i in range(n)]
        sites.append(SiteData(f"s{s}", torch.from_numpy(x), torch.from_numpy(y), ids))
    return FederatedData("cost", sites, ["background", "fg"], {"fg": [1]})


def train_flops(model: torch.nn.Module, hw: tuple[int, int]) -> float:
    """FLOPs of one training image: forward counted, backward taken as twice the forward."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, *hw)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return 3.0 * fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24, help="images per site (two sites)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--method", default="resfim")
    ap.add_argument("--gpu-tflops", type=float, default=10.0, help="assumed effective TFLOP/s")
    args = ap.parse_args()
    suite = _suite()
    torch.set_num_threads(args.threads)
    rows = {}
    for d in suite.datasets:
        proto = suite.protocol_for(d).model_copy(
            update={"rounds": 1, "threads": args.threads, "device": "cpu"}
        )
        data = random_federation(args.images, HW[d.key])
        splits = make_splits(data)
        method = build_method(MethodSpec(name=args.method))
        fed = Federation(data, splits, method, suite.model, proto, seed=0)
        t0 = time.perf_counter()
        out = fed.run()
        wall = time.perf_counter() - t0
        n_train = sum(len(s["train"]) for s in splits.values())
        n_val = sum(len(s["val"]) for s in splits.values())
        t = out.info["timings"]
        per_train = t["train_s"] / (n_train * suite.protocol.local_epochs)
        flops = train_flops(build_model(suite.model, data, 0).eval(), HW[d.key])
        rows[d.key] = {
            "wall_s": round(wall, 1),
            "timings_s": {k: round(v, 1) for k, v in t.items()},
            "train_images": n_train,
            "val_images": n_val,
            "s_per_train_image_epoch": round(per_train, 3),
            "train_gflop_per_image": round(flops / 1e9, 2),
        }
    T, E = suite.protocol.rounds, suite.protocol.local_epochs
    runs_per_dataset = len(suite.methods) * len(suite.seeds)
    total_cpu_h, total_gpu_h = 0.0, 0.0
    for key, r in rows.items():
        n = SIZES[key]
        train_round = r["s_per_train_image_epoch"] * 0.7 * n * E
        r["projected_cpu_round_s"] = round(train_round, 0)
        cpu_h = train_round * T * runs_per_dataset / 3600
        gpu_h = r["train_gflop_per_image"] * 1e9 * 0.7 * n * E * T * runs_per_dataset
        gpu_h /= args.gpu_tflops * 1e12 * 3600
        r["projected_cpu_hours_all_runs"] = round(cpu_h, 0)
        r["projected_gpu_hours_all_runs"] = round(gpu_h, 1)
        total_cpu_h += cpu_h
        total_gpu_h += gpu_h
    print(json.dumps({"threads": args.threads, "method": args.method, "datasets": rows}, indent=2))
    print(
        f"projection for {runs_per_dataset} runs per dataset (T={T}, E={E}), training only: "
        f"{total_cpu_h:.0f} CPU-hours here, {total_gpu_h:.1f} GPU-hours at {args.gpu_tflops:g} "
        "effective TFLOP/s"
    )


def _suite():
    import yaml

    raw = yaml.safe_load(SUITE.read_text())
    for d in raw["datasets"]:  # no data is read: the suite is validated without its roots
        d["name"], d["label"] = "synthetic", d["name"]
        d["options"] = {}
    return parse_suite(raw, str(SUITE))


if __name__ == "__main__":
    main()
