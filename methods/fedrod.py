"""FedRoD: a shared body with a generic head (balanced loss) and a personal head on top."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import cloned_state, declared_path, step
from pflbench.training import LossFn

PERSONAL_HEAD = "fedrod/personal_head"


def log_prior(labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Log pixel-class frequencies of ``labels`` (add-one smoothed) for a head of ``channels``.

    One logit channel is the binary case: classes background / foreground (any label > 0).
    """
    k = 2 if channels == 1 else channels
    flat = (labels > 0).long() if channels == 1 else labels
    counts = torch.bincount(flat.reshape(-1), minlength=k)[:k].double() + 1.0
    return (counts / counts.sum()).log()


def prior_shift(prior: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel logit shift of a log prior: log π_c, or log(π₁/π₀) for one sigmoid logit."""
    return (prior[1] - prior[0]).reshape(1) if channels == 1 else prior


def balanced_loss(
    logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, loss: LossFn
) -> torch.Tensor:
    """The suite's ``loss`` on prior-adjusted logits (balanced softmax, Ren et al. 2020).

    Adding log π_c to the logits during training makes the raw logits estimate the class-balanced
    posterior; for one sigmoid logit the shift is log(π₁/π₀). ``loss`` is the client's, so the
    protocol's ``loss_smoothing`` reaches the generic head too.
    """
    shift = prior_shift(prior.to(logits.device, logits.dtype), logits.shape[1])
    return loss(logits + shift.reshape(1, -1, *([1] * (logits.ndim - 2))), labels)


class RoDModel(nn.Module):
    """Generic + personal logits on shared body features: model.head(f) + personal(f)."""

    def __init__(self, model: nn.Module, personal_head: nn.Module, head_path: str) -> None:
        super().__init__()
        self.model = model
        self.personal_head = personal_head
        self.head_path = head_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.feature_forward(x)
        generic = self.model.get_submodule(self.head_path)(f)
        return generic + self.personal_head(f.detach())


class FedRoD(Method):
    """Body + generic head shared and trained with a class-balanced loss; a personal head on the
    detached body features; prediction = generic logits + personal logits.

    Paper: Chen, Chao, "On Bridging Generic and Personalized Federated Learning for Image
    Classification", ICLR 2022 (arXiv 2107.00778).

    Per batch: f = body(x) (``model.feature_forward``), g = head(f) (the head at
    ``model.head_path``); the body and generic head step on the balanced loss of g (balanced
    softmax with the client's pixel-class frequencies over its training labels, the segmentation
    analogue of the paper's class frequencies); then the personal head p steps on the suite's
    loss of g.detach() + p(f.detach()) (the combined predictor, generic part fixed, as in the
    paper and PFLlib). The body, generic head and their BN statistics are averaged (FedAvg); the
    personal head (a module created by the method, shaped like the model's head) lives in
    ``client.state`` and is never sent. Choice (PFLlib copies the initial head instead): the
    personal head starts at zero, so the first personalized prediction is the generic one (a bias
    initialised at the local log prior was tried and learned more slowly on the synthetic data).

    Compared with FL-MedSegBench: its FedRoD trains the body and generic head with the plain
    (unbalanced) segmentation loss; here, as in the paper and PFLlib, the generic head is trained
    with the balanced loss. Rows of the two benchmarks are therefore not the same method.

    Evaluated model: :class:`RoDModel` (generic + personal logits); the body + generic head is
    the global model for unseen sites. No extra passes over the data (the personal head reuses
    each batch's features; budget label ``local`` only). Optimizer state reset every round.
    Needs ``model.feature_forward`` (the model contract).
    """

    name = "fedrod"
    newcomer = "the generic model: body + generic head, no personal head"
    paper = "Chen & Chao, ICLR 2022, arXiv:2107.00778"
    official_code = "hongyouc/Fed-RoD; PFLlib clientrod; FL-MedSegBench (plain-loss generic head)"
    shares = "body + generic head (and their BN statistics)"
    personal = "the personal head (starts at zero, never sent)"
    evaluates = "body → generic logits + personal logits"
    deviations: ClassVar[tuple[str, ...]] = (
        "balanced loss by pixel-class frequency (the paper's class frequency, for segmentation)",
        "the personal head starts at zero (PFLlib copies the initial head)",
    )

    def _personal_head(self, client: Client, head: nn.Module) -> nn.Module:
        ph = copy.deepcopy(head)
        state = client.state.get(PERSONAL_HEAD)
        if state is None:
            with torch.no_grad():
                for p in ph.parameters():
                    p.zero_()
        else:
            ph.load_state_dict(state)
        for p in ph.parameters():
            p.requires_grad_(True)
        return ph

    def _check(self, model: nn.Module) -> str:
        if not callable(getattr(model, "feature_forward", None)):
            raise TypeError(
                f"{self.name}: model {type(model).__name__} has no feature_forward(x); FedRoD "
                "needs the body features to attach its personal head"
            )
        return declared_path(model, "head_path", self.name)

    def setup(self, client: Client) -> None:
        self._check(client.model)
        return None

    def local_update(self, client: Client) -> None:
        model = client.model
        head = model.get_submodule(self._check(model))
        personal = self._personal_head(client, head)
        opt = client.optimizer(model.parameters(), key="main")
        opt_p = client.optimizer(personal.parameters(), key="personal")
        prior: torch.Tensor | None = None
        where = f"client {client.id} round {client.round} (fedrod)"
        model.train()
        personal.train()
        for x, y in client.batches():
            opt.zero_grad(set_to_none=True)
            f = model.feature_forward(x)
            g = head(f)
            if prior is None:
                prior = log_prior(client.train_data.labels, g.shape[1])
            step(opt, balanced_loss(g, y, prior, client.loss), where)
            opt_p.zero_grad(set_to_none=True)
            step(opt_p, client.loss(g.detach() + personal(f.detach()), y), where + " personal")
        client.keep_optimizer(opt, key="main")
        client.keep_optimizer(opt_p, key="personal")
        client.state[PERSONAL_HEAD] = cloned_state(personal)

    def eval_model(self, client: Client) -> nn.Module:
        path = self._check(client.model)
        personal = self._personal_head(client, client.model.get_submodule(path))
        return RoDModel(client.model, personal, path)
