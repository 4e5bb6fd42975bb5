"""FedNova: normalized averaging, so that clients doing more local steps do not pull harder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._generic import Tensors, fit_counting_steps, parameter_values

NORM = "fednova/a"  # ‖aᵢ‖₁ of this round, waiting for the upload


def normalizing_norm(steps: int, momentum: float) -> float:
    """‖aᵢ‖₁ for ``steps`` local SGD steps with heavy-ball ``momentum`` ρ (paper §4; official
    ``FedNova.step``: counter ← ρ·counter + 1, a ← a + counter), i.e.
    Σ_{k=1}^{τ} (1 − ρᵏ)/(1 − ρ); τ itself when ρ = 0."""
    counter, total = 0.0, 0.0
    for _ in range(steps):
        counter = counter * momentum + 1.0
        total += counter
    return total


def nova_weights(weights: Mapping[str, float], norms: Mapping[str, float]) -> dict[str, float]:
    """qᵢ = wᵢ τ_eff / ‖aᵢ‖₁ with τ_eff = Σ pᵢ‖aᵢ‖₁, pᵢ = wᵢ / Σw: x⁺ = x + Σ (qᵢ/Σw)(yᵢ − x).

    With equal norms and integer weights (sample counts) qᵢ = wᵢ exactly, so the update is
    FedAvg's bit for bit.
    """
    total = sum(weights.values())
    tau_eff = sum(weights[c] * norms[c] for c in weights) / total
    return {c: weights[c] * tau_eff / norms[c] for c in weights}


class FedNova(Method):
    """The server averages normalized updates (yᵢ − x)/‖aᵢ‖₁ and rescales by τ_eff.

    Paper: Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020 (arXiv 2007.07481).

    Client i runs the suite's local budget from x (τᵢ optimizer steps; with epochs, τᵢ grows
    with the client's data) and uploads yᵢ with ‖aᵢ‖₁ (one number, 8 bytes). Server, with
    pᵢ = wᵢ/Σw (``protocol.aggregation_weights``): τ_eff = Σ pᵢ‖aᵢ‖₁ and
    x ← x + τ_eff Σ pᵢ (yᵢ − x)/‖aᵢ‖₁; it keeps x (from ``start_server`` in the first round).
    ‖aᵢ‖₁ = τᵢ for SGD without momentum; Σ_k (1 − ρᵏ)/(1 − ρ) for SGD with momentum ρ (the
    official optimizer's counter; weight decay does not change it). Under Adam (the protocol's
    default) an update is not a fixed linear combination of the gradients, so ‖aᵢ‖₁ = τᵢ, the
    step count: a declared deviation. Only parameters are normalized; BN running statistics have
    no steps and are averaged as in FedAvg. With equal step counts the update is FedAvg's.

    Checked against the official code (JYWa/FedNova, ``distoptim/FedNova.py``); its server
    momentum ``gmf`` and proximal variant (μ > 0) are not included (their defaults are 0).
    FL-MedSegBench's FedNova takes τᵢ = batches per epoch (whatever the epochs) and normalizes
    BN statistics too; here τᵢ counts every optimizer step of the round.
    Evaluated model: the global model x. Bytes: FedAvg's plus 8 per upload. Optimizer state
    reset every round; no extra passes.
    """

    name = "fednova"
    newcomer = "the final global model"
    paper = "Wang et al., NeurIPS 2020, arXiv:2007.07481"
    official_code = "JYWa/FedNova (distoptim/FedNova.py)"
    shares = "every floating-point entry (as FedAvg) plus ‖aᵢ‖₁; parameters are averaged by normalized updates"
    deviations: ClassVar[tuple[str, ...]] = (
        "under Adam (the protocol's default) ‖aᵢ‖₁ is the number of local steps τᵢ: Adam's update is not a fixed linear combination of gradients, for which the paper's aᵢ is defined",
        "BN running statistics are averaged as in FedAvg (the official code communicates parameters only)",
    )

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.global_params: Tensors = {}

    # server ------------------------------------------------------------------------------
    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        self.global_params = {n: t.cpu() for n, t in parameter_values(model).items()}

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if not self.global_params:
            raise RuntimeError("fednova: aggregate before start_server (the server has no x)")
        message = masked_average(uploads)  # buffers: FedAvg
        weights = {c: float(u.weight) for c, u in uploads.items()}
        norms = {c: float(u.extras[NORM]) for c, u in uploads.items()}
        q = nova_weights(weights, norms)
        # x⁺ = (Σ qᵢyᵢ + (Σw − Σq)·x) / Σw, one weighted average whose weights sum to Σw
        reweighted: dict[str, Upload] = {
            c: Upload(entries={n: u.entries[n] for n in self.global_params}, weight=q[c])
            for c, u in uploads.items()
        }
        rest = sum(weights.values()) - sum(q.values())
        if rest != 0:
            first = next(iter(reweighted.values())).entries
            x = {n: t.to(first[n].device) for n, t in self.global_params.items()}
            reweighted["\0server"] = Upload(entries=x, weight=rest)
        normalized = masked_average(reweighted)
        for n, t in normalized.entries.items():
            message.entries[n] = t.to(message.entries[n].device)
        self.global_params = {
            n: message.entries[n].detach().cpu().clone() for n in self.global_params
        }
        return message

    # client --------------------------------------------------------------------------------
    def local_update(self, client: Client) -> None:
        steps = fit_counting_steps(client)
        if steps == 0:
            raise RuntimeError(f"fednova: client {client.id} took no local step this round")
        work = client.work
        rho = work.momentum if work.optimizer == "sgd" else 0.0
        client.state[NORM] = normalizing_norm(steps, rho)

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        assert up is not None
        up.extras[NORM] = float(client.state.pop(NORM))
        return up
