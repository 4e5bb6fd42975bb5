"""The view a method gets of one client: its own model, state and training data, nothing else.

The privacy boundary is structural: a :class:`Client` holds no reference to the federation, the
engine or any other client, and it exposes only the train split of its own site. A client hook
therefore has no path to another client's images or labels.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pflbench.aggregation import WeightKind, client_weight
from pflbench.data import SiteData
from pflbench.state import clone_tree
from pflbench.training import (
    attach_scaler,
    batch_stream,
    make_optimizer,
    scaler_of,
    segmentation_loss,
    train_epochs,
)


@dataclass(frozen=True)
class LocalWork:
    """The suite's local budget and training settings, identical for every method."""

    epochs: int | None
    steps: int | None
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    augment: bool | tuple[str, ...]
    shuffle: bool
    loss_smoothing: float = 1.0
    aggregation_weights: WeightKind = "samples"
    #: the protocol's mixed precision; "fp16" gives every optimizer a gradient scaler
    amp: str = "off"

    @property
    def augmentations(self) -> tuple[str, ...]:
        if isinstance(self.augment, bool):
            return ("flips",) if self.augment else ()
        return tuple(self.augment)


@dataclass
class Budget:
    """Samples processed per purpose ("local" is the suite's budget; the rest are extra passes)."""

    samples: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, n: int) -> None:
        self.samples[label] = self.samples.get(label, 0) + int(n)


def _seed(*parts: Any) -> int:
    seq = np.random.SeedSequence([zlib.crc32(str(p).encode()) for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0] % (2**63))


class Client:
    """One client as a method sees it during a hook call."""

    __slots__ = (
        "id",
        "model",
        "state",
        "round",
        "_train",
        "_work",
        "_device",
        "_seed",
        "_calls",
        "_budget",
        "_template",
        "_persist_optimizer",
        "_lr_factor",
    )

    def __init__(
        self,
        cid: str,
        model: nn.Module,
        state: dict[str, Any],
        train: SiteData,
        work: LocalWork,
        *,
        round: int,
        seed: int,
        device: torch.device,
        budget: Budget,
        persist_optimizer: bool = False,
        lr_factor: float = 1.0,
    ) -> None:
        self.id = cid
        self.model = model
        self.state = state
        self.round = round
        self._train = train
        self._work = work
        self._device = device
        self._seed = seed
        self._calls = 0
        self._budget = budget
        self._template = model
        self._persist_optimizer = persist_optimizer
        self._lr_factor = lr_factor

    # data -------------------------------------------------------------------------------
    @property
    def train_data(self) -> SiteData:
        """This client's own training split (the only data a client hook can reach)."""
        return self._train

    @property
    def num_train(self) -> int:
        return len(self._train)

    @property
    def weight(self) -> float:
        """This client's aggregation weight (``protocol.aggregation_weights``), for uploads."""
        return client_weight(self.num_train, self._work.batch_size, self._work.aggregation_weights)

    @property
    def lr(self) -> float:
        """The learning rate of this round (the suite's rate times its schedule's factor)."""
        return self._work.lr * self._lr_factor

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def work(self) -> LocalWork:
        return self._work

    def generator(self, stream: str) -> torch.Generator:
        """A torch generator for this client, round and call, from a named seed stream."""
        self._calls += 1
        g = torch.Generator()
        g.manual_seed(_seed(self._seed, stream, self.id, self.round, self._calls))
        return g

    def batches(
        self,
        label: str = "local",
        *,
        epochs: int | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        data: SiteData | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of the client's training data, counted in the budget under ``label``.

        Without ``epochs``/``steps`` this is the suite's local budget.
        """
        if epochs is None and steps is None:
            epochs, steps = self._work.epochs, self._work.steps
        augmentations = self._work.augmentations
        stream = batch_stream(
            data if data is not None else self._train,
            batch_size or self._work.batch_size,
            epochs=epochs,
            steps=steps,
            order=self.generator("data-order"),
            augment=self.generator("augment") if augmentations else None,
            shuffle=self._work.shuffle,
            device=self._device,
            augmentations=augmentations,
        )
        for x, y in stream:
            self._budget.add(label, len(x))
            yield x, y

    def count(self, label: str, n: int) -> None:
        """Record ``n`` samples of extra work under ``label`` that did not come from
        :meth:`batches` (e.g. Fisher passes over transformed copies of images already drawn), so
        that it shows in the run's budget like every other pass.
        """
        if n < 0:
            raise ValueError(f"cannot count a negative number of samples ({n})")
        self._budget.add(label, n)

    # training ---------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The suite's loss (with its ``loss_smoothing``)."""
        return segmentation_loss(logits, labels, self._work.loss_smoothing)

    def optimizer(self, params, key: str = "main") -> torch.optim.Optimizer:
        """The suite's optimizer over ``params`` at this round's rate; restores its state (moments,
        step counts) when the optimizer state persists, but never the saved rate."""
        w = self._work
        opt = make_optimizer(params, w.optimizer, self.lr, w.weight_decay, w.momentum)
        saved = self.state.get(f"_optimizer/{key}") if self._persist_optimizer else None
        if saved is not None:
            opt.load_state_dict(saved)
            for group in opt.param_groups:
                group["lr"] = self.lr
        if w.amp == "fp16":
            scaler = torch.amp.GradScaler(self._device.type)
            kept = self.state.get(f"_grad_scaler/{key}")
            if kept is not None:  # the scale found in earlier rounds, not 2¹⁶ again
                scaler.load_state_dict(kept)
            attach_scaler(opt, scaler)
        return opt

    def keep_optimizer(self, opt: torch.optim.Optimizer, key: str = "main") -> None:
        """Keep the optimizer's state for the next round (when it persists) and, under fp16, its
        gradient scaler's scale (always: the scale is numerics, not optimizer state)."""
        if self._persist_optimizer:
            self.state[f"_optimizer/{key}"] = clone_tree(opt.state_dict())
        scaler = scaler_of(opt)
        if scaler is not None:
            self.state[f"_grad_scaler/{key}"] = scaler.state_dict()

    def fit(
        self,
        model: nn.Module | None = None,
        *,
        params=None,
        epochs: int | None = None,
        steps: int | None = None,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
        label: str = "local",
        key: str = "main",
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> float:
        """Train ``model`` (default: the client's model) with the suite's loss and optimizer.

        ``params`` restricts the trainable parameters (the rest keep their values);
        ``extra_loss(model)`` is added to every batch's loss (proximal terms); passes other than
        the suite's budget should use their own ``label`` so they are reported as extra work.
        ``batches`` replaces the suite's batch stream by a method's own transform of it (style
        transfer, input normalization): it should draw from ``self.batches(label)`` so that the
        budget is counted.
        """
        model = model if model is not None else self.model
        opt = self.optimizer(params if params is not None else model.parameters(), key)
        if batches is None:
            batches = self.batches(label, epochs=epochs, steps=steps)
        mean_loss, _ = train_epochs(
            model,
            batches,
            opt,
            extra_loss=extra_loss,
            where=f"client {self.id} round {self.round} ({label})",
            loss_fn=self.loss,
        )
        self.keep_optimizer(opt, key)
        return mean_loss

    def new_model(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh copy of the client's architecture, loaded with ``state`` (default: its model's)."""
        m = copy.deepcopy(self._template)
        if state is not None:
            m.load_state_dict(state)
        return m


class UnlabelledClient(Client):
    """A site seen without its labels (the zero-shot newcomer): ``train_data`` carries the real
    images and all-zero labels, and any supervised pass is refused, so a hook that asked for
    labels gets nothing of the site's annotations."""

    __slots__ = ()

    def __init__(self, cid: str, model: nn.Module, train: SiteData, *args: Any, **kw: Any) -> None:
        blank = SiteData(
            name=train.name,
            images=train.images,
            labels=torch.zeros_like(train.labels),
            case_ids=list(train.case_ids),
            slice_index=list(train.slice_index),
            spacing=train.spacing,
        )
        super().__init__(cid, model, {}, blank, *args, **kw)

    def batches(self, *args: Any, **kw: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise PermissionError(
            f"site {self.id!r} is a zero-shot newcomer: it has no labels to train on "
            "(use its unlabelled images, client.train_data.images, or the few_shot regime)"
        )
