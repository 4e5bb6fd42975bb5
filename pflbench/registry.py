"""Plugin registry: methods, datasets and models found through Python entry points.

Built-in plugins are registered in pflbench's own ``pyproject.toml`` exactly as a third-party
package registers its own, so there is one code path for both. A suite may also name a class
directly as ``package.module:Class``. A plugin that fails to import is reported with its error
and never breaks the rest of the registry.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUPS = {
    "methods": "pflbench.methods",
    "datasets": "pflbench.datasets",
    "models": "pflbench.models",
}


class RegistryError(LookupError):
    """An unknown or broken plugin name; the message suggests close names."""


@dataclass
class Registry:
    """The plugins of one kind (``methods``, ``datasets`` or ``models``)."""

    kind: str
    _loaded: dict[str, Any] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return GROUPS[self.kind]

    def entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(self.entry_points())

    def load(self, name: str) -> Any:
        """The class registered as ``name``, or the class at ``package.module:Class``."""
        if name in self._loaded:
            return self._loaded[name]
        if ":" in name:
            obj = _import_path(name, self.kind)
        else:
            eps = self.entry_points()
            if name not in eps:
                raise RegistryError(self._unknown_message(name, eps))
            try:
                obj = eps[name].load()
            except Exception as exc:  # a broken plugin names itself and its error
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                raise RegistryError(
                    f"{self.kind[:-1]} plugin {name!r} ({eps[name].value}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        self._loaded[name] = obj
        return obj

    def load_all(self) -> dict[str, Any]:
        """Every plugin that imports; the broken ones are collected in :attr:`errors`."""
        out = {}
        for name in self.names():
            try:
                out[name] = self.load(name)
            except RegistryError:
                pass
        return out

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def _unknown_message(self, name: str, eps: dict[str, EntryPoint]) -> str:
        what = self.kind[:-1]
        close = difflib.get_close_matches(name, list(eps), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(eps)) or "none installed"
        return f"unknown {what} {name!r}{hint} (known: {known}; or name a class as package.module:Class)"


def _import_path(path: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RegistryError(f"{kind[:-1]} {path!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RegistryError(
            f"{kind[:-1]} {path!r}: module {module_name!r} has no {attr!r}"
        ) from exc


_REGISTRIES: dict[str, Registry] = {}


def registry(kind: str) -> Registry:
    """The process-wide registry of one kind."""
    if kind not in GROUPS:
        raise ValueError(f"unknown registry {kind!r}; expected one of {sorted(GROUPS)}")
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def get_method(name: str) -> Any:
    return registry("methods").load(name)


def get_dataset(name: str) -> Any:
    return registry("datasets").load(name)


def get_model(name: str) -> Any:
    return registry("models").load(name)
