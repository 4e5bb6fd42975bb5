"""The clients of one federation: per-site train / val / test splits built from the case split.

In tuning mode the test split is never built: asking for it raises, so a tuning run cannot
select on test data even by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
