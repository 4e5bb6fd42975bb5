"""pytest-benchmark: the cost of a ResFIM round against a FedBN round, and of the Fisher estimators.

Run with ``pytest tests/benchmarks/test_bench_resfim.py --benchmark-enable``; without it each
benchmark runs once, as a smoke test. Compare the means inside the ``round`` group: the spec's
goal is a ResFIM round at most about 1.5× a FedBN round at default settings (resfim.md §8).

A round is the engine's own round (every client's local update and upload, the aggregation, every
client's receipt), timed after the setup and the warm-up round, so a ResFIM round includes its
Fisher passes and its mask computation. Data: the synthetic fundus flavour at 32×32, 4 sites of
32 images (about 22 for training) or, with ``--benchmark-enable`` only, 128 images (about 90);
the suites' U-Net (base 8), one local epoch; and, also only with ``--benchmark-enable``, four
sites sized like Fed-Fundus (101/159/400/400 images) under the medseg suite's two local epochs.
ResFIM's Fisher work per mask round is fixed (K × ``fisher_samples`` = 64 per-sample gradients
per client, each about as dear as one training sample) while the local budget grows with the site,
so the ratio to FedBN is about 1 + K·fisher_samples / (epochs · training images): the small sites
are the hard case.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pflbench.data import FederatedData, make_splits
from pflbench.datasets.synthetic import Synthetic
from pflbench.engine import Federation
from pflbench.fisher import batch_fisher, per_sample_fisher
from pflbench.models import UNet
from pflbench.registry import get_method
from pflbench.suite import ModelSpec, OptimizerSpec, Protocol

MODEL = ModelSpec(name="unet", options={"base": 8, "depth": 3})
PROTOCOL = Protocol(
    rounds=100,
    local_epochs=1,
    batch_size=8,
    threads=1,
    device="cpu",
    surface_metrics=False,
    optimizer=OptimizerSpec(lr=1e-3),
)


# the medseg suite's protocol (2 local epochs) on a federation sized like Fed-Fundus
MEDSEG_PROTOCOL = PROTOCOL.model_copy(update={"local_epochs": 2})
FUNDUS_SITES = (101, 159, 400, 400)

_DATA: dict[tuple[int, ...], FederatedData] = {}


def _data(sites: tuple[int, ...]) -> FederatedData:
    if sites not in _DATA:
        _DATA[sites] = Synthetic(
            flavour="fundus", size=32, images_per_site=list(sites), seed=0
        ).load()
    return _DATA[sites]


def _federation(
    data: FederatedData, method: str, protocol: Protocol = PROTOCOL, **params
) -> Federation:
    fed = Federation(data, make_splits(data), get_method(method)(**params), MODEL, protocol, 0)
    fed._setup()
    fed._round(1)  # the warm-up round: after it ResFIM computes masks every round
    return fed


ROUNDS = [
    ("32img", "fedbn", {}),
    ("32img", "resfim", {}),
    ("32img", "resfim", {"fisher": "batch"}),
    ("32img", "resfim", {"mask": "random"}),
    ("32img", "resfim", {"mask_every": 2}),
    ("128img", "fedbn", {}),
    ("128img", "resfim", {}),
    ("fundus-sized", "fedbn", {}),
    ("fundus-sized", "resfim", {}),
]
SETTINGS = {
    "32img": ((32,) * 4, PROTOCOL, "round, 32 images per site, 1 local epoch"),
    "128img": ((128,) * 4, PROTOCOL, "round, 128 images per site, 1 local epoch"),
    "fundus-sized": (
        FUNDUS_SITES,
        MEDSEG_PROTOCOL,
        "round, Fed-Fundus site sizes 101/159/400/400, 2 local epochs (medseg suite)",
    ),
}


@pytest.mark.parametrize(
    "setting, method, params",
    ROUNDS,
    ids=[f"{s}-{m}" + "".join(f"-{k}={v}" for k, v in p.items()) for s, m, p in ROUNDS],
)
def test_round(benchmark, setting: str, method: str, params: dict) -> None:
    if setting != "32img" and benchmark.disabled:
        pytest.skip("the larger sites only run with --benchmark-enable")
    torch.set_num_threads(1)
    sites, protocol, group = SETTINGS[setting]
    fed = _federation(_data(sites), method, protocol, **params)
    counter = itertools.count(2)
    benchmark.group = group
    benchmark.pedantic(lambda: fed._round(next(counter)), rounds=4, iterations=1)
    done = next(counter) - 2
    fisher = fed.budget.samples.get("fisher", 0)
    if method == "resfim" and params.get("mask") != "random":
        every = params.get("mask_every", 1)
        mask_rounds = len([r for r in range(2, 2 + done) if (r - 2) % every == 0])
        assert fisher == 4 * 16 * 4 * mask_rounds  # clients × fisher_samples × (1 + 3 styles)
    else:
        assert fisher == 0


@pytest.mark.parametrize("estimator", ["per_sample", "batch"])
def test_fisher(benchmark, estimator: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UNet(3, 3, base=8, depth=3)
    site = _data((32,) * 4).sites[0]
    x, y = site.images[:16], site.labels[:16]
    fn = per_sample_fisher if estimator == "per_sample" else batch_fisher
    benchmark.group = "fisher (16 images)"
    scores = benchmark.pedantic(lambda: fn(model, x, y), rounds=4, iterations=1)
    assert set(scores) == {k for k, _ in model.named_parameters()}
    assert all(bool(torch.isfinite(v).all()) for v in scores.values())
