"""FedCAC: critical parameters averaged only with clients whose critical sets overlap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.params import Param
from pflbench.partition import Partition, parameter_entries

CRITICAL = "fedcac/critical"  # this client's critical-entry masks (True = critical), per parameter

#: Below this the official code treats a top-τ threshold as zero (``thresh <= 1e-10``) ...
_ZERO_THRESHOLD = 1e-10
#: ... and then takes the smallest score above this as the threshold (``metric > 1e-20``).
_NONZERO = 1e-20


def sensitivity(before: Mapping[str, torch.Tensor], after: nn.Module) -> dict[str, torch.Tensor]:
    """|Δθ ⊙ θ| of every parameter: the round's change times the value it ended at."""
    return {n: ((p.detach() - before[n]) * p.detach()).abs() for n, p in after.named_parameters()}


def critical_mask(score: torch.Tensor, tau: float) -> torch.Tensor:
    """The critical entries of one parameter tensor: its top-τ by score (official rule).

    The threshold is the ⌊τ·n⌋-th largest score and every entry at or above it is critical
    (ties included); when that threshold is (numerically) zero the official code lowers it to
    the smallest non-zero score, so that every entry that moved is critical.
    """
    flat = score.flatten()
    k = int(tau * flat.numel())
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = torch.topk(flat, k).values[-1]
    if float(thresh) <= _ZERO_THRESHOLD:
        moved = flat[flat > _NONZERO]
        if moved.numel():
            thresh = moved.min()
    return score >= thresh


def overlap(mine: torch.Tensor, other: torch.Tensor) -> float:
    """1 − Σ|cᵢ − cⱼ| / (2 Σ cᵢ) over the flattened critical masks of the whole model.

    Normalised by client i's own count, as in the official code, so it is not symmetric.
    """
    count = float(mine.sum())
    if count == 0:
        return 0.0
    return 1.0 - float((mine.float() - other.float()).abs().sum()) / (2.0 * count)


def collaboration_threshold(
    overlaps: Mapping[tuple[str, str], float], t: int, beta: float
) -> float:
    """avg + t/β · (max − avg) over the off-diagonal overlaps: rises from the mean to the
    maximum in β aggregations, so collaboration on critical entries narrows over rounds."""
    if not overlaps:
        return float("inf")
    values = list(overlaps.values())
    avg, top = sum(values) / len(values), max(values)
    return avg + t / beta * (top - avg)


def _flat(masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([masks[k].flatten() for k in sorted(masks)])


class FedCAC(Method):
    """FedAvg for non-critical entries; critical entries averaged only among similar clients.

    Paper: Wu, Liu, Niu, Zhu, Tang, "Bold but Cautious: Unlocking the Potential of
    Personalized Federated Learning through Cautiously Aggressive Collaboration", ICCV 2023
    (arXiv 2309.11103). Checked against the official code, FLAIR-Community/Fling
    (``fedcac_client.py``, ``fedcac_group.py``, ``flzoo/cifar10/cifar10_fedcac_resnet_config.py``).

    Client: E local epochs from its model θᵢ⁰; then, per parameter tensor, the sensitivity
    |(θᵢ − θᵢ⁰) ⊙ θᵢ| and the critical mask cᵢ = its top-``tau`` entries (:func:`critical_mask`,
    the official threshold rule); uploads its parameters and cᵢ (one bit per entry). Server:
    the global model w = n-weighted mean of the uploads; the overlap of i with j is
    1 − Σ|cᵢ − cⱼ| / (2 Σ cᵢ) over the whole model; the threshold is avg + t/β·(max − avg) with t
    the aggregation number (the round); client i's customized model is the *unweighted* mean of
    the uploads of i and of every j whose overlap with i reaches the threshold (official code).
    Client i receives cᵢ ⊙ customizedᵢ + (1 − cᵢ) ⊙ w: the server mixes it, since it holds cᵢ,
    so one model goes down per client (the official group holds both models and mixes in its
    ``sync``; the result is the same).

    Segmentation changes nothing here: FedCAC has no head and no classes, its masks cover every
    parameter of the U-Net. Buffers: as in the official ``sync``, which writes
    ``named_parameters()`` only, BN running statistics are never sent or overwritten; each client
    keeps its own. A client that did not upload this round (partial participation; the official
    code has every client train every round) receives w on its last known non-critical entries
    and keeps its critical ones; a client the server has never heard from receives nothing.
    Defaults: τ = 0.5, β = 100 (the official CIFAR-10 config; its CIFAR-100 config uses 0.4
    and 170, inside the search ranges); β counts aggregations (rounds), so with far fewer
    rounds than β the threshold stays near the mean overlap; β may be any real ≥ 1 (the
    official code asserts an integer). No extra local passes (the score needs no data); optimizer state per the suite; the
    evaluated model is θᵢ after receipt (the official ``after_aggregation`` test).
    """

    name = "fedcac"
    newcomer = (
        "the uniform average of the final per-client messages (≈ the global mean of every "
        "parameter); BN statistics (not sent) recomputed on the new site's unlabelled train images"
    )
    paper = "Wu et al., ICCV 2023, arXiv:2309.11103"
    official_code = "FLAIR-Community/Fling (fedcac_client.py, fedcac_group.py)"
    shares = "parameters; non-critical entries averaged over all clients (n-weighted)"
    personal = (
        "BN running statistics; critical entries (top-τ of |Δθ⊙θ| per tensor) averaged only "
        "with clients whose critical masks overlap above the threshold"
    )
    evaluates = "θᵢ after receipt: cᵢ ⊙ customized mean + (1 − cᵢ) ⊙ global mean"
    extra_passes = "none (the critical score needs no data)"
    deviations: ClassVar[tuple[str, ...]] = (
        "under partial participation a non-uploading client receives the global mean on its "
        "last non-critical entries only (the official code trains every client every round)",
    )
    params = {
        "tau": Param(
            0.5, 0.1, 0.9, valid=(0, 1), help="fraction of each tensor's entries that is critical"
        ),
        "beta": Param(
            100.0,
            10.0,
            300.0,
            log=True,
            valid=(1, None),
            help="aggregations for the overlap threshold to rise from the mean to the maximum",
        ),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.known_masks: dict[str, dict[str, torch.Tensor]] = {}  # server: last cᵢ per client

    def partition(self, model: nn.Module) -> Partition:
        """Parameters only: the official sync never overwrites buffers."""
        return parameter_entries(model)

    def local_update(self, client: Client) -> None:
        before = {n: p.detach().clone() for n, p in client.model.named_parameters()}
        client.fit()
        scores = sensitivity(before, client.model)
        client.state[CRITICAL] = {k: critical_mask(s, self.tau) for k, s in scores.items()}

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        if up is not None:
            up.extras[CRITICAL] = {k: m.clone() for k, m in client.state[CRITICAL].items()}
        return up

    def collaborators(self, uploads: Mapping[str, Upload], round: int) -> dict[str, list[str]]:
        """Whom each uploader averages its critical entries with: itself, then every client
        whose overlap with it reaches this round's threshold."""
        flat = {cid: _flat(u.extras[CRITICAL]) for cid, u in uploads.items()}
        ids = list(flat)
        ov = {(i, j): overlap(flat[i], flat[j]) for i in ids for j in ids if i != j}
        thr = collaboration_threshold(ov, round, self.beta)
        return {i: [i] + [j for j in ids if j != i and ov[(i, j)] >= thr] for i in ids}

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> dict[str, Message]:
        glob = masked_average(uploads)
        messages: dict[str, Message] = {}
        for i, group in self.collaborators(uploads, round).items():
            custom = masked_average(  # unweighted, as the official customized model
                {j: Upload(entries=uploads[j].entries, weight=1.0) for j in group}
            )
            crit = uploads[i].extras[CRITICAL]
            entries = dict(glob.entries)
            for k, c in crit.items():
                entries[k] = torch.where(c.to(entries[k].device), custom.entries[k], entries[k])
            messages[i] = Message(entries=entries)
            self.known_masks[i] = crit
        for cid, crit in self.known_masks.items():
            if cid not in messages:  # did not upload: w on its non-critical entries only
                masks = {k: ~c for k, c in crit.items() if k in glob.entries}
                messages[cid] = Message(entries=dict(glob.entries), masks=masks)
        return messages
