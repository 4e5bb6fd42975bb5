"""FedDyn: a dynamic regularizer that aligns the clients' stationary points with the global one."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._generic import Tensors, parameter_values, zeros_like_parameters
from pflbench.params import Param

GRAD = "feddyn/grad"  # this client's gradient state ∇Lᵢ(θᵢᵗ⁻¹), zero at the start


def dynamic_term(
    grad: Tensors, anchor: Tensors, alpha: float
) -> Callable[[nn.Module], torch.Tensor]:
    """−⟨gᵢ, θ⟩ + α/2‖θ − θᵗ⁻¹‖² over the trainable parameters (never buffers)."""

    def term(model: nn.Module) -> torch.Tensor:
        total = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            t = -(grad[name] * p).sum() + 0.5 * alpha * (p - anchor[name]).pow(2).sum()
            total = t if total is None else total + t
        if total is None:
            raise ValueError("feddyn: the model has no trainable parameters")
        return total

    return term


class FedDyn(Method):
    """Client loss Lᵢ(θ) − ⟨gᵢ, θ⟩ + α/2‖θ − θᵗ⁻¹‖²; the server corrects the average by h.

    Paper: Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on
    Dynamic Regularization", ICLR 2021 (arXiv 2111.04263), Algorithm 1.

    Client i (θᵗ⁻¹ = the server model it received, gᵢ its gradient state, zero at first): trains
    the suite's budget on the loss above (the term on every batch, parameters only), then
    gᵢ ← gᵢ − α(θᵢᵗ − θᵗ⁻¹); uploads θᵢᵗ as FedAvg does. Server (it keeps θᵗ⁻¹, from
    ``start_server`` in the first round, and h = 0 at the start): h ← h − α(1/N) Σ_{i∈P}
    (θᵢᵗ − θᵗ⁻¹), N = every client; θᵗ = the weighted average of the θᵢᵗ − h/α, broadcast.

    Checked against the official code (alpemreacar/FedDyn, ``train_FedDyn``): it stores
    −gᵢ/α (the cumulated drift) per client and sends avg + mean(drift), which for α > 0 is
    exactly the paper's avg − h/α; its quadratic term rides on SGD's weight decay (here it is in
    the loss, which gives the same gradient and works under Adam). α = 0: h stays 0 and the
    correction is 0, so the run is FedAvg; note that the official parametrization would keep
    adding the mean drift at α = 0, i.e. the algorithm's α → 0 limit is not FedAvg. BN running
    statistics are averaged as in FedAvg and never corrected (they have no gradient).
    Evaluated model: the broadcast server model θᵗ (the paper's). Bytes: as FedAvg (h stays on
    the server, gᵢ on the client). Optimizer state reset every round; no extra passes.
    """

    name = "feddyn"
    newcomer = "the broadcast server model θᵗ = average − h/α"
    paper = "Acar et al., ICLR 2021, arXiv:2111.04263"
    official_code = (
        "alpemreacar/FedDyn (utils_methods.train_FedDyn, utils_general.train_feddyn_mdl)"
    )
    shares = "every floating-point entry (as FedAvg); the server sends the h-corrected average"
    personal = "the client's gradient state gᵢ (never sent); the server keeps h"
    evaluates = "the broadcast server model θᵗ = average − h/α"
    deviations: ClassVar[tuple[str, ...]] = (
        "the average is sample-weighted (protocol.aggregation_weights, as FedAvg); the paper and official code take the plain mean of the participating models",
        "α is the same on every client; the official code scales it per client by the mean sample count over nᵢ",
        "the official code reports the plain average of the participating models; the evaluated model here is the broadcast θᵗ = average − h/α (the paper's server model), so no second model is sent",
    )
    params = {
        "alpha": Param(
            0.01, low=1e-3, high=0.1, log=True, valid=(0, None), help="α: dynamic regularizer"
        ),
    }

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.num_clients = 0
        self.previous: Tensors = {}
        self.h: Tensors = {}

    # server ------------------------------------------------------------------------------
    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        self.num_clients = len(client_ids)
        self.previous = {n: t.cpu() for n, t in parameter_values(model).items()}
        self.h = {n: torch.zeros_like(t) for n, t in self.previous.items()}

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if self.num_clients == 0:
            raise RuntimeError("feddyn: aggregate before start_server (the server has no θ⁰)")
        message = masked_average(uploads)
        drift = {n: torch.zeros_like(t) for n, t in self.h.items()}
        for u in uploads.values():
            for n in drift:
                drift[n] += u.entries[n].to(drift[n].device) - self.previous[n]
        self.h = {n: self.h[n] - self.alpha / self.num_clients * drift[n] for n in self.h}
        if self.alpha > 0:
            for n, h in self.h.items():
                avg = message.entries[n]
                message.entries[n] = (avg - (h / self.alpha).to(avg.device)).to(avg.dtype)
        self.previous = {n: message.entries[n].detach().cpu().clone() for n in self.h}
        return message

    # client --------------------------------------------------------------------------------
    def local_update(self, client: Client) -> None:
        if self.alpha == 0:  # gᵢ stays zero and the term is zero: the computation is FedAvg's
            client.fit()
            return
        model = client.model
        anchor = parameter_values(model)
        zeros = zeros_like_parameters(model)
        grad = {n: t.to(client.device) for n, t in client.state.get(GRAD, zeros).items()}
        client.fit(extra_loss=dynamic_term(grad, anchor, self.alpha))
        end = parameter_values(model)
        client.state[GRAD] = {n: (grad[n] - self.alpha * (end[n] - anchor[n])).cpu() for n in end}
