"""Ditto: FedAvg for the global model plus a personal model pulled towards it."""

from __future__ import annotations

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import cloned_state, param_snapshot, proximal_term
from pflbench.params import Param

PERSONAL = "ditto/personal"


class Ditto(Method):
    """Global model trained as in FedAvg; each client also trains a personal model vᵢ on
    fᵢ(v) + λ/2‖v − w‖², w = the global model at the start of the round.

    Paper: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021 (arXiv 2012.04221).

    Round, per sampled client: the round-start global model w is snapshotted (parameters only);
    (a) the global copy trains for the suite's budget from w and is uploaded (FedAvg);
    (b) vᵢ trains for ``personal_epochs`` epochs (default 1, budget label ``personal``: an extra
    local pass) with the proximal term on every batch, anchored at the snapshot of w, never at
    the locally updated copy. The proximal term covers parameters only, never buffers; vᵢ keeps
    its own BN statistics. vᵢ starts as the first round-start global model it sees and lives in
    ``client.state``. λ default 0.1 (paper; FL-MedSegBench uses 0.001), search range [1e-3, 10].

    Evaluated model: vᵢ; a client that has never been sampled has no vᵢ yet and is evaluated
    with the global model it holds. The global model w remains for unseen sites. Optimizer state
    reset every round (separate optimizers for w and vᵢ). Deviation: the paper's personal solver
    runs a fixed number of local steps of SGD; here it is the suite's optimizer.
    """

    name = "ditto"
    paper = "Li et al., ICML 2021, arXiv:2012.04221"
    params = {
        "lam": Param(
            0.1, low=1e-3, high=10.0, log=True, valid=(0, None), help="λ: pull of vᵢ towards w"
        ),
        "personal_epochs": Param(
            1, valid=(1, None), help="E_p: epochs of personal training per round"
        ),
    }

    def local_update(self, client: Client) -> None:
        anchor = param_snapshot(client.model)
        personal = client.new_model(client.state.get(PERSONAL))
        client.fit()
        client.fit(
            personal,
            epochs=self.personal_epochs,
            extra_loss=proximal_term(anchor, self.lam),
            label="personal",
            key="personal",
        )
        client.state[PERSONAL] = cloned_state(personal)

    def eval_model(self, client: Client) -> nn.Module:
        state = client.state.get(PERSONAL)
        return client.model if state is None else client.new_model(state)
