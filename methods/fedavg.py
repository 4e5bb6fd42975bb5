"""FedAvg: the reference point every other method is measured against."""

from __future__ import annotations

from pflbench.method import Method


class FedAvg(Method):
    """Federated averaging of every floating-point entry, BatchNorm running statistics included.

    Paper: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of
    Deep Networks from Decentralized Data", AISTATS 2017 (arXiv 1602.05629).

    Each sampled client starts from the global model w, runs the suite's local budget and uploads
    all floating-point state; the server sets w ← Σ nᵢθᵢ / Σ nᵢ and broadcasts it. The evaluated
    model is w. Choices: BN running statistics are averaged like weights (averaging only
    ``parameters()`` would silently make this SiloBN); ``num_batches_tracked`` is an integer and
    stays local; optimizer state is reset every round.
    """

    name = "fedavg"
    newcomer = "the final global model, bit for bit"
    paper = "McMahan et al., AISTATS 2017, arXiv:1602.05629"
    official_code = "no official code released; PFLlib serveravg"
