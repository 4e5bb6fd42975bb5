"""FedProx: FedAvg with a proximal pull towards the round's global model."""

from __future__ import annotations

from typing import ClassVar

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import param_snapshot, proximal_term
from pflbench.params import Param


class FedProx(Method):
    """FedAvg whose local objective adds μ/2‖θ − w‖², w = the global model received this round.

    Paper: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
    Networks", MLSys 2020 (arXiv 1812.06127).

    Choices: the proximal term runs over parameters only, never buffers (BN running statistics
    are averaged as in FedAvg but not pulled); it is added on every batch of the suite's local
    budget; with μ = 0 it is not added at all, so the computation is FedAvg bit for bit. The
    anchor w is the client model at the start of ``local_update``, i.e. the global model just
    received. Deviation: the paper's inexact local solver and its device stragglers (variable
    local work) are not modelled; every client runs the suite's budget. Evaluated model: the
    global model w (as FedAvg). No extra local passes; optimizer state reset every round.
    """

    name = "fedprox"
    newcomer = "the final global model (as FedAvg)"
    paper = "Li et al., MLSys 2020, arXiv:1812.06127"
    official_code = "litian96/FedProx; PFLlib clientprox"
    deviations: ClassVar[tuple[str, ...]] = (
        "the paper's inexact local solver and device stragglers (variable local work) are not modelled: every client runs the suite's budget",
    )
    params = {
        "mu": Param(
            0.01, low=1e-4, high=1.0, log=True, valid=(0, None), help="proximal coefficient μ"
        ),
    }

    def local_update(self, client: Client) -> None:
        if self.mu == 0:
            client.fit()
            return
        anchor = param_snapshot(client.model)
        client.fit(extra_loss=proximal_term(anchor, self.mu))
