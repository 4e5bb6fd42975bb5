"""FedAWA: aggregation weights learned on the server from the clients' update vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._generic import Tensors, parameter_values
from pflbench.params import Param


def awa_loss(
    logits: torch.Tensor, previous: torch.Tensor, clients: torch.Tensor, distance: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, p) of the official ``fedawa``: p = softmax(T);
    reg = Σ pᵢ d(w, wᵢ) with d = 1 − cos (``cos``) or the mean squared difference (``euc``);
    sim = Σ pᵢ ‖Δᵢ − Σⱼ pⱼΔⱼ‖₂ with Δᵢ = wᵢ − w; loss = sim + reg.
    ``previous``: the last global parameters (D), ``clients``: K×D."""
    p = torch.softmax(logits, dim=0)
    if distance == "cos":
        cost = 1 - F.cosine_similarity(previous.unsqueeze(0), clients, dim=-1, eps=1e-8)
    elif distance == "euc":
        cost = (clients - previous.unsqueeze(0)).abs().pow(2).mean(-1)
    else:
        raise ValueError(f"fedawa: unknown reg_distance {distance!r}; expected cos or euc")
    deltas = clients - previous.unsqueeze(0)
    mean = p @ deltas
    sim = (p * (deltas - mean.unsqueeze(0)).norm(dim=1)).sum()
    return sim + (p * cost).sum(), p


class FedAWA(Method):
    """Server-side optimisation of aggregation weights from client vectors (updates).

    Paper: Shi et al., "FedAWA: Adaptive Optimization of Aggregation Weights in Federated
    Learning Using Client Vectors", CVPR 2025 (arXiv 2503.15842). Checked against the official
    code (ChanglongShi/FedAWA, ``server_funct.fedawa`` and ``Server_update``), which is followed
    in its details.

    The server keeps a logit Tᵢ per client (first set to the client's normalized aggregation
    weight wᵢ/Σw, as the official code does: logits, not log-weights) and the last global
    parameters w (from ``start_server`` in round 1). Each round, on the flattened parameters:
    ``server_epochs`` steps of a fresh Adam (lr ``server_lr`` = 0.001, betas (0.5, 0.999)) on
    sim + reg (see :func:`awa_loss`), then the aggregate Σ pᵢ γ wᵢ / Σ pᵢ with p = the softmax
    computed at the last step, i.e. **before** that step's update (official order: round 1 uses
    softmax(w/Σw)); the updated T is kept for the next round. γ (``gamma``) = 1 by default.
    Clients train as in FedAvg and send nothing extra; the optimisation is server computation.
    BN running statistics are averaged with the same weights p (not scaled by γ). Evaluated
    model: the global model. Optimizer state reset every round; no extra passes.
    """

    name = "fedawa"
    newcomer = "the final global model (the server's weighted average)"
    paper = "Shi et al., CVPR 2025, arXiv:2503.15842"
    official_code = "ChanglongShi/FedAWA (server_funct.fedawa, Server_update)"
    shares = "every floating-point entry (as FedAvg), averaged with server-learned weights"
    personal = "nothing (the server keeps one aggregation logit per client)"
    deviations: ClassVar[tuple[str, ...]] = (
        "BN running statistics are averaged with the learned weights; the official code's flat parameter vector holds parameters only",
    )
    params = {
        "server_lr": Param(
            0.001, low=1e-4, high=0.1, log=True, valid=(0, None), help="Adam rate on the logits T"
        ),
        "server_epochs": Param(1, valid=(1, None), help="server optimisation steps per round"),
        "gamma": Param(1.0, valid=(0, None), help="γ: scale of the aggregated parameters"),
        "reg_distance": Param(
            "cos", choices=("cos", "euc"), search=False, help="cos | euc: distance of reg"
        ),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.previous: Tensors = {}
        self.logits: dict[str, float] = {}
        self.last_weights: dict[str, float] = {}

    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        self.previous = {n: t.cpu() for n, t in parameter_values(model).items()}

    def learn_weights(self, uploads: Mapping[str, Upload]) -> dict[str, float]:
        """This round's aggregation weights p (and the logits T updated for the next round)."""
        ids = sorted(uploads)
        total = sum(float(uploads[c].weight) for c in ids)
        for c in ids:
            self.logits.setdefault(c, float(uploads[c].weight) / total)
        names = list(self.previous)
        previous = torch.cat([self.previous[n].reshape(-1).float() for n in names])
        clients = torch.stack(
            [
                torch.cat([uploads[c].entries[n].cpu().reshape(-1).float() for n in names])
                for c in ids
            ]
        )
        logits = torch.tensor([self.logits[c] for c in ids], requires_grad=True)
        opt = torch.optim.Adam([logits], lr=self.server_lr, betas=(0.5, 0.999))
        p = torch.softmax(logits.detach(), 0)
        for _ in range(self.server_epochs):
            loss, p = awa_loss(logits, previous, clients, self.reg_distance)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for c, t in zip(ids, logits.detach().tolist(), strict=True):
            self.logits[c] = float(t)
        return {c: float(v) for c, v in zip(ids, p.detach().tolist(), strict=True)}

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if not self.previous:
            raise RuntimeError("fedawa: aggregate before start_server (the server has no w)")
        weights = self.learn_weights(uploads)
        self.last_weights = weights
        reweighted = {
            c: Upload(entries=u.entries, masks=u.masks, weight=weights[c])
            for c, u in uploads.items()
        }
        message = masked_average(reweighted)
        if self.gamma != 1:
            for n in self.previous:
                message.entries[n] = message.entries[n] * self.gamma
        self.previous = {n: message.entries[n].detach().cpu().clone() for n in self.previous}
        return message
