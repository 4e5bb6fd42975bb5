"""The dataset plugin contract.

A dataset plugin is a class registered under the entry-point group ``pflbench.datasets``. The suite
names it and passes its options as keyword arguments; unknown options are an error that names the
option. ``load()`` returns a :class:`~pflbench.data.FederatedData`; the split and everything after
it are the engine's.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pflbench.data import FederatedData


@dataclass
class CheckReport:
    """What ``pflbench data check`` prints: per-site counts and every problem found."""

    dataset: str
    root: str
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: The layout the loader expects, printed once after the problems when a folder is missing.
    expected_tree: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


class Dataset(ABC):
    """Base class of dataset plugins; subclasses declare their options as ``__init__`` keywords."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The folder layout a real dataset expects, printed when the folder is missing or malformed.
    expected_tree: ClassVar[str] = ""

    @abstractmethod
    def load(self) -> FederatedData:
        """Build the federation (all sites, all images) in memory."""

    def check(self) -> CheckReport:
        """Inspect the source without training; real-data plugins override this."""
        data = self.load()
        report = CheckReport(dataset=self.name, root=str(getattr(self, "root", "")))
        for s in data.sites:
            report.sites[s.name] = {"cases": len(s.cases), "images": len(s)}
        return report

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (used in the run key)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}
