"""Engine overhead: a FedAvg round through the engine vs the same work in a plain PyTorch loop.

Run with ``pytest tests/benchmarks --benchmark-enable``; the goal is a ratio of at most 1.05
(engine / plain), read from the two rows of the ``engine-round`` group measured in one run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pflbench.data import make_splits
from pflbench.datasets.synthetic import Synthetic
from pflbench.engine import Federation, build_model
from pflbench.registry import get_method
from pflbench.suite import ModelSpec, OptimizerSpec, Protocol
from pflbench.training import segmentation_loss

ROUNDS = 10  # about a second each: enough for a stable median on a shared machine
MODEL = ModelSpec(name="unet", options={"base": 16, "depth": 4})
PROTO = Protocol(
    rounds=1,
    local_epochs=1,
    batch_size=8,
    threads=1,
    device="cpu",
    optimizer=OptimizerSpec(lr=1e-3),
)


@pytest.fixture(scope="module")
def data():
    d = Synthetic(flavour="fundus", size=64, images_per_site=[24, 24, 24, 24]).load()
    return d, make_splits(d)


@pytest.mark.benchmark(group="engine-round")
def test_engine_fedavg_round(benchmark, data):
    d, splits = data
    torch.set_num_threads(1)
    fed = Federation(d, splits, get_method("fedavg")(), MODEL, PROTO, seed=0)
    fed._setup()
    benchmark.pedantic(fed._round, args=(1,), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="engine-round")
def test_plain_pytorch_fedavg_round(benchmark, data):
    """The same work without the engine: per client load, train one epoch, average, broadcast."""
    d, splits = data
    torch.set_num_threads(1)
    fed = Federation(d, splits, get_method("fedavg")(), MODEL, PROTO, seed=0)
    clients = [
        (c.train, {k: v.clone() for k, v in fed.model.state_dict().items()}) for c in fed.clients
    ]
    model = build_model(MODEL, d, 0)
    g = torch.Generator().manual_seed(0)

    def one_round():
        states, weights = [], []
        for train, state in clients:
            model.load_state_dict(state)
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
            for ix in torch.randperm(len(train), generator=g).split(8):
                opt.zero_grad(set_to_none=True)
                loss = segmentation_loss(model(train.images[ix]), train.labels[ix])
                loss.backward()
                opt.step()
            states.append(copy.deepcopy(model.state_dict()))
            weights.append(len(train))
        total = sum(weights)
        avg = {
            k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
                v.dtype
            )
            if v.is_floating_point()
            else v
            for k, v in states[0].items()
        }
        for _, state in clients:
            for k, v in avg.items():
                if v.is_floating_point():
                    state[k].copy_(v)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
