"""The clients of one federation: per-site train / val / test splits built from the case split.

In tuning mode the test split is never built: asking for it raises, so a tuning run cannot
select on test data even by accident.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from pflbench.data import FederatedData, SiteData

Mode = Literal["final", "tune"]


class TestSplitAccessError(RuntimeError):
    """The test split was requested while tuning."""


@dataclass
class ClientSplits:
    """One site's splits. ``test`` is built on first use, and never in tuning mode."""

    name: str
    train: SiteData
    val: SiteData
    _source: SiteData = field(repr=False)
    _test_cases: list[str] = field(repr=False)
    mode: Mode = "final"
    _test: SiteData | None = field(default=None, repr=False)

    @property
    def test(self) -> SiteData:
        if self.mode == "tune":
            raise TestSplitAccessError(
                f"site {self.name!r}: the test split is not available while tuning "
                "(selection and pruning use the validation split only)"
            )
        if self._test is None:
            self._test = self._source.subset(self._test_cases, name=self.name)
        return self._test

    def placed(self, device: torch.device | None, pin: bool = False) -> ClientSplits:
        """These splits on ``device`` (or pinned on the host): train and val, and the test split
        in final mode (built now, so that the whole site is never copied)."""
        test = self.test.to(device, pin) if self.mode == "final" else None
        return dataclasses.replace(
            self, train=self.train.to(device, pin), val=self.val.to(device, pin), _test=test
        )

    @property
    def nbytes(self) -> int:
        test = self.test.nbytes if self.mode == "final" else 0
        return self.train.nbytes + self.val.nbytes + test


Placement = Literal["device", "pinned", "host"]

#: The share of the free GPU memory the sites' data may take when placed on the device.
RESIDENT_SHARE = 0.5


def choose_placement(
    setting: Literal["auto", "host"], device: torch.device, nbytes: int, free_bytes: int | None
) -> Placement:
    """Where the clients' data live: with ``auto`` on a GPU, on the device when all of it fits in
    :data:`RESIDENT_SHARE` of the free memory (no copy per batch at all), else in pinned host
    memory (asynchronous copies); on the CPU, or with ``host``, where they were loaded."""
    if setting == "host" or device.type != "cuda":
        return "host"
    if free_bytes is not None and nbytes <= RESIDENT_SHARE * free_bytes:
        return "device"
    return "pinned"


def place_clients(
    clients: list[ClientSplits], setting: Literal["auto", "host"], device: torch.device
) -> tuple[list[ClientSplits], Placement]:
    """:func:`choose_placement` for these clients, applied. Off a GPU nothing is counted (the
    count builds each test split) and nothing moves."""
    if device.type != "cuda":
        return clients, "host"
    free = torch.cuda.mem_get_info(device)[0]
    where = choose_placement(setting, device, sum(c.nbytes for c in clients), free)
    if where == "host":
        return clients, where
    target = device if where == "device" else None
    return [c.placed(target, pin=where == "pinned") for c in clients], where


def build_clients(
    data: FederatedData, splits: dict[str, dict[str, list[str]]], mode: Mode = "final"
) -> list[ClientSplits]:
    clients = []
    for site in data.sites:
        s = splits[site.name]
        clients.append(
            ClientSplits(
                name=site.name,
                train=site.subset(s["train"]),
                val=site.subset(s["val"]),
                _source=site,
                _test_cases=list(s["test"]),
                mode=mode,
            )
        )
    return clients
