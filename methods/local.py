"""Local: every site trains alone; the lower bound a federation has to beat."""

from __future__ import annotations

from torch import nn

from pflbench.messages import Upload
from pflbench.method import Method
from pflbench.partition import Partition


class Local(Method):
    """Each client trains its own model on its own data; nothing is ever sent.

    Reference point of every pFL comparison (no paper of its own). Uses the same total budget as
    the federated methods (the suite's local epochs or steps in every round), the same model
    initialisation and the same evaluation. Optimizer state is reset every round, exactly as for
    FedAvg, so that the only difference from FedAvg is the absence of aggregation.
    """

    name = "local"
    newcomer = (
        "the initial model with BN statistics taken on the new site's unlabelled train images "
        "(nothing is ever communicated); few-shot trains it from scratch for K steps"
    )
    paper = "no paper: the non-federated reference point"
    official_code = "none (reference point)"
    shares = "nothing; no bytes"
    personal = "the whole model"
    evaluates = "θᵢ"
    communicates = False

    def partition(self, model: nn.Module) -> Partition:
        return {k: False for k in model.state_dict()}

    def upload(self, client) -> Upload | None:
        return None
