"""FedAS: parameter alignment on receipt, aggregation weighted by the clients' Fisher traces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.aggregation import masked_average, merge_into
from pflbench.client import Client
from pflbench.fisher import batch_fisher
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.methods._common import declared_path, keys_of_module, local_partition, step
from pflbench.params import Param
from pflbench.partition import Partition, parameter_entries

PENDING = "fedas/pending"  # the last global body received, aligned and loaded at the next round
TRACE = "fedas/fisher_trace"


def nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise negative log-likelihood of the labels: the log-likelihood of the empirical
    Fisher (cross-entropy; with one logit channel, the Bernoulli form on labels > 0)."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], (labels > 0).to(logits.dtype))
    return F.cross_entropy(logits, labels)


def pixel_classes(channels: int, labels: torch.Tensor) -> torch.Tensor:
    """The class of each pixel as a model with ``channels`` logits reads it (binary for one)."""
    return (labels > 0).long() if channels == 1 else labels


def fisher_trace(model: nn.Module, client: Client, label: str) -> float:
    """tr F = Σ_batches ‖∇θ NLL(batch)‖² over one pass of the training data, every parameter.

    The official estimate (``clientas.py``): mini-batch gradients of the NLL in eval mode,
    squared and *summed* over batches (not averaged), so more batches give a larger trace.
    """
    total = 0.0
    for x, y in client.batches(label, epochs=1):
        f = batch_fisher(model, x, y, loss_fn=nll, batch_size=len(x))
        total += float(sum(v.sum() for v in f.values()))
    return total


class FedAS(Method):
    """Shared body, personal head; the received body is first aligned to the client's own
    class prototypes; the server averages with weights ∝ the clients' Fisher traces.

    Paper: Yang, Huang, Ye, "FedAS: Bridging Inconsistency in Personalized Federated Learning",
    CVPR 2024. Checked against the official code, xiyuanyang45/FedAS (``clientas.py``,
    ``serveras.py``, a PFLlib fork).

    **Parameter alignment** (official ``set_parameters``): the client computes class prototypes,
    the mean body feature of each class, with its own model; then it trains the received global
    body for ``align_epochs`` epoch(s) (plain SGD, rate ``align_lr``) to bring the features of
    each class's pixels to the local prototype (Σ_c MSE), and loads the aligned body; its head
    stays. **Client synchronization**: after the local epochs (whole model trained), the client
    reports tr F = Σ_batches ‖∇ NLL‖² (:func:`fisher_trace`); the server averages the bodies with
    weights trᵢ / Σⱼ trⱼ (no sample counts): the paper's remedy for stragglers, whose
    under-trained parameters carry little Fisher information and so weigh little.

    Segmentation: the head is the module the model declares at ``head_path`` (the U-Nets' 1×1
    convolution) and the body everything else; a *class* is a pixel class (with one logit
    channel: foreground = label > 0), its prototype the mean of the head's input feature vector
    over the client's pixels of that class; the NLL is the pixel-wise cross-entropy (binary
    with one channel). Timing follows the official code: the global body is aligned and loaded
    when a client is next selected, at the start of its round, so a client's evaluated model
    is its own after local training. Prototype and alignment passes run in train mode (BN on
    batch statistics, as in local training) on copies of the model, so no running statistic
    moves. Buffers: the official code moves ``parameters()`` only, so BN running statistics
    stay local. ``align_epochs: 0`` is the
    paper's w/o-alignment ablation, ``weights: samples`` its w/o-synchronization (FedAvg
    weights). Extra passes, each under its own budget label: ``fedas-prototypes`` (one forward
    pass), ``fedas-align`` (``align_epochs`` epochs), ``fedas-fisher`` (one backward pass).
    """

    name = "fedas"
    newcomer = (
        "the global body + the initial head (the head never leaves the clients); BN statistics "
        "recomputed on the new site's unlabelled images"
    )
    paper = "Yang, Huang, Ye, CVPR 2024"
    official_code = "xiyuanyang45/FedAS (clientas.py, serveras.py)"
    shares = "body parameters, averaged with weights ∝ the clients' Fisher traces"
    personal = "the head (1×1 conv); BN running statistics"
    evaluates = "the client's model after local training (the global body is aligned and loaded at its next round)"
    extra_passes = (
        "`fedas-prototypes`: one forward pass; `fedas-align`: align_epochs epochs; "
        "`fedas-fisher`: one backward pass"
    )
    deviations: ClassVar[tuple[str, ...]] = (
        "alignment mini-batches are the suite's batch size (the official code uses 16)",
        "prototype and alignment passes use BN batch statistics (train mode); the official "
        "code, written for models without BN, runs them in eval mode, which on a U-Net put the "
        "averaged body over each client's own running statistics and made the alignment diverge "
        "(quick suite, fundus-synth, round 6)",
        "a client not selected computes no Fisher trace (the official code computes it for every "
        "client each round; only the uploaders' traces enter the weights, so the average is the same)",
    )
    params = {
        "align_lr": Param(
            0.01, 0.001, 0.1, log=True, valid=(0, None), help="SGD rate of the parameter alignment"
        ),
        "align_epochs": Param(
            1, valid=(0, None), help="epochs of parameter alignment; 0 = without alignment"
        ),
        "weights": Param(
            "fisher",
            choices=("fisher", "samples"),
            search=False,
            help="fisher | samples: aggregation weights (samples = w/o synchronization)",
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        """Body parameters shared; the head and every buffer stay with the client."""
        base = parameter_entries(model)
        head = keys_of_module(model, declared_path(model, "head_path", self.name))
        part = local_partition(model, head, self.name, "head")
        return {k: bool(base[k] and part[k]) for k in base}

    def setup(self, client: Client) -> None:
        """Refuse, before training, a model without a declared head or body features."""
        self.partition(client.model)
        if not callable(getattr(client.model, "feature_forward", None)):
            raise TypeError(
                f"{self.name}: model {type(client.model).__name__} has no feature_forward(x); "
                "FedAS aligns the body features entering the head"
            )
        return None

    # client ----------------------------------------------------------------------------------
    def receive(self, client: Client, message: Message) -> None:
        """Keep the global body until this client is next selected (official timing)."""
        client.state[PENDING] = {"entries": message.entries, "masks": message.masks}

    def local_update(self, client: Client) -> None:
        pending = client.state.pop(PENDING, None)
        if pending is not None:
            self.align_and_load(client, Message(**pending))
        client.fit()
        client.state[TRACE] = fisher_trace(client.model, client, "fedas-fisher")

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        if up is not None:
            up.extras[TRACE] = float(client.state[TRACE])
        return up

    def align_and_load(self, client: Client, message: Message) -> None:
        """Align the received body to this client's prototypes, then load it (head kept)."""
        model = client.model
        shared = self.client_partition(client)
        if self.align_epochs == 0:
            with torch.no_grad():
                merge_into(model.state_dict(), message, shared)
            return
        protos, channels = self.prototypes(client, model)
        aligned = client.new_model()
        with torch.no_grad():
            merge_into(aligned.state_dict(), message, shared)
        body = [p for n, p in aligned.named_parameters() if shared.get(n) is True]
        opt = torch.optim.SGD(body, lr=self.align_lr)
        aligned.train()  # BN on batch statistics, as for the prototypes
        where = f"client {client.id} round {client.round} (fedas-align)"
        for x, y in client.batches("fedas-align", epochs=self.align_epochs):
            opt.zero_grad()
            loss = alignment_loss(aligned.feature_forward(x), pixel_classes(channels, y), protos)
            if loss is not None:
                step(opt, loss, where)
        with torch.no_grad():
            state = model.state_dict()
            new = aligned.state_dict()
            for k, m in shared.items():
                if m is True:
                    state[k].copy_(new[k])

    def prototypes(self, client: Client, model: nn.Module) -> tuple[dict[int, torch.Tensor], int]:
        """Mean body feature (``feature_forward``, the head's input) of each pixel class over
        the client's training data, and the number of logit channels of the model."""
        probe = client.new_model(model.state_dict())  # train-mode BN must not move model's stats
        head = probe.get_submodule(declared_path(probe, "head_path", self.name))
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        channels = 0
        probe.train()
        with torch.no_grad():
            for x, y in client.batches("fedas-prototypes", epochs=1):
                f = probe.feature_forward(x)
                channels = head(f).shape[1]
                classes = pixel_classes(channels, y)
                f = f.movedim(1, -1)  # N×H×W×C
                for c in classes.unique().tolist():
                    pick = f[classes == c]
                    sums[c] = sums.get(c, 0) + pick.sum(0)
                    counts[c] = counts.get(c, 0) + len(pick)
        return {c: sums[c] / counts[c] for c in sums}, channels

    # server ----------------------------------------------------------------------------------
    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        if self.weights == "samples":
            return masked_average(uploads)
        traces = {cid: float(u.extras[TRACE]) for cid, u in uploads.items()}
        if not sum(traces.values()) > 0:
            raise ValueError(
                f"fedas round {round}: every uploaded Fisher trace is zero ({traces}); the "
                "aggregation weights tr_i / Σ tr_j are undefined"
            )
        return masked_average(
            {
                cid: Upload(entries=u.entries, weight=traces[cid], masks=u.masks)
                for cid, u in uploads.items()
            }
        )


def alignment_loss(
    features: torch.Tensor, classes: torch.Tensor, protos: Mapping[int, torch.Tensor]
) -> torch.Tensor | None:
    """Σ_c MSE(features of the pixels of class c, prototype c) over the classes present that
    have a prototype; None when there is none (nothing to align in this batch)."""
    f = features.movedim(1, -1)
    loss = None
    for c in classes.unique().tolist():
        if c not in protos:
            continue
        pick = f[classes == c]
        term = F.mse_loss(pick, protos[c].expand_as(pick))
        loss = term if loss is None else loss + term
    return loss
