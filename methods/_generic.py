"""Helpers of the generic-FL baselines (SCAFFOLD, FedDyn, FedNova, MOON): local training that
counts its optimizer steps, gradient corrections, parameter-only state and server-side copies.

Written once here so that each method file holds only its algorithm. Only parameters carry
control variates, gradient states or normalised updates: buffers (BN running statistics) have no
gradient, so these methods average them exactly as FedAvg does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from pflbench.client import Client
from pflbench.training import train_epochs

Tensors = dict[str, torch.Tensor]


def fit_counting_steps(
    client: Client, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
) -> int:
    """The suite's local budget on the client's model (as :meth:`Client.fit`), returning the
    number of optimizer steps taken (SCAFFOLD's K, FedNova's τᵢ)."""
    steps = 0

    def counted() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal steps
        for batch in client.batches("local"):
            steps += 1
            yield batch

    opt = client.optimizer(client.model.parameters())
    train_epochs(
        client.model,
        counted(),
        opt,
        extra_loss=extra_loss,
        where=f"client {client.id} round {client.round} (local)",
        loss_fn=client.loss,
    )
    client.keep_optimizer(opt)
    return steps


@contextlib.contextmanager
def gradient_offsets(
    model: nn.Module, offsets: Mapping[str, torch.Tensor], raw_sum: Tensors | None = None
) -> Iterator[None]:
    """Add ``offsets[name]`` to each named parameter's gradient as it is computed (before the
    optimizer sees it), for the duration; with ``raw_sum`` also add every raw (uncorrected)
    gradient into ``raw_sum[name]``. The hooks are removed afterwards, since the engine reuses
    one live model for every client."""
    handles = []
    for name, p in model.named_parameters():
        if name in offsets and p.requires_grad:
            d = offsets[name].to(device=p.device, dtype=p.dtype)

            def hook(g: torch.Tensor, d: torch.Tensor = d, name: str = name) -> torch.Tensor:
                if raw_sum is not None:
                    raw_sum[name] += g.detach()
                return g + d

            handles.append(p.register_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def parameter_values(model: nn.Module) -> Tensors:
    """Detached copies of the parameters (not buffers)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def zeros_like_parameters(model: nn.Module) -> Tensors:
    return {
        n: torch.zeros_like(p, memory_format=torch.contiguous_format)
        for n, p in model.named_parameters()
    }


def floating_state(model: nn.Module) -> Tensors:
    """The server's copy of a model's floating-point entries (what FedAvg broadcasts)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
