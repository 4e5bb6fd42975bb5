"""SCAFFOLD: FedAvg with control variates that correct each client's drift."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._generic import (
    Tensors,
    fit_counting_steps,
    gradient_offsets,
    parameter_values,
    zeros_like_parameters,
)
from pflbench.params import Param

SERVER_C = "scaffold/c"  # the server control variate c, as last received
CLIENT_C = "scaffold/ci"  # this client's control variate cᵢ
DELTA_C = "scaffold/delta_c"  # Δcᵢ = cᵢ⁺ − cᵢ of this round, waiting for the upload


def option_two(
    c_i: Tensors, c: Tensors, start: Tensors, end: Tensors, steps: int, lr: float
) -> Tensors:
    """Option II of the paper: cᵢ⁺ = cᵢ − c + (x − yᵢ) / (K η)."""
    return {n: c_i[n] - c[n] + (start[n] - end[n]) / (steps * lr) for n in start}


class Scaffold(Method):
    """Each local gradient step is corrected by c − cᵢ; the variates are updated by option II.

    Paper: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning", ICML 2020 (arXiv 1910.06378), Algorithm 1.

    Client i, with x the global model it received, c the server variate and cᵢ its own (both
    zero until first set): K local steps on gᵢ(y) − cᵢ + c, the correction added to each
    parameter's gradient before the optimizer step; then cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K η) (option
    II, η = the round's learning rate, K = the optimizer steps taken); uploads yᵢ (as FedAvg) and
    Δcᵢ = cᵢ⁺ − cᵢ. Server: x ← the weighted average of the yᵢ (global step size η_g = 1, the
    paper's experiments), c ← c + (1/N) Σ_{i∈S} Δcᵢ with N the number of clients (from
    ``start_server``); every client receives x and c.

    Optimizer: the paper assumes plain SGD, where option II's (x − yᵢ)/(Kη) is the mean
    corrected gradient along the local path, so cᵢ⁺ is the mean raw gradient g(y_k). Under Adam
    (the protocol's default) the correction is still added to the gradient Adam receives, but
    (x − yᵢ)/(Kη) is then the mean Adam step over η, about one per coordinate whatever the
    gradient's size; the correction then swamps the gradient and training collapses (quick
    suite, prostate-synth: Dice 0.000 with literal option II under Adam). ``variate: auto``
    (default) therefore uses option II under SGD and, under Adam, the quantity option II equals
    under SGD: cᵢ⁺ = the mean raw minibatch gradient over the K local steps (a declared
    deviation). ``variate: option_ii`` or ``mean_gradient`` forces one rule.
    Variates cover parameters only (buffers have no gradient); BN running statistics are
    averaged as in FedAvg. Bytes: FedAvg's upload plus Δcᵢ (one float per parameter), FedAvg's
    broadcast plus c (the same size). Evaluated model: the global model x. Optimizer state reset
    every round; no extra passes.
    """

    name = "scaffold"
    newcomer = "the final server model x (no control variate is needed to predict)"
    paper = "Karimireddy et al., ICML 2020, arXiv:1910.06378"
    official_code = "none released by the authors; read against PFLlib clientscaffold/serverscaffold and NIID-Bench (Li et al.)"
    shares = "every floating-point entry (as FedAvg) plus the control-variate update Δcᵢ; the server sends x and c"
    personal = "the client control variate cᵢ (parameter-shaped, never sent; only Δcᵢ is)"
    extra_passes = "none"
    deviations: ClassVar[tuple[str, ...]] = (
        "x is the sample-weighted average of the uploads (protocol.aggregation_weights, as FedAvg) with global step size η_g = 1; the paper averages uniformly over the sampled clients",
        "under Adam (the protocol's default, variate: auto) cᵢ⁺ is the mean raw minibatch gradient over the K local steps, which is what option II computes under plain SGD; literal option II under Adam, (x − y)/(Kη), is the mean Adam step over η, not a gradient, and its correction swamps the gradient (variate: option_ii keeps it)",
    )
    params = {
        "variate": Param(
            "auto",
            choices=("auto", "option_ii", "mean_gradient"),
            search=False,
            help="auto | option_ii | mean_gradient: the control-variate update (auto: option II under SGD, mean gradient under Adam)",
        ),
    }

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.num_clients = 0
        self.c: Tensors | None = None

    # server ------------------------------------------------------------------------------
    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        self.num_clients = len(client_ids)
        self.c = zeros_like_parameters(model)
        self.c = {n: t.detach().cpu() for n, t in self.c.items()}

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if self.c is None or self.num_clients == 0:
            raise RuntimeError("scaffold: aggregate before start_server (the server has no c)")
        message = masked_average(uploads)
        total = {n: torch.zeros_like(t) for n, t in self.c.items()}
        for u in uploads.values():
            for n, d in u.extras[DELTA_C].items():
                total[n] += d.to(total[n].device)
        self.c = {n: self.c[n] + total[n] / self.num_clients for n in self.c}
        message.extras["c"] = {n: t.clone() for n, t in self.c.items()}
        return message

    # client --------------------------------------------------------------------------------
    def receive(self, client: Client, message: Message) -> None:
        super().receive(client, message)
        client.state[SERVER_C] = {n: t.clone() for n, t in message.extras["c"].items()}

    def variate_rule(self, client: Client) -> str:
        """``option_ii`` or ``mean_gradient`` for this client's optimizer (``auto``: option II
        under SGD, the mean raw gradient under Adam)."""
        if self.variate != "auto":
            return self.variate
        return "option_ii" if client.work.optimizer == "sgd" else "mean_gradient"

    def local_update(self, client: Client) -> None:
        model = client.model
        zeros = zeros_like_parameters(model)
        c = {n: t.to(client.device) for n, t in client.state.get(SERVER_C, zeros).items()}
        c_i = {n: t.to(client.device) for n, t in client.state.get(CLIENT_C, zeros).items()}
        start = parameter_values(model)
        raw = {n: torch.zeros_like(t) for n, t in start.items()}
        with gradient_offsets(model, {n: c[n] - c_i[n] for n in start}, raw_sum=raw):
            steps = fit_counting_steps(client)
        if steps == 0:
            raise RuntimeError(f"scaffold: client {client.id} took no local step this round")
        if self.variate_rule(client) == "option_ii":
            new_c_i = option_two(c_i, c, start, parameter_values(model), steps, client.lr)
        else:
            new_c_i = {n: raw[n] / steps for n in raw}
        client.state[DELTA_C] = {n: (new_c_i[n] - c_i[n]).cpu() for n in new_c_i}
        client.state[CLIENT_C] = {n: t.cpu() for n, t in new_c_i.items()}

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        assert up is not None
        up.extras[DELTA_C] = client.state.pop(DELTA_C)
        return up
