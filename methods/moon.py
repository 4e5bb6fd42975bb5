"""MOON: model-contrastive learning between the local, the global and the previous local model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import cloned_state, declared_path, step
from pflbench.params import Param

PREVIOUS = "moon/previous"  # this client's model at the end of its last local update


def representation_module(model: nn.Module) -> nn.Module:
    """The module whose output is the representation: the deepest stage of the declared encoder
    (``encoder_path``): the U-Net's bottleneck ``encoder.<depth>``, or the last feature map of
    a timm encoder."""
    encoder = model.get_submodule(declared_path(model, "encoder_path", "moon"))
    if isinstance(encoder, (nn.ModuleList, nn.Sequential)) and len(encoder):
        return encoder[-1]
    return encoder


class _Capture:
    value: torch.Tensor | None = None


@contextlib.contextmanager
def captured_representation(model: nn.Module, which: str = "bottleneck") -> Iterator[_Capture]:
    """Record the representation of every forward pass: ``bottleneck`` = the deepest encoder
    feature map, global-average-pooled over its spatial dimensions (N×C); ``features`` = the
    body features entering the head, flattened (N×C·H·W, FL-MedSegBench's choice)."""
    box = _Capture()
    if which == "bottleneck":

        def hook(_module, _inputs, output):
            feature = output[-1] if isinstance(output, (list, tuple)) else output
            box.value = feature.mean(dim=tuple(range(2, feature.ndim)))

        handle = representation_module(model).register_forward_hook(hook)
    elif which == "features":

        def pre_hook(_module, inputs):
            box.value = inputs[0].flatten(1)

        head = model.get_submodule(declared_path(model, "head_path", "moon"))
        handle = head.register_forward_pre_hook(pre_hook)
    else:
        raise ValueError(f"moon: unknown representation {which!r}; expected bottleneck or features")
    try:
        yield box
    finally:
        handle.remove()


def contrastive_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ℓ_con = −log(exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ))),
    sim = cosine, averaged over the batch (official: cross-entropy on the two logits)."""
    logits = torch.stack(
        [F.cosine_similarity(z, z_global, dim=-1), F.cosine_similarity(z, z_previous, dim=-1)],
        dim=1,
    )
    labels = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return F.cross_entropy(logits / temperature, labels)


def _frozen_copy(client: Client, state: dict[str, torch.Tensor]) -> nn.Module:
    model = client.new_model(state).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MOON(Method):
    """FedAvg whose local loss adds μ·ℓ_con: the representation is pulled towards the global
    model's and pushed from the client's previous local model's.

    Paper: Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021 (arXiv 2103.16257).
    Checked against the official code (QinbinLi/MOON, ``train_net_fedcon``).

    Client i, each batch of the suite's budget: loss = ℓ_sup + μ·ℓ_con(z, z_glob, z_prev), with
    z from the model being trained, z_glob from a frozen copy of the global model received this
    round, z_prev from a frozen copy of the client's own model at the end of its last local
    update (both frozen copies in eval mode, as in the official code); temperature τ = 0.5.
    A client with no previous local model (its first sampled round) has no negative, so ℓ_con
    is zero, as the official one-logit cross-entropy is. Representation for a U-Net: the
    bottleneck feature map (output of the deepest encoder stage ``encoder.<depth>``; a timm
    encoder's last feature map), global-average-pooled over H×W to one C-vector per image,
    compared by cosine similarity; ``representation: features`` uses FL-MedSegBench's choice
    instead, the body features entering the head, flattened (N×C·H·W; that benchmark also
    sets μ = 0.01). The paper's projection head (a 2-layer MLP on the pooled
    features) is not added, so the shared model is the same U-Net every other method trains.
    μ default 1 (official code; the paper uses 5 for CIFAR-10, 1 for CIFAR-100 and
    Tiny-ImageNet); μ = 0 runs the same loop without the term and is FedAvg bit for bit.

    Extra work: two frozen forward passes (global and previous model) per training image,
    recorded under ``moon``. Bytes: as FedAvg (the previous model never leaves the client).
    Evaluated model: the global model w. Optimizer state reset every round.
    """

    name = "moon"
    newcomer = "the final global model"
    paper = "Li, He, Song, CVPR 2021, arXiv:2103.16257"
    official_code = "QinbinLi/MOON (main.py train_net_fedcon)"
    personal = "the client's previous local model (a negative for the contrastive loss, never sent)"
    extra_passes = "`moon`: 2 frozen forward passes (global and previous model) per training image, no backward"
    deviations: ClassVar[tuple[str, ...]] = (
        "no projection head: the representation is the U-Net bottleneck, global-average-pooled (the paper adds a 2-layer MLP projection head to its classifiers)",
    )
    params = {
        "mu": Param(1.0, low=0.01, high=10.0, log=True, valid=(0, None), help="μ: weight of ℓ_con"),
        "temperature": Param(0.5, valid=(1e-6, None), help="τ of the contrastive loss"),
        "representation": Param(
            "bottleneck",
            choices=("bottleneck", "features"),
            search=False,
            help="bottleneck (pooled deepest encoder map) | features (flattened head input, FL-MedSegBench)",
        ),
    }

    def local_update(self, client: Client) -> None:
        model = client.model
        previous_state = client.state.get(PREVIOUS)
        contrast = self.mu > 0 and previous_state is not None
        if contrast:
            global_model = _frozen_copy(client, cloned_state(model))
            previous = _frozen_copy(client, previous_state)
        opt = client.optimizer(model.parameters())
        model.train()
        where = f"client {client.id} round {client.round} (local)"
        with captured_representation(model, self.representation) as rep:
            for x, y in client.batches("local"):
                opt.zero_grad(set_to_none=True)
                loss = client.loss(model(x), y)
                if contrast:
                    z = rep.value
                    with torch.no_grad():
                        z_global = rep_of(global_model, x, self.representation)
                        z_previous = rep_of(previous, x, self.representation)
                    client.count("moon", 2 * len(x))
                    loss = loss + self.mu * contrastive_loss(
                        z, z_global, z_previous, self.temperature
                    )
                step(opt, loss, where)
        client.keep_optimizer(opt)
        client.state[PREVIOUS] = cloned_state(model)


def rep_of(model: nn.Module, x: torch.Tensor, which: str = "bottleneck") -> torch.Tensor:
    """The representation of ``x`` under ``model`` (one forward pass)."""
    with captured_representation(model, which) as rep:
        model(x)
    assert rep.value is not None
    return rep.value
