"""Plugins for tests/test_faults.py: a method that diverges on demand, and a hostile class."""

from __future__ import annotations

from typing import ClassVar

from pflbench.client import Client, _seed
from pflbench.method import Method
from pflbench.params import Param
from pflbench.training import Diverged


class BreaksAt(Method):
    """FedAvg that diverges in round ``at`` (0: never) for the run seed ``seed`` (-1: any)."""

    name = "breaks_at"
    params: ClassVar[dict[str, Param]] = {
        "at": Param(0, help="round to diverge in"),
        "seed": Param(-1, help="run seed that diverges (-1: every seed)"),
    }

    def local_update(self, client: Client) -> None:
        hit = self.hparams["seed"] < 0 or client._seed == _seed(self.hparams["seed"], "client")
        if hit and client.round == self.hparams["at"]:
            raise Diverged(f"non-finite loss (nan) in round {client.round} (test)")
        super().local_update(client)


class NotAMethod:
    """Any importable class that is not a Method: a suite must not be able to build it."""

    built = 0

    def __init__(self, **kwargs: object) -> None:
        type(self).built += 1
