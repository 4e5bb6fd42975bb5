"""Configuration identity of finished runs: which runs are seeds of one configuration.

A run key hashes a run's semantic configuration *with* its seed; reports and summaries average over
seeds, so they group runs by the same semantic part *without* the seed (:func:`config_key`).
Two configurations under one (dataset, method, label) in one folder — say a 2-round and a 3-round
run of the same suite — must never be averaged into one number: :func:`check_configs` refuses
them with the keys that differ, :func:`split_labels` gives each its own row instead, and
:func:`select_runs` keeps the runs that match ``KEY=VALUE`` filters.

Only manifests are read (``pflbench.results``), so old result folders work too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Protocol fields that say where and how fast a run ran, or what it stores besides its numbers,
#: not what it computed (as the run key: :data:`pflbench.suite.UNKEYED`).
LOCAL_PROTOCOL = ("threads", "device", "store", "qualitative_cases", "data_placement")
#: Shared hyperparameters a tuning sweep searches: part of a method's configuration when tuned.
SHARED_HYPERPARAMETERS = ("optimizer.lr", "local_epochs", "local_steps", "batch_size")
#: The run-group columns reports aggregate over seeds within.
GROUP = ("dataset", "method", "label")


class ConfigError(ValueError):
    """Runs of different configurations share one (dataset, method, label), or a bad --select."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``protocol.optimizer.lr``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The semantic configuration of a run without its seed, as dotted keys.

    Mirrors :meth:`pflbench.runner.RunSpec.semantic` from what the manifest records: the dataset
    (its label, name and data fingerprint, which covers the options and the case split), the method
    and every hyperparameter, the protocol without the local fields, the model, the mode and the
    pflbench version.
    """
    protocol = {
        k: v for k, v in (manifest.get("protocol") or {}).items() if k not in LOCAL_PROTOCOL
    }
    sem = {
        "dataset": manifest.get("dataset"),
        "dataset_name": manifest.get("dataset_name", manifest.get("dataset")),
        "data_fingerprint": manifest.get("data_fingerprint"),
        "method_name": manifest.get("method_name", manifest.get("method")),
        "params": manifest.get("params") or {},
        "protocol": protocol,
        "model": manifest.get("model") or {},
        "mode": manifest.get("mode", "final"),
        "version": (manifest.get("versions") or {}).get("pflbench"),
    }
    unseen = manifest.get("unseen")
    if unseen:  # the federations of one leave-one-out design are one configuration
        sem["unseen"] = {k: v for k, v in unseen.items() if k != "held_out"}
    return flatten(sem)


def config_key(manifest: Mapping[str, Any]) -> str:
    """Hash (12 hex digits) of :func:`config_fields`: equal for the seeds of one configuration."""
    blob = json.dumps(config_fields(manifest), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def protocol_differences(manifests: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Protocol keys whose values differ between the runs of one dataset (a fairness problem).

    The local fields never count. Where the runs come from a tuning sweep (any label tuned or
    default), the searched shared hyperparameters (:data:`SHARED_HYPERPARAMETERS`) belong to each
    method's configuration, not to the protocol, so a tuned learning rate is not a "different
    protocol"; every other protocol key still is.
    """
    swept = any(m.get("label") in ("tuned", "default") for m in manifests)
    fields = []
    for m in manifests:
        p = {
            k: v
            for k, v in flatten(m.get("protocol") or {}).items()
            if k.split(".")[0] not in LOCAL_PROTOCOL and not (swept and k in SHARED_HYPERPARAMETERS)
        }
        fields.append(p)
    out: dict[str, list[Any]] = {}
    for k in sorted({k for f in fields for k in f}):
        vals: list[Any] = []
        for f in fields:
            if (v := f.get(k, "(unset)")) not in vals:
                vals.append(v)
        if len(vals) > 1:
            out[k] = vals
    return out


def describe(diff: Mapping[str, Sequence[Any]]) -> str:
    """ "protocol.rounds: 2 vs 3; params.mu: 0.01 vs 0.1" """
    return "; ".join(f"{k}: {' vs '.join(_show(v) for v in vs)}" for k, vs in diff.items())


def differing_keys(manifests: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Dotted key → the distinct values it takes, for the keys whose values differ."""
    fields = [config_fields(m) for m in manifests]
    keys = sorted({k for f in fields for k in f})
    out: dict[str, list[Any]] = {}
    for k in keys:
        vals: list[Any] = []
        for f in fields:
            v = f.get(k, "(unset)")
            if v not in vals:
                vals.append(v)
        if len(vals) > 1:
            out[k] = vals
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def conflicts(manifests: Iterable[Mapping[str, Any]]) -> dict[tuple[str, ...], list[dict]]:
    """Run groups (dataset, method, label) holding more than one configuration."""
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for m in manifests:
        g = tuple(str(m.get(c)) for c in GROUP)
        groups.setdefault(g, {}).setdefault(config_key(m), dict(m))
    return {g: list(c.values()) for g, c in groups.items() if len(c) > 1}


def check_configs(manifests: Sequence[Mapping[str, Any]], where: str = "") -> None:
    """Refuse a folder where one (dataset, method, label) holds several configurations."""
    bad = conflicts(manifests)
    if not bad:
        return
    lines = []
    for (d, m, lab), confs in sorted(bad.items()):
        shown = describe(differing_keys(confs))
        lines.append(f"{d} / {m} / {lab}: {len(confs)} configurations differing in {shown}")
    first = next(iter(differing_keys(next(iter(bad.values()))).items()))
    example = f"{first[0]}={_show(first[1][-1])}"
    raise ConfigError(
        f"{where + ': ' if where else ''}runs of different configurations would be averaged "
        f"into one number — {' | '.join(lines)}. Select one with --select {example} "
        "(repeatable), show each configuration as its own row with --split-configs, or run "
        "into a new --out folder."
    )


def parse_select(items: Iterable[str]) -> dict[str, str]:
    """``["protocol.rounds=3", ...]`` → {"protocol.rounds": "3"}; a malformed item is an error."""
    out = {}
    for it in items:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--select {it!r}: expected KEY=VALUE, e.g. protocol.rounds=3")
        out[key.strip()] = value.strip()
    return out


def _matches(value: Any, want: str) -> bool:
    if _show(value) == want or str(value) == want:
        return True
    try:
        return float(value) == float(want)
    except (TypeError, ValueError):
        return False


def select_runs(
    manifests: Sequence[Mapping[str, Any]], select: Mapping[str, str]
) -> list[Mapping[str, Any]]:
    """The runs whose configuration matches every ``KEY=VALUE`` (runs without KEY are kept).

    A key that no run has is an error that lists the keys there are, so a typo never selects all.
    """
    if not select:
        return list(manifests)
    fields = [config_fields(m) for m in manifests]
    known = {k for f in fields for k in f}
    for k in select:
        if k not in known:
            raise ConfigError(
                f"--select {k}=…: no run has the key {k!r}; keys: {', '.join(sorted(known))}"
            )
    return [
        m
        for m, f in zip(manifests, fields, strict=True)
        if all(k not in f or _matches(f[k], v) for k, v in select.items())
    ]


#: Keys that tell datasets apart, not configurations of a method.
DATASET_KEYS = ("dataset", "dataset_name", "data_fingerprint")


def split_labels(manifests: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """run_key → the method label to show when a method has several configurations.

    Every run of such a method (on every dataset, so its rows line up across datasets) gets the
    keys that differ appended ("fedavg [rounds=3]"); other runs keep their method name.
    """
    keys: dict[tuple[str, str], list[str]] = {}
    for (_, method, label), confs in conflicts(manifests).items():
        got = keys.setdefault((method, label), [])
        got += [k for k in differing_keys(confs) if k not in got and k not in DATASET_KEYS]
    out: dict[str, str] = {}
    for m in manifests:
        diff = keys.get((str(m.get("method")), str(m.get("label"))))
        if not diff:
            continue
        f = config_fields(m)
        tag = ", ".join(f"{_short(k)}={_show(f.get(k, '(unset)'))}" for k in diff)
        out[str(m.get("run_key"))] = f"{m.get('method')} [{tag}]"
    return out


def _short(key: str) -> str:
    """``protocol.rounds`` → ``rounds`` (protocol keys are the common case), else unchanged."""
    return key.removeprefix("protocol.")
