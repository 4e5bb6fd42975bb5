"""FedAvg-FT: FedAvg, evaluated after a few local fine-tuning steps on a copy of the global model."""

from __future__ import annotations

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.params import Param


class FedAvgFT(Method):
    """FedAvg training; at evaluation each client fine-tunes a copy of w for K local steps.

    Reference: the local fine-tuning baseline of personalized FL (cf. arXiv 2108.07313, as
    cited in the project's method reference); the global model is FedAvg (McMahan et al.,
    AISTATS 2017, arXiv 1602.05629).

    Training is exactly FedAvg's. ``eval_model`` copies the client's global model, trains the copy
    for ``finetune_steps`` (K, default 10) mini-batch steps of the suite's optimizer on the
    client's training data (fresh optimizer state) and returns it; the global model in the client
    is left intact, so fine-tuning never feeds back into federated training. The engine calls
    ``eval_model`` at every evaluation round (and once more for the final per-case metrics of the
    last round, which reproduces the same fine-tuned copy because the seed streams are per call),
    so the fine-tuning cost recurs at each evaluation and appears in the budget under
    ``finetune``. Evaluated model: the fine-tuned copy; w is the global model for unseen sites.
    Optimizer state reset every round.
    """

    name = "fedavg-ft"
    newcomer = "the final global model; few-shot is its fine-tuning, with the suite's K steps"
    paper = "fine-tuning baseline (cf. arXiv:2108.07313) over FedAvg, arXiv:1602.05629"
    official_code = "no official code (a baseline); FedAvg as `fedavg`"
    personal = "nothing (the fine-tuned copy is rebuilt at each evaluation)"
    evaluates = "a copy of w fine-tuned for K steps"
    extra_passes = "`finetune`: K steps at every evaluation"
    params = {
        "finetune_steps": Param(
            10, low=1, high=100, log=True, valid=(0, None), help="K: fine-tuning steps"
        ),
    }

    def eval_model(self, client: Client) -> nn.Module:
        copy = client.new_model(client.model.state_dict())
        if self.finetune_steps > 0:
            client.fit(copy, steps=self.finetune_steps, label="finetune", key="finetune")
        return copy
