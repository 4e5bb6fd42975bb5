"""FedRep: many head epochs on a frozen body, then the body on a frozen head; body averaged."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import declared_path, frozen, head_partition, step
from pflbench.params import Param
from pflbench.partition import Partition


class FedRep(Method):
    """Shared representation (body) + personal head, trained in alternation each round.

    Paper: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations for
    Personalized Federated Learning", ICML 2021 (arXiv 2102.07078).

    Round, per client: (1) body frozen, the head trains for τ_h = ``head_epochs`` epochs
    (default 10, the paper's); (2) head frozen, the body trains for the suite's local budget
    (the paper's single body epoch). Only the body is uploaded and averaged.

    Head definition: the module at ``model.head_path`` (the U-Nets' 1×1 conv). An empty head is
    refused with a PartitionError in ``setup``.

    Speed choice (exact up to mini-batch composition): the body is frozen during (1), so it
    cannot change; instead of a full forward per head step, the body features of the training set
    are computed once per round (``model.feature_forward``, train mode and no gradient, batched as
    one epoch of the data: BN uses batch statistics and updates its running statistics once, as
    one epoch of the paper's loop would), and the τ_h head epochs run over these cached batches in
    a new seeded order each epoch. Mini-batches keep their composition across head epochs
    (the paper reshuffles). When the cache would exceed ``feature_cache_mb`` or the model has no
    ``feature_forward``, every head step runs the full forward pass instead (the paper's loop).

    Extra local passes (budget label ``head``): the images passed through the body for phase (1),
    one epoch with the cache, τ_h epochs without it. Evaluated model: the shared body + the
    client's head; no global model for an unseen site. Optimizer state reset every round (one
    optimizer per phase).
    """

    name = "fedrep"
    newcomer = (
        "the global body + the initial head (the head never leaves the clients; option: the "
        "clients' heads averaged)"
    )
    paper = "Collins et al., ICML 2021, arXiv:2102.07078"
    official_code = "lgcollins/FedRep; PFLlib clientrep"
    shares = "the body (all but the head)"
    personal = "the head (1×1 conv)"
    evaluates = "shared body + own head"
    extra_passes = (
        "`head`: the head epochs' pass over the body (once per round with the feature cache)"
    )
    deviations: ClassVar[tuple[str, ...]] = (
        "head epochs run on body features cached once per round, so mini-batches keep their composition across head epochs (the paper reshuffles; exact otherwise)",
    )
    params = {
        "head_epochs": Param(
            10, low=1, high=20, valid=(1, None), help="τ_h: head epochs per round, body frozen"
        ),
        "feature_cache_mb": Param(
            2048,
            valid=(0, None),
            help="largest cache of body features per round before recomputing them",
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        return head_partition(model, self.name)

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None

    def _split(self, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]:
        head = model.get_submodule(declared_path(model, "head_path", self.name))
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        return head, list(head.parameters()), body

    def local_update(self, client: Client) -> None:
        self.train_head(client)
        self.train_body(client)

    def train_body(self, client: Client) -> None:
        """Phase (2): the suite's budget on the body, head frozen."""
        _, head_params, body_params = self._split(client.model)
        with frozen(head_params):
            client.fit(params=body_params, key="main")

    def train_head(self, client: Client) -> None:
        """Phase (1): τ_h epochs on the head, body frozen."""
        model = client.model
        head, head_params, body_params = self._split(model)
        with frozen(body_params):
            if not self._cache_fits(client, model):
                client.fit(params=head_params, epochs=self.head_epochs, label="head", key="head")
                return
            model.train()
            cache: list[tuple[torch.Tensor, torch.Tensor]] = []
            with torch.no_grad():
                for x, y in client.batches("head", epochs=1):
                    cache.append((model.feature_forward(x), y))
            opt = client.optimizer(head_params, key="head")
            where = f"client {client.id} round {client.round} (head)"
            for _ in range(self.head_epochs):
                order = torch.randperm(len(cache), generator=client.generator("head-order"))
                for i in order.tolist():
                    f, y = cache[i]
                    opt.zero_grad(set_to_none=True)
                    step(opt, client.loss(head(f), y), where)
            client.keep_optimizer(opt, key="head")

    def _cache_fits(self, client: Client, model: nn.Module) -> bool:
        if not callable(getattr(model, "feature_forward", None)):
            return False
        channels = int(getattr(model, "feature_channels", 0) or 0)
        if channels <= 0:
            return False
        imgs = client.train_data.images
        pixels = int(imgs.shape[0]) * int(imgs[0, 0].numel())
        return pixels * channels * 4 <= self.feature_cache_mb * 2**20
