"""Multi-site data containers and the case-level split shared by every dataset plugin.

A dataset plugin turns a folder (or a generator) into a :class:`FederatedData`: one
:class:`SiteData` per site with every image of that site. The split into train / val / test is
done here, by case (patient), seeded and independent of method and run seed, so that every method
and seed sees the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class DataError(ValueError):
    """A dataset folder or file is not what the loader expects; the message names it."""


@dataclass
class SiteData:
    """All images of one site (or one split of a site), held in memory as tensors.

    ``images`` is float32 N×C×H×W in [0, 1]; ``labels`` is int64 N×H×W with class ids;
    ``case_ids`` names the case (patient / volume) of every image, so that slices of one
    volume stay together; ``slice_index`` orders slices inside a volume (0 for 2-D data).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    case_ids: list[str]
    slice_index: list[int] = field(default_factory=list)
    spacing: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if not self.slice_index:
            self.slice_index = [0] * n
        if self.images.ndim != 4:
            raise DataError(
                f"site {self.name!r}: images must be N×C×H×W, got {tuple(self.images.shape)}"
            )
        if self.labels.shape != (n, *self.images.shape[2:]):
            raise DataError(
                f"site {self.name!r}: labels {tuple(self.labels.shape)} do not match images "
                f"{tuple(self.images.shape)} (expected N×H×W)"
            )
        if len(self.case_ids) != n or len(self.slice_index) != n:
            raise DataError(f"site {self.name!r}: {n} images but {len(self.case_ids)} case ids")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def cases(self) -> list[str]:
        """Distinct case ids in first-seen order."""
        return list(dict.fromkeys(self.case_ids))

    @property
    def nbytes(self) -> int:
        """Bytes of its images and labels (what placing it on a device costs)."""
        return self.images.nbytes + self.labels.nbytes

    def to(self, device: torch.device | None = None, pin: bool = False) -> SiteData:
        """The same site on ``device``, or in pinned (page-locked) host memory with ``pin``, from
        which copies to a GPU are asynchronous."""
        images, labels = self.images, self.labels
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return dataclasses.replace(self, images=images, labels=labels)

    def subset(self, cases: Sequence[str], name: str | None = None) -> SiteData:
        keep = set(cases)
        idx = [i for i, c in enumerate(self.case_ids) if c in keep]
        index = torch.as_tensor(idx, dtype=torch.long, device=self.images.device)
        return SiteData(
            name=name or self.name,
            images=self.images.index_select(0, index),
            labels=self.labels.index_select(0, index),
            case_ids=[self.case_ids[i] for i in idx],
            slice_index=[self.slice_index[i] for i in idx],
            spacing=self.spacing,
        )


@dataclass
class FederatedData:
    """What a dataset plugin returns: the sites plus the label semantics.

    ``classes`` names the class ids of ``labels`` (index = id, 0 = background).
    ``structures`` maps each reported structure to the class ids that form it, so nested
    structures are expressible (fundus: disc = {1, 2}, cup = {2}).
    ``case_level`` says whether a case is an ``image`` or a ``volume`` (slices of one case id).
    """

    name: str
    sites: list[SiteData]
    classes: list[str]
    structures: dict[str, list[int]]
    case_level: Literal["image", "volume"] = "image"
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    predefined_splits: dict[str, dict[str, list[str]]] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.sites[0].images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def fingerprint(self) -> str:
        """A content hash of the data: changes whenever an image, a label or a case id changes."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.classes, self.structures, self.case_level]).encode())
        for s in self.sites:
            h.update(s.name.encode())
            h.update(json.dumps(s.case_ids).encode())
            h.update(s.images.contiguous().numpy().tobytes())
            h.update(s.labels.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def split_cases(
    cases: Sequence[str], fractions: tuple[float, float, float], seed: int, site: str
) -> dict[str, list[str]]:
    """Split case ids into train / val / test by the given fractions, seeded per site.

    Every split gets at least one case when there are at least three cases; the order inside a
    split follows the input order so the result does not depend on set iteration order.
    """
    cases = list(cases)
    n = len(cases)
    if n < 3:
        raise DataError(f"site {site!r}: {n} case(s); at least 3 are needed for train/val/test")
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{site}".encode()).digest()[:8], "little")
    perm = np.random.default_rng(digest).permutation(n)
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, 1, n - 2
    chosen = {
        "train": sorted(perm[:n_train].tolist()),
        "val": sorted(perm[n_train : n_train + n_val].tolist()),
        "test": sorted(perm[n_train + n_val :].tolist()),
    }
    return {k: [cases[i] for i in v] for k, v in chosen.items()}


def make_splits(data: FederatedData, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Case-level splits for every site: ``{site: {split: [case ids]}}``.

    Uses the dataset's predefined splits where it has them (e.g. an official test set).
    The split seed is the dataset's, never the run seed, so every run sees the same split.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for site in data.sites:
        if data.predefined_splits and site.name in data.predefined_splits:
            out[site.name] = {k: list(v) for k, v in data.predefined_splits[site.name].items()}
        else:
            out[site.name] = split_cases(site.cases, data.split_fractions, seed, site.name)
        seen: dict[str, str] = {}
        for split, ids in out[site.name].items():
            for c in ids:
                if c in seen:
                    raise DataError(
                        f"site {site.name!r}: case {c!r} is in both {seen[c]} and {split}"
                    )
                seen[c] = split
    return out


def splits_fingerprint(data: FederatedData, splits: dict[str, dict[str, list[str]]]) -> str:
    h = hashlib.sha256(data.fingerprint().encode())
    h.update(json.dumps(splits, sort_keys=True).encode())
    return h.hexdigest()[:16]
