"""Helpers shared by the method tests: runs on the tiny federation, model capture, lone clients."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from conftest import TINY_MODEL, fast_protocol, tiny_federation

from pflbench.client import Budget, Client, LocalWork
from pflbench.data import FederatedData, SiteData, make_splits
from pflbench.engine import Federation, RunOutput
from pflbench.method import Method
from pflbench.models import UNet
from pflbench.registry import get_method
from pflbench.suite import ModelSpec


def run(
    data: FederatedData,
    method: str | Method,
    seed: int = 0,
    model: ModelSpec = TINY_MODEL,
    *,
    mode: str = "final",
    held_out: tuple[str, ...] | list[str] = (),
    **proto: Any,
) -> tuple[Federation, RunOutput]:
    m = get_method(method)() if isinstance(method, str) else method
    fed = Federation(
        data,
        make_splits(data),
        m,
        model,
        fast_protocol(**proto),
        seed,
        mode=mode,
        held_out=held_out,
    )
    return fed, fed.run()


def capturing(base: type[Method]) -> type[Method]:
    """``base`` that records, at each ``eval_model`` call, the client's model, its state and the
    model it evaluates (class-level dicts keyed by client id; the last call wins)."""

    def eval_model(self, client):
        cls = type(self)
        cls.models[client.id] = {k: v.clone() for k, v in client.model.state_dict().items()}
        cls.states[client.id] = copy.deepcopy(client.state)
        evaluated = base.eval_model(self, client)
        cls.evaluated[client.id] = copy.deepcopy(evaluated)
        cls.after[client.id] = {k: v.clone() for k, v in client.model.state_dict().items()}
        return evaluated

    attrs = {"models": {}, "states": {}, "evaluated": {}, "after": {}, "eval_model": eval_model}
    return type(f"Capture{base.__name__}", (base,), attrs)


def tiny_unet(seed: int = 0, **options: Any) -> UNet:
    torch.manual_seed(seed)
    return UNet(1, 1, **{"base": 4, "depth": 2, **options})


def make_client(
    model: torch.nn.Module,
    site: int = 0,
    state: dict | None = None,
    round: int = 1,
    budget: Budget | None = None,
    persist_optimizer: bool = False,
    data: SiteData | None = None,
    seed: int = 0,
    **work: Any,
) -> Client:
    """A lone client over site ``site`` of the tiny federation (all its images as training data),
    or over ``data`` when given (named as site ``site``)."""
    base = {
        "epochs": 1,
        "steps": None,
        "batch_size": 4,
        "optimizer": "adam",
        "lr": 1e-2,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "augment": False,
        "shuffle": True,
    }
    base.update(work)
    return Client(
        f"site{site}",
        model,
        {} if state is None else state,
        tiny_federation().sites[site] if data is None else data,
        LocalWork(**base),
        round=round,
        seed=seed,
        device=torch.device("cpu"),
        budget=budget if budget is not None else Budget(),
        persist_optimizer=persist_optimizer,
    )


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


__all__ = [
    "capturing",
    "floating",
    "make_client",
    "run",
    "state_of",
    "tiny_federation",
    "tiny_unet",
]


def assert_untouched_copy(tuned: torch.nn.Module, client: Client, budget: Budget) -> None:
    """An evaluation that does no pass: a copy of the client's model, equal entry for entry, and
    nothing counted or stored (no optimizer made)."""
    assert tuned is not client.model
    for k, v in client.model.state_dict().items():
        assert torch.equal(tuned.state_dict()[k], v), k
    assert budget.samples == {} and client.state == {}


def exactly(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for this message and nothing else."""
    return "^" + re.escape(message) + "$"
