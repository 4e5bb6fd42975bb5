"""FedLWS: FedAvg with an adaptive layer-wise shrinking of the aggregated model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._generic import Tensors, parameter_values
from pflbench.params import Param, ParamError


def layer_groups(model: nn.Module) -> list[list[str]]:
    """One layer per module that owns parameters: its own parameters (weight, bias), by name."""
    groups = []
    for prefix, module in model.named_modules():
        names = [
            f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
        ]
        if names:
            groups.append(names)
    return groups


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def shrinking_factor(
    previous: torch.Tensor,
    average: torch.Tensor,
    clients: Sequence[torch.Tensor],
    beta: float,
    tau_range: tuple[float, float],
) -> float:
    """γ_l = ‖w_l‖ / (‖w_l‖ + τ_l ‖w̄_l − w_l‖), τ_l = clip(β · mean_i ‖Δ_i − Δ̄‖, τ_min, τ_max).

    ``previous`` w_l (the last global layer), ``average`` w̄_l (this round's weighted
    average), ``clients`` the uploaded layers; Δ_i = w_i − w_l and Δ̄ their plain mean, as in
    the official ``fedlws``. Flattened vectors in, a number out.
    """
    deltas = torch.stack([c - previous for c in clients])
    spread = (deltas - deltas.mean(0)).norm(dim=1).mean()
    tau = float(torch.clamp(beta * spread, tau_range[0], tau_range[1]))
    norm = float(previous.norm())
    denom = norm + tau * float((average - previous).norm())
    return 1.0 if denom == 0 else norm / denom


class FedLWS(Method):
    """The weighted average w̄ is multiplied layer by layer by a shrinking factor γ_l ≤ 1.

    Paper: Shi et al., "FedLWS: Federated Learning with Adaptive Layer-wise Weight Shrinking",
    ICLR 2025 (arXiv 2503.15111). Checked against the official code
    (ChanglongShi/FedLWS, ``server_funct.fedlws``), whose rule is this one.

    Server, per layer l, with w_l the previous global layer (``start_server`` in round 1): w̄_l
    = Σ pᵢ wᵢ,l (FedAvg), Δᵢ = wᵢ,l − w_l, τ_l = clip(β · mean_i ‖Δᵢ − mean_j Δⱼ‖₂, τ_min,
    τ_max), γ_l = ‖w_l‖₂ / (‖w_l‖₂ + τ_l ‖w̄_l − w_l‖₂), and w_l ← γ_l w̄_l. β = 0.03, τ ∈
    [0.01, 0.2] (official defaults). Clients train as in FedAvg; no proxy data; nothing extra is
    sent. A layer is one module's own parameters (a conv's weight and bias, a BatchNorm's γ and
    β). BN running statistics are averaged as in FedAvg and not shrunk. Evaluated model: the
    global model. Optimizer state reset every round; no extra passes.
    """

    name = "fedlws"
    newcomer = "the final (layer-shrunk) global model"
    paper = "Shi et al., ICLR 2025, arXiv:2503.15111"
    official_code = "ChanglongShi/FedLWS (server_funct.fedlws)"
    shares = "every floating-point entry (as FedAvg); the server shrinks each parameter layer of the average"
    deviations: ClassVar[tuple[str, ...]] = (
        "a layer is one module's own parameters; the official code cuts the state dict after each key containing 'bias', which joins a bias-free conv to the BatchNorm after it and puts BN running statistics (shrunk too) into the next layer",
    )
    params = {
        "beta": Param(
            0.03, low=0.005, high=0.2, log=True, valid=(0, None), help="β: τ_l = β · client spread"
        ),
        "min_tau": Param(0.01, valid=(0, None), help="τ_min: lower clip of τ_l"),
        "max_tau": Param(0.2, valid=(0, None), help="τ_max: upper clip of τ_l"),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        if self.min_tau > self.max_tau:
            raise ParamError(
                f"method fedlws: min_tau ({self.min_tau}) must not exceed max_tau ({self.max_tau})"
            )
        self.previous: Tensors = {}
        self.groups: list[list[str]] = []
        self.last_gammas: list[float] = []

    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        self.previous = {n: t.cpu() for n, t in parameter_values(model).items()}
        self.groups = layer_groups(model)

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if not self.previous:
            raise RuntimeError("fedlws: aggregate before start_server (the server has no w)")
        message = masked_average(uploads)
        clients = list(uploads.values())
        self.last_gammas = []
        for names in self.groups:
            gamma = shrinking_factor(
                _flat([self.previous[n] for n in names]),
                _flat([message.entries[n].cpu() for n in names]),
                [_flat([u.entries[n].cpu() for n in names]) for u in clients],
                self.beta,
                (self.min_tau, self.max_tau),
            )
            self.last_gammas.append(gamma)
            for n in names:
                message.entries[n] = message.entries[n] * gamma
        self.previous = {n: message.entries[n].detach().cpu().clone() for n in self.previous}
        return message
