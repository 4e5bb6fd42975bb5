"""FedALA: on receipt, learn element-wise weights that blend the global model into the local one."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from pflbench.aggregation import merge_into
from pflbench.client import Client
from pflbench.data import SiteData
from pflbench.messages import Message
from pflbench.method import Method
from pflbench.methods._common import frozen
from pflbench.params import Param
from pflbench.partition import Partition, parameter_entries
from pflbench.training import check_finite

WEIGHTS, STARTED = "fedala/weights", "fedala/started"


def ala_tensors(model: nn.Module, p: int) -> list[str]:
    """Names of the top ``p`` parameter tensors, counted from the end of ``named_parameters()``;
    ``p = 0`` (or p ≥ their number) selects all of them."""
    names = [n for n, _ in model.named_parameters()]
    return names if p <= 0 or p >= len(names) else names[-p:]


class FedALA(Method):
    """FedAvg whose clients blend the received global model into their own by element-wise
    weights W ∈ [0, 1] learned on local training data (adaptive local aggregation, ALA).

    Paper: Zhang, Hua, Wang, Song, Xue, Ma, Guan, "FedALA: Adaptive Local Aggregation for
    Personalized Federated Learning", AAAI 2023 (arXiv 2212.01197); details follow the official
    code (TsingZ0/FedALA, ``ALA.py``).

    On receipt of w (``receive``): every parameter outside the top-p tensors ← w; for the top p
    parameter tensors, θ̂ = θᵢ + (w − θᵢ) ⊙ W, where W (initialised to
    ones, kept in ``client.state`` across rounds) is learned by W ← clip(W − η·∇_θ̂ f ⊙ (w − θᵢ),
    0, 1) on a random s% (``s``, default 80) of the client's *training* data, on a temporary
    copy with the lower parameters frozen. The first time ALA runs for a client it repeats
    epochs until the loss settles (standard deviation of the last ``window`` epoch losses below
    ``threshold``; at most ``max_first_epochs`` epochs), afterwards one epoch per round. Then the
    client trains normally (FedAvg's local update). ALA is skipped while θᵢ equals w on the top
    tensors (the first round: nothing to blend).

    Unit of p: **parameter tensors** (weights and biases count separately), counted from the end
    of ``model.named_parameters()``; p = 0 means all, as in the official code. Default p = 2: the
    last layer's weight and bias (the paper's "p = 1 layer"; for the U-Nets the 1×1 head).

    Buffers: as in the official code, which builds, uploads, averages and blends
    ``parameters()`` only, the BN running statistics are never sent, averaged or overwritten:
    each client keeps its own (the partition shares parameters only). Choices: ALA runs in
    ``receive`` for every client that receives w (as the official server sends to all clients),
    so the evaluated model θᵢ is the blended one; the epoch loss recorded for the settling rule
    is the epoch's mean (the official code records the last batch's). Extra local passes (budget
    label ``ala``): the ALA epochs. Evaluated model: θᵢ (the client model). Optimizer state
    reset every round.
    """

    name = "fedala"
    newcomer = (
        "global parameters; BN statistics (never sent) recomputed on the new site's unlabelled "
        "train images; no ALA blend (it needs labels)"
    )
    paper = "Zhang et al., AAAI 2023, arXiv:2212.01197"
    official_code = "TsingZ0/FedALA (ALA.py); PFLlib clientala"
    shares = "parameters (weights, biases, BN γ/β); never buffers"
    personal = "BN running statistics; the ALA weights W"
    evaluates = "θᵢ: the ALA blend of w into the client's model, then trained"
    extra_passes = "`ala`: the ALA weight-learning epochs on s % of the training data"
    deviations: ClassVar[tuple[str, ...]] = (
        "the settling rule reads the mean loss of each ALA epoch (the official code: its last "
        "batch's loss)",
    )
    params = {
        "p": Param(
            2, valid=(0, None), help="top parameter tensors (from the end) that ALA blends; 0 = all"
        ),
        "s": Param(
            80.0, low=5.0, high=100.0, valid=(1, 100), help="percent of local training data for ALA"
        ),
        "eta": Param(
            1.0,
            low=0.01,
            high=10.0,
            log=True,
            valid=(0, None),
            help="learning rate of the weights W",
        ),
        "threshold": Param(
            0.1, valid=(0, None), help="first ALA: stop when the loss std falls below this"
        ),
        "window": Param(
            10, valid=(2, None), help="first ALA: number of recent epoch losses in the std"
        ),
        "max_first_epochs": Param(20, valid=(1, None), help="first ALA: bound on its epochs"),
    }

    def partition(self, model: nn.Module) -> Partition:
        """Parameters only: buffers (BN running statistics) stay with the client."""
        return parameter_entries(model)

    def receive(self, client: Client, message: Message) -> None:
        model = client.model
        top = ala_tensors(model, self.p)
        with torch.no_grad():
            state = model.state_dict()
            local = {k: state[k].detach().clone() for k in top}
            merge_into(state, message, self.client_partition(client))
            glob = {k: state[k].detach().clone() for k in top}
            if all(torch.equal(local[k], glob[k]) for k in top):
                return
            weights = client.state.get(WEIGHTS) or {k: torch.ones_like(local[k]) for k in top}
        weights = self._learn(client, top, local, glob, weights)
        with torch.no_grad():
            for k in top:
                state[k].copy_(local[k] + (glob[k] - local[k]) * weights[k])
        client.state[WEIGHTS] = weights
        client.state[STARTED] = True

    def _sample(self, client: Client) -> SiteData:
        data = client.train_data
        n = len(data)
        m = min(n, max(2, int(self.s / 100 * n)))
        idx = torch.randperm(n, generator=client.generator("ala-sample"))[:m].sort().values
        on = idx.to(data.images.device)  # the site's data may live on the GPU
        return SiteData(
            name=data.name,
            images=data.images.index_select(0, on),
            labels=data.labels.index_select(0, on),
            case_ids=[data.case_ids[i] for i in idx.tolist()],
            slice_index=[data.slice_index[i] for i in idx.tolist()],
            spacing=data.spacing,
        )

    def _learn(
        self,
        client: Client,
        top: list[str],
        local: dict[str, torch.Tensor],
        glob: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The weight-learning loop on a temporary model (lower parameters already ← w)."""
        tmp = client.new_model()
        params = dict(tmp.named_parameters())
        lower = [p for n, p in params.items() if n not in top]
        tops = [params[k] for k in top]
        weights = {k: w.clone() for k, w in weights.items()}
        with torch.no_grad():
            for k in top:
                params[k].copy_(local[k] + (glob[k] - local[k]) * weights[k])
        subset = self._sample(client)
        first = not client.state.get(STARTED, False)
        where = f"client {client.id} round {client.round} (ala)"
        losses: list[float] = []
        tmp.train()
        with frozen(lower):
            for _ in range(self.max_first_epochs if first else 1):
                epoch: list[float] = []
                for x, y in client.batches("ala", epochs=1, data=subset):
                    loss = client.loss(tmp(x), y)
                    check_finite(loss, where)
                    grads = torch.autograd.grad(loss, tops)
                    with torch.no_grad():
                        for k, g in zip(top, grads, strict=True):
                            diff = glob[k] - local[k]
                            weights[k] = torch.clamp(weights[k] - self.eta * g * diff, 0, 1)
                            params[k].copy_(local[k] + diff * weights[k])
                    epoch.append(float(loss.detach()))
                losses.append(float(np.mean(epoch)))
                if len(losses) > self.window and np.std(losses[-self.window :]) < self.threshold:
                    break
        return weights
