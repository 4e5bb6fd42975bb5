"""FedRDN: inputs normalized by the statistics of a random client, shared once at setup."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pflbench.client import Client
from pflbench.method import Method, ServerView

OWN = "fedrdn/own"  # this client's (mean, std) per channel
BANK = "fedrdn/bank"  # every client's (mean, std), received once at setup


def channel_statistics(images: torch.Tensor, site: str) -> dict[str, torch.Tensor]:
    """Per-channel mean and standard deviation of a site's images, as the official
    ``statisc_data``: each image's channel mean and (unbiased) std, averaged over the images."""
    if len(images) == 0:
        raise ValueError(f"fedrdn: site {site!r} has no training images to take statistics of")
    flat = images.flatten(2)
    mean = flat.mean(2).mean(0)
    std = flat.std(2).mean(0)
    if not bool((std > 0).all()):
        raise ValueError(
            f"fedrdn: site {site!r} has a channel whose images are all constant (std 0); "
            "its inputs cannot be normalized"
        )
    return {"mean": mean.float(), "std": std.float()}


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.to(x.device).view(shape)) / std.to(x.device).view(shape)


class Normalized(nn.Module):
    """A model evaluated on inputs normalized by fixed statistics (the client's own)."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x, self.mean, self.std))


class FedRDN(Method):
    """FedAvg whose training inputs are normalized with a randomly chosen client's statistics.

    Paper: Yan et al., FedRDN, arXiv 2306.09363 (its text was not available here: this
    implementation follows the official code, IAMJackYan/FedRDN ``fedavg_with_preprocess.py``).

    Setup: each client sends the per-channel mean and std of its training images (each image's
    channel statistics averaged over its images; 2·C float32 numbers, never an image or a label);
    every client receives every client's statistics, its own included. Training: each batch of
    the suite's budget is normalized (x − μ)/σ with μ and σ drawn at random from the bank,
    **independently** of each other as in the official code (``random.choice`` on the means and
    on the stds), after the suite's augmentation. Evaluation: the global model on inputs
    normalized with the client's own statistics (official ``test``). Rounds as FedAvg.

    Bytes: setup up 2·C·4 per client, down N·2·C·4 per client (counted as setup messages); each
    round as FedAvg. No extra passes; optimizer state reset every round.
    """

    name = "fedrdn"
    newcomer = (
        "the global model w on inputs normalized by the new site's own channel statistics (from "
        "its unlabelled train images)"
    )
    paper = "Yan et al., arXiv:2306.09363"
    official_code = "IAMJackYan/FedRDN (fedavg_with_preprocess.py)"
    personal = "nothing (the statistics bank is received once at setup)"
    evaluates = "the global model w on inputs normalized by the client's own statistics"
    deviations: ClassVar[tuple[str, ...]] = (
        "statistics are taken on the raw training images, before augmentation; the official code takes them through its (augmenting) train loader",
    )

    def setup(self, client: Client) -> dict[str, torch.Tensor]:
        stats = channel_statistics(client.train_data.images, client.id)
        client.state[OWN] = stats
        return stats

    def setup_server(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        """Every client gets the whole bank (its own statistics included, as the official code)."""
        bank = {cid: dict(p) for cid, p in sorted(payloads.items())}
        return {cid: bank for cid in payloads}

    def receive_setup(self, client: Client, message: Any) -> None:
        client.state[BANK] = dict(message)

    def local_update(self, client: Client) -> None:
        bank: dict[str, dict[str, torch.Tensor]] = client.state.get(BANK, {})
        if not bank:
            raise RuntimeError(f"fedrdn: client {client.id} has no statistics bank (setup not run)")
        means = [bank[c]["mean"] for c in sorted(bank)]
        stds = [bank[c]["std"] for c in sorted(bank)]

        def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            g = None
            for x, y in client.batches("local"):
                if g is None:  # drawn after the batch stream's own seeds: FedAvg's data order
                    g = client.generator("fedrdn")
                i = int(torch.randint(len(means), (1,), generator=g))
                j = int(torch.randint(len(stds), (1,), generator=g))
                yield normalize(x, means[i], stds[j]), y

        client.fit(batches=stream())

    def eval_model(self, client: Client) -> nn.Module:
        own = client.state[OWN]
        return Normalized(client.model, own["mean"], own["std"])

    def newcomer_model(self, view: ServerView, site: Client) -> nn.Module:
        """The global model on inputs normalized by the new site's own statistics, taken from its
        unlabelled train images as every client's are at setup."""
        own = channel_statistics(site.train_data.images, site.id)
        return Normalized(super().newcomer_model(view, site), own["mean"], own["std"])
