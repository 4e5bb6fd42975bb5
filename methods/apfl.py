"""APFL: each client mixes its copy of the global model with a personal model, with learned α."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import cloned_state, step
from pflbench.params import Param

PERSONAL, ALPHA = "apfl/personal", "apfl/alpha"


class Mixture(nn.Module):
    """Output mixture α·v(x) + (1 − α)·w(x): the model APFL evaluates."""

    def __init__(self, global_model: nn.Module, personal: nn.Module, alpha: float) -> None:
        super().__init__()
        self.global_model = global_model
        self.personal = personal
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.personal(x) + (1.0 - self.alpha) * self.global_model(x)


class APFL(Method):
    """Adaptive personalized FL: w (local copy of the global model), v (personal) and αᵢ.

    Paper: Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv 2003.13461
    (2020).

    Each step on a batch: w ← w − η∇f(w) (the suite's optimizer, exactly FedAvg's step);
    v ← v − η∇ᵥ f(mix) and α ← clip(α − η_α (∂f/∂α + c·α), 0, 1) with
    mix = α·v(x) + (1 − α)·w(x) and c = ``alpha_reg`` (default 0.02, the official code's
    regularizer: FedTorch's ``alpha_update`` adds ``0.02 * alpha`` to the gradient of α; the
    paper does not mention it). Checked against the official code (MLOPTPSU/FedTorch,
    ``alpha_update``) and PFLlib's ``clientapfl``.

    Choice: **output mixing** (the official code's loss), not the paper's weight mixing: the
    mixture's logits are α·v(x) + (1 − α)·w(x), and the evaluated model is the same output
    mixture (:class:`Mixture`). ∂f/∂α is exact autograd of that loss (the official code uses
    ⟨v − w, α∇v + (1 − α)∇w⟩, the derivative under weight mixing). w(x) in the mixture is
    the detached output of w's own step on the same batch, i.e. before w's update (the official
    code re-runs w after its update): this saves a forward pass and keeps w's BN statistics
    updated once per batch, so that w's trajectory is FedAvg's bit for bit. α is updated by plain
    SGD on every step (paper; the official code updates it once per round) with its own rate
    ``alpha_lr`` (the paper uses the model's η; decoupled because the suite's optimizer may be
    Adam, whose η is not an SGD step size). ``learn_alpha: false`` keeps α at ``alpha``.

    State: w is the client model (uploaded and averaged, FedAvg); v (initialised as the first
    round-start global model) and α (initialised to ``alpha``, default 0.25) live in
    ``client.state``. Evaluated model: the mixture; a never-sampled client (no v yet) is
    evaluated with w. w remains a global model for unseen sites. No extra passes over the data:
    v trains on the same batches (counted once, label ``local``) at about twice FedAvg's compute.
    Optimizer state reset every round (separate optimizers for w and v).
    """

    name = "apfl"
    newcomer = "the global model w (no αᵢ or v for a site that never trained one)"
    paper = "Deng et al., arXiv:2003.13461"
    official_code = "MLOPTPSU/FedTorch (alpha_update); PFLlib clientapfl"
    shares = "w, the client's copy of the global model (FedAvg, BN statistics included)"
    personal = "v and αᵢ (never sent)"
    evaluates = "the output mixture αᵢ·v(x) + (1 − αᵢ)·w(x)"
    extra_passes = "none (v trains on w's batches; about twice FedAvg's compute)"
    deviations: ClassVar[tuple[str, ...]] = (
        "∂f/∂α is the exact derivative of the output-mixture loss, not the official "
        "weight-mixing formula ⟨v − w, α∇v + (1 − α)∇w⟩",
        "α has its own SGD rate alpha_lr (the paper: the model's η), because the suite's "
        "optimizer may be Adam",
        "α is updated every step (the official code: once per round); w(x) in the mixture is w's "
        "output before its step on the batch",
    )
    params = {
        "alpha": Param(
            0.25, low=0.0, high=1.0, valid=(0, 1), help="initial (or fixed) mixing weight α"
        ),
        "learn_alpha": Param(True, help="learn α by gradient descent (clipped to [0, 1])"),
        "alpha_lr": Param(
            0.01, low=1e-4, high=1.0, log=True, valid=(0, None), help="η_α: SGD step size of α"
        ),
        "alpha_reg": Param(
            0.02, valid=(0, None), help="c: c·α added to ∂f/∂α (official code: 0.02)"
        ),
    }

    def local_update(self, client: Client) -> None:
        w = client.model
        v = client.new_model(client.state.get(PERSONAL))
        alpha = float(client.state.get(ALPHA, self.alpha))
        opt_w = client.optimizer(w.parameters(), key="main")
        opt_v = client.optimizer(v.parameters(), key="personal")
        w.train()
        v.train()
        where = f"client {client.id} round {client.round} (apfl)"
        for x, y in client.batches():
            opt_w.zero_grad(set_to_none=True)
            out_w = w(x)
            step(opt_w, client.loss(out_w, y), where)

            opt_v.zero_grad(set_to_none=True)
            a = torch.tensor(alpha, dtype=out_w.dtype, device=out_w.device)
            a.requires_grad_(self.learn_alpha)
            mix = a * v(x) + (1 - a) * out_w.detach()
            step(opt_v, client.loss(mix, y), where + " personal")
            if self.learn_alpha and a.grad is not None:
                grad = float(a.grad) + self.alpha_reg * alpha
                alpha = min(1.0, max(0.0, alpha - self.alpha_lr * grad))
        client.keep_optimizer(opt_w, key="main")
        client.keep_optimizer(opt_v, key="personal")
        client.state[PERSONAL] = cloned_state(v)
        client.state[ALPHA] = alpha

    def eval_model(self, client: Client) -> nn.Module:
        state = client.state.get(PERSONAL)
        if state is None:
            return client.model
        alpha = float(client.state.get(ALPHA, self.alpha))
        return Mixture(client.model, client.new_model(state), alpha)
