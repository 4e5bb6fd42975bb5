"""Shared fixtures: a tiny in-memory federation and a fast protocol, so core tests run in seconds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.suite import ModelSpec, OptimizerSpec, Protocol


def blob_site(
    name: str, n: int, size: int = 16, seed: int = 0, brightness: float = 0.0
) -> SiteData:
    """Bright disks on noise: learnable in a few steps, different per seed and brightness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, 1, size, size), np.float32)
    labels = np.empty((n, size, size), np.int64)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.15, size * 0.3)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = 0.3 + brightness + 0.4 * mask + 0.1 * rng.standard_normal((size, size))
        images[i, 0] = np.clip(img, 0, 1)
        labels[i] = mask
    return SiteData(
        name=name,
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        case_ids=[f"{name}-c{i}" for i in range(n)],
    )


def tiny_federation(
    n_sites: int = 3,
    n: int = 10,
    size: int = 16,
    identical: bool = False,
    sizes: Sequence[int] | None = None,
) -> FederatedData:
    """``n_sites`` sites of ``n`` images each, or one site per entry of ``sizes`` (unequal sizes
    are what makes a weighting bug visible: with equal n a plain mean is the weighted mean)."""
    counts = list(sizes) if sizes is not None else [n] * n_sites
    sites = []
    for k, count in enumerate(counts):
        seed = 0 if identical else k
        sites.append(
            blob_site(f"site{k}", count, size, seed=seed, brightness=0.0 if identical else 0.1 * k)
        )
    return FederatedData(
        name="tiny",
        sites=sites,
        classes=["background", "blob"],
        structures={"blob": [1]},
    )


@pytest.fixture
def tiny() -> FederatedData:
    return tiny_federation()


@pytest.fixture
def tiny_splits(tiny: FederatedData) -> dict:
    return make_splits(tiny)


def fast_protocol(**over) -> Protocol:
    base = {
        "rounds": 2,
        "local_epochs": 2,
        "batch_size": 4,
        "threads": 1,
        "device": "cpu",
        "surface_metrics": False,
        "optimizer": OptimizerSpec(lr=1e-2),
    }
    base.update(over)
    return Protocol(**base)


TINY_MODEL = ModelSpec(name="unet", options={"base": 4, "depth": 2})


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
