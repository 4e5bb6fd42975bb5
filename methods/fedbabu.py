"""FedBABU: the head stays at its random initialisation; only the body is trained and averaged."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import declared_path, frozen, head_partition
from pflbench.params import Param
from pflbench.partition import Partition


class FedBABU(Method):
    """Body trained and averaged, head frozen at its random init; fine-tuned only at evaluation.

    The head (and, by default, the body) is fine-tuned on a copy of the model.

    Paper: Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image
    Classification", ICLR 2022 (arXiv 2106.06042). Checked against the official code
    (jhoon-oh/FedBABU: ``--local_upt_part body --aggr_part body``, ``--ft_ep 5``) and PFLlib's
    ``clientbabu``/``serverbabu`` (head ``requires_grad = False``, only ``model.base`` sent,
    ``fine_tune(['base', 'head'])`` before the personalized evaluation).

    Head in segmentation: the module at ``model.head_path`` (the U-Nets' 1×1 output conv, the
    per-pixel classifier, the analogue of the paper's last linear layer). An empty or undeclared
    head is refused. Every client starts from the same seeded initialisation, so the frozen head
    is the same on every client without being sent: it is kept local (the official code and
    PFLlib send the body only), and the body (BN statistics included) is FedAvg-averaged.

    Round, per client: the suite's local budget on the body, head frozen (its parameters are not
    even given to the optimizer, so weight decay cannot move them either). Evaluation:
    ``eval_model`` copies the client's model and fine-tunes the copy for ``finetune_epochs``
    epochs (default 5, the official ``--ft_ep``; PFLlib uses 10) with the suite's optimizer and a
    fresh state; ``finetune="all"`` (default, paper and PFLlib) trains body and head,
    ``finetune="head"`` the head only. The client's model is left intact, so the fine-tuned
    head never feeds back into federated training. The engine evaluates every ``eval_every``
    rounds (the paper fine-tunes once, after the last round), so the fine-tuning cost recurs at
    each evaluation: budget label ``finetune``. Evaluated model: the fine-tuned copy; the body
    with the initial head is the global model for unseen sites. Optimizer state reset every
    round.
    """

    name = "fedbabu"
    newcomer = (
        "the global body + the shared initial head (FedBABU's frozen head); few-shot is its fine-"
        "tuning"
    )
    paper = "Oh et al., ICLR 2022, arXiv:2106.06042"
    official_code = "jhoon-oh/FedBABU (main_fed.py, --aggr_part body); PFLlib clientbabu"
    shares = "the body (all but the head); the frozen head is never sent"
    personal = "the head (1×1 conv), frozen at the shared random init during training"
    evaluates = "a copy of body + head fine-tuned for τ_f epochs"
    extra_passes = "`finetune`: τ_f epochs at every evaluation"
    deviations: ClassVar[tuple[str, ...]] = (
        "fine-tuning runs at every evaluation round, not once after the last round, so model "
        "selection sees fine-tuned models (its cost is counted under `finetune`)",
        "fine-tuning uses the suite's optimizer and learning rate with a fresh state (the "
        "official scripts: SGD with momentum at the federated learning rate)",
    )
    params = {
        "finetune_epochs": Param(
            5, low=1, high=10, valid=(0, None), help="τ_f: fine-tuning epochs at evaluation"
        ),
        "finetune": Param(
            "all",
            choices=("all", "head"),
            search=False,
            help="what fine-tuning trains: the whole model (paper) or the head only",
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        return head_partition(model, self.name)

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None

    def _head_body(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        head = model.get_submodule(declared_path(model, "head_path", self.name))
        ids = {id(p) for p in head.parameters()}
        return list(head.parameters()), [p for p in model.parameters() if id(p) not in ids]

    def local_update(self, client: Client) -> None:
        head, body = self._head_body(client.model)
        with frozen(head):
            client.fit(params=body)

    def eval_model(self, client: Client) -> nn.Module:
        copy = client.new_model(client.model.state_dict())
        if self.finetune_epochs <= 0:
            return copy
        kw = {"epochs": self.finetune_epochs, "label": "finetune", "key": "finetune"}
        if self.finetune == "all":
            client.fit(copy, **kw)
        else:
            head, body = self._head_body(copy)
            with frozen(body):
                client.fit(copy, params=head, **kw)
        return copy
