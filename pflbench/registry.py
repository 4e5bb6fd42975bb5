"""Plugin registry: methods, datasets and models found through Python entry points.

Built-in plugins are registered in pflbench's own ``pyproject.toml`` exactly as a third-party
package registers its own, so there is one code path for both. A suite may also name a class
directly as ``package.module:Class``. A plugin that fails to import is reported with its error
and never breaks the rest of the registry.

Only subclasses of the kind's base class are accepted (:class:`~pflbench.method.Method`,
:class:`~pflbench.dataset.Dataset`, :class:`torch.nn.Module`): a suite cannot make pflbench call
an arbitrary importable function such as ``subprocess:getoutput``. Two distributions registering
the same name is an error naming both, unless the suite selects one as ``name@distribution``;
:func:`provenance` gives the distribution and version that go into manifests and run keys.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib.metadata import (
    EntryPoint,
    PackageNotFoundError,
    entry_points,
    packages_distributions,
    version,
)
from typing import Any

GROUPS = {
    "methods": "pflbench.methods",
    "datasets": "pflbench.datasets",
    "models": "pflbench.models",
}


class RegistryError(LookupError):
    """An unknown or broken plugin name; the message suggests close names."""


#: The class every plugin of a kind must derive from (module, class), imported when checked.
BASES = {
    "methods": ("pflbench.method", "Method"),
    "datasets": ("pflbench.dataset", "Dataset"),
    "models": ("torch.nn", "Module"),
}


def _dist(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _describe(ep: EntryPoint) -> str:
    name, ver = _dist(ep)
    return f"{name or '?'} {ver or ''} ({ep.value})".replace("  ", " ")


@dataclass
class Registry:
    """The plugins of one kind (``methods``, ``datasets`` or ``models``)."""

    kind: str
    _loaded: dict[str, Any] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return GROUPS[self.kind]

    def all_entry_points(self) -> dict[str, list[EntryPoint]]:
        """Every registration of each name, one per distribution, in discovery order."""
        out: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=self.group):
            regs = out.setdefault(ep.name, [])
            if all(_dist(e)[0] != _dist(ep)[0] for e in regs):
                regs.append(ep)
        return out

    def entry_points(self) -> dict[str, EntryPoint]:
        """The first registration of each name (see :meth:`resolve` for duplicates)."""
        return {name: regs[0] for name, regs in self.all_entry_points().items()}

    def resolve(self, name: str) -> EntryPoint:
        """The entry point a suite's ``name`` or ``name@distribution`` selects."""
        base, _, want = name.partition("@")
        regs = self.all_entry_points().get(base)
        if not regs:
            raise RegistryError(self._unknown_message(base, self.entry_points()))
        if want:
            for ep in regs:
                if (_dist(ep)[0] or "").lower().replace("_", "-") == want.lower().replace("_", "-"):
                    return ep
            raise RegistryError(
                f"{self.kind[:-1]} {name!r}: no distribution {want!r} registers {base!r} "
                f"(registered by: {', '.join(_describe(e) for e in regs)})"
            )
        if len(regs) > 1:
            raise RegistryError(
                f"{self.kind[:-1]} name {base!r} is registered twice: by "
                + " and by ".join(_describe(e) for e in regs)
                + "; select one in the suite as "
                + " or ".join(f"'{base}@{_dist(e)[0]}'" for e in regs)
            )
        return regs[0]

    def names(self) -> list[str]:
        return sorted(self.entry_points())

    def load(self, name: str) -> Any:
        """The class registered as ``name`` (``name@distribution``), or the class at
        ``package.module:Class``; it must derive from the kind's base class."""
        if name in self._loaded:
            return self._loaded[name]
        if ":" in name:
            obj = _import_path(name, self.kind)
        else:
            try:
                ep = self.resolve(name)
            except RegistryError as exc:
                if name.partition("@")[0] in self.all_entry_points():  # ambiguous: `list` says so
                    self._errors[name] = str(exc)
                raise
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin names itself and its error
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                raise RegistryError(
                    f"{self.kind[:-1]} plugin {name!r} ({ep.value}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        module, cls_name = BASES[self.kind]
        base = getattr(importlib.import_module(module), cls_name)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            what = type(obj).__name__ if not isinstance(obj, type) else f"class {obj.__name__}"
            raise RegistryError(
                f"{self.kind[:-1]} {name!r} is a {what}, not a subclass of "
                f"{module}.{cls_name}; a suite may only name {self.kind}"
            )
        self._loaded[name] = obj
        return obj

    def provenance(self, name: str) -> dict[str, Any]:
        """Where ``name``'s class comes from: distribution, version and object path."""
        if ":" in name:
            top = name.split(":", 1)[0].split(".", 1)[0]
            dists = packages_distributions().get(top) or [None]
            dist = dists[0]
            try:
                ver = version(dist) if dist else None
            except PackageNotFoundError:
                ver = None
            return {"distribution": dist, "version": ver, "value": name}
        ep = self.resolve(name)
        dist, ver = _dist(ep)
        return {"distribution": dist, "version": ver, "value": ep.value}

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
