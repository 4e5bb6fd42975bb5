"""FedAP: each client receives its own weighted average, weights from BN feature statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._common import local_partition
from pflbench.params import Param
from pflbench.partition import Partition, PartitionError, floating_entries, keys_of_types

STATS = "fedap/bn_stats"  # this client's (mean, var) of the input of every BN layer
SENT = "fedap/sent"  # whether the statistics went up already (they are sent once)
_BN = (nn.modules.batchnorm._BatchNorm,)
#: The official weight of a pair at Wasserstein distance 0 (instead of 1/0).
_SAME = 1e14

LayerStats = list[tuple[torch.Tensor, torch.Tensor]]


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


def bn_input_stats(model: nn.Module, batches) -> LayerStats:
    """Per-channel mean and variance of the input of every BatchNorm layer over ``batches``.

    Eval mode (the official code: ``model.eval()``), so nothing moves. Per batch, mean and
    unbiased variance over (N, H, W) as ``torch.var`` computes them; batches are merged by the
    official ``metacount`` rule (count-weighted, with the between-batch term).
    """
    layers = bn_modules(model)
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        batch.append((x.mean(dims), x.var(dims)))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    count = 0
    means: list[torch.Tensor] = []
    vars_: list[torch.Tensor] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                batch.clear()
                model(x)
                n = len(x)
                if not means:
                    means = [m for m, _ in batch]
                    vars_ = [v for _, v in batch]
                else:
                    total = count + n
                    for i, (tm, tv) in enumerate(batch):
                        new = (means[i] * count + tm * n) / total
                        vars_[i] = (
                            count * (vars_[i] + (new - means[i]).square())
                            + n * (tv + (new - tm).square())
                        ) / total
                        means[i] = new
                count += n
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not means:
        raise ValueError("fedap: no training batch to compute BN statistics from")
    return [(m.float(), v.float()) for m, v in zip(means, vars_, strict=True)]


def bn_distance(a: LayerStats, b: LayerStats) -> float:
    """Σ over layers of the 2-Wasserstein distance between diagonal Gaussians:
    √(‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²) per layer (the official ``get_wasserstein``, mode nosquare)."""
    total = 0.0
    for (m1, v1), (m2, v2) in zip(a, b, strict=True):
        tw = float((m1 - m2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum())
        total += math.sqrt(tw)
    return total


def similarity_weights(
    stats: Mapping[str, LayerStats], momentum: float
) -> dict[str, dict[str, float]]:
    """W: Wᵢᵢ = momentum, Wᵢⱼ ∝ 1/d(i, j) over the others with Σⱼ≠ᵢ Wᵢⱼ = 1 − momentum
    (official ``get_weight_matrix1``). A client alone keeps its own model (Wᵢᵢ = 1)."""
    ids = list(stats)
    out: dict[str, dict[str, float]] = {}
    for i in ids:
        inv = {}
        for j in ids:
            if j != i:
                d = bn_distance(stats[i], stats[j])
                inv[j] = _SAME if d == 0 else 1.0 / d
        if not inv:
            out[i] = {i: 1.0}
            continue
        total = sum(inv.values())
        row = {j: (1.0 - momentum) * w / total for j, w in inv.items()}
        row[i] = momentum
        out[i] = row
    return out


class FedAP(Method):
    """FedAvg warm-up, then a personalized average per client, Σⱼ Wᵢⱼθⱼ, with W from the
    similarity of the clients' BatchNorm feature statistics; BN layers stay local.

    Paper: Lu, Wang, Chen, Qin, Xu, Dimitriadis, Qin, "Personalized Federated Learning with Adaptive
    Batchnorm for Healthcare", IEEE Transactions on Big Data 2022 (arXiv 2112.00734). Checked
    against the official code, microsoft/PersonalizedFL (``alg/fedap.py``, ``alg/core/comm.py``).

    For ``warmup_rounds`` rounds this is FedAvg (every floating entry, BN statistics included).
    The first time a client is selected after that, before training, it runs its training data
    once through its model (the warm-up global model) in eval mode and records the per-channel
    mean and variance of the input of every BatchNorm layer (:func:`bn_input_stats`); it
    uploads them once. The server keeps them, and from then on computes
    Wᵢⱼ (:func:`similarity_weights`: Wᵢᵢ = ``momentum``, the rest ∝ 1 / the summed per-layer
    Wasserstein distance) and sends client i the average Σⱼ Wᵢⱼθⱼ of the uploads over every
    non-BN entry: one message per client. BN layers (affine parameters and running statistics,
    selected by type) never leave the client after the warm-up.

    Departures from the official code: it pretrains a model *centrally*, on 30 % of the pooled
    training data of all clients, and takes W from that model, then trains from scratch; pooled
    data crosses our privacy boundary, so W comes from the FedAvg warm-up model (the reading of
    ``reference/methods.md``) and training continues from it. W is computed over the clients
    that upload in a round (with every client selected, as in the official code, that is all of
    them); a client not selected receives nothing and keeps its model. A model without
    BatchNorm is refused (no statistics to compare; InstanceNorm has none). Segmentation
    changes nothing: the statistics are those of the U-Net's BN inputs. Extra passes: one
    forward pass over the training data, once, under the budget label ``fedap-bn-stats``.
    Evaluated model: the client's (personalized average + own BN layers).
    """

    name = "fedap"
    newcomer = (
        "the uniform average of the final per-client messages; BN layers: initial γ/β, statistics"
        " recomputed on the new site's unlabelled train images"
    )
    paper = "Lu et al., IEEE TBD 2022, arXiv:2112.00734"
    official_code = "microsoft/PersonalizedFL (alg/fedap.py, alg/core/comm.py)"
    shares = "every non-BN entry; after the warm-up client i receives Σⱼ Wᵢⱼθⱼ"
    personal = "BatchNorm layers (affine parameters and running statistics) after the warm-up"
    evaluates = "the client's model (its personalized average + own BN layers)"
    extra_passes = "`fedap-bn-stats`: one forward pass over the training data, once per client"
    deviations: ClassVar[tuple[str, ...]] = (
        "W comes from the FedAvg warm-up model (the official code pretrains centrally on 30 % "
        "of the pooled training data and restarts from scratch)",
        "W is computed over the clients uploading in a round; a client not selected receives "
        "nothing (the official code trains every client every round)",
    )
    params = {
        "momentum": Param(
            0.5, 0.1, 0.9, valid=(0, 1), help="Wᵢᵢ: the weight of the client's own model"
        ),
        "warmup_rounds": Param(
            2, valid=(0, None), help="FedAvg rounds before the BN statistics are taken"
        ),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.bn_stats: dict[str, LayerStats] = {}  # server: every client's statistics, once

    # partition -----------------------------------------------------------------------------
    def partition(self, model: nn.Module) -> Partition:
        """After the warm-up: BatchNorm layers local, everything else shared."""
        keys = keys_of_types(model, _BN)
        if not keys:
            raise PartitionError(
                f"fedap: model {type(model).__name__} has no BatchNorm layer; FedAP compares "
                "clients by BatchNorm feature statistics (use norm: batch)"
            )
        return local_partition(model, keys, self.name, "BatchNorm layers")

    def client_partition(self, client: Client) -> Partition:
        if client.round <= self.warmup_rounds:
            return floating_entries(client.model)
        return self.partition(client.model)

    def setup(self, client: Client) -> None:
        self.partition(client.model)  # refuse a model without BatchNorm before training
        return None

    # client --------------------------------------------------------------------------------
    def local_update(self, client: Client) -> None:
        if client.round > self.warmup_rounds and STATS not in client.state:
            client.state[STATS] = bn_input_stats(
                client.model, client.batches("fedap-bn-stats", epochs=1)
            )
        client.fit()

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        if up is not None and STATS in client.state and not client.state.get(SENT):
            up.extras[STATS] = client.state[STATS]
            client.state[SENT] = True
        return up

    # server --------------------------------------------------------------------------------
    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message | dict[str, Message]:
        if round <= self.warmup_rounds:
            return masked_average(uploads)
        for cid, u in uploads.items():
            if STATS in u.extras:
                self.bn_stats[cid] = u.extras[STATS]
        missing = [cid for cid in uploads if cid not in self.bn_stats]
        if missing:
            raise RuntimeError(f"fedap round {round}: no BN statistics from {missing}")
        weights = self.weights(list(uploads))
        return {
            i: masked_average(
                {j: Upload(entries=uploads[j].entries, weight=w) for j, w in row.items()}
            )
            for i, row in weights.items()
        }

    def weights(self, ids: list[str]) -> dict[str, dict[str, float]]:
        """W over the clients ``ids`` (the server's stored statistics)."""
        return similarity_weights({cid: self.bn_stats[cid] for cid in ids}, self.momentum)
