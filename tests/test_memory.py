"""Peak memory of the disk-backed client state store stays flat as the number of clients grows.

Each measurement runs in a fresh process (ru_maxrss is a per-process high-water mark). The model
is the default U-Net (1.9 M parameters, 7.8 MB of state per client), so keeping 50 clients in
memory would add ~400 MB; on disk the peak should stay within ~1.2× of the 5-client run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, torch
from pflbench.data import make_splits
from pflbench.datasets.synthetic import Synthetic
from pflbench.engine import Federation
from pflbench.registry import get_method
from pflbench.suite import ModelSpec, Protocol
torch.set_num_threads(1)
n, store = int(sys.argv[1]), sys.argv[2]
d = Synthetic(flavour="fundus", size=32, sites=n, images_per_site=[6] * n).load()
p = Protocol(rounds=2, local_steps=1, batch_size=4, threads=1, device="cpu", store=store, surface_metrics=False)
out = Federation(d, make_splits(d), get_method("fedavg")(), ModelSpec(name="unet"), p, 0).run()
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "status": out.info["status"]}))
"""


def peak(n: int, store: str) -> float:
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n), store], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["status"] == "ok"
    return info["peak_mb"]


@pytest.mark.slow
def test_disk_store_peak_memory_is_flat_in_the_number_of_clients():
    five, fifty = peak(5, "disk"), peak(50, "disk")
    mem50 = peak(50, "memory")
    print(
        f"disk 5 clients {five:.0f} MB, disk 50 clients {fifty:.0f} MB, memory 50 clients {mem50:.0f} MB"
    )
    assert fifty <= 1.2 * five
    assert (
        mem50 > fifty + 200
    )  # the in-memory store really does grow, so the comparison means something
