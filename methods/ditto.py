"""Ditto: FedAvg for the global model plus a personal model pulled towards it."""

from __future__ import annotations

from typing import ClassVar

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

    Checked against the official code (litian96/ditto), PFLlib's
    ``clientditto`` and FL-MedSegBench's Ditto.

    Round, per sampled client: the round-start global model w is snapshotted (parameters only);
    (a) the global copy trains for the suite's budget from w and is uploaded (FedAvg);
    (b) vᵢ trains with the proximal term on every batch, anchored at the snapshot of w, never at
    the locally updated copy, for the **same** local budget as (a) (the suite's epochs or steps;
    budget label ``personal``, so the manifest's budget shows ``personal`` = ``local``). The
    official code interleaves the two updates per batch for the same number of iterations;
    FL-MedSegBench runs E epochs of each, as here. ``personal_epochs: N`` gives vᵢ a different
    budget of N epochs: a deviation from both, recorded in the run's manifest as such. The proximal term covers parameters only, never buffers; vᵢ keeps
    its own BN statistics. vᵢ starts as the first round-start global model it sees and lives in
    ``client.state``. λ default 0.1 (paper; FL-MedSegBench uses 0.001), search range [1e-3, 10].

    Evaluated model: vᵢ; a client that has never been sampled has no vᵢ yet and is evaluated
    with the global model it holds. The global model w remains for unseen sites. Optimizer state
    reset every round (separate optimizers for w and vᵢ).
    """

    name = "ditto"
    newcomer = "the global model w (no personal model vᵢ for a site that never trained one)"
    paper = "Li et al., ICML 2021, arXiv:2012.04221"
    official_code = "litian96/ditto; PFLlib clientditto; FL-MedSegBench"
    shares = "the global model w (FedAvg, BN statistics included)"
    personal = "the personal model vᵢ (never sent)"
    evaluates = "vᵢ"
    extra_passes = "`personal`: vᵢ's training, the same budget as w's"
    deviations: ClassVar[tuple[str, ...]] = (
        "vᵢ is trained after w, not interleaved per batch as in the official code (same total "
        "budget; FL-MedSegBench's order)",
        "vᵢ's solver is the suite's optimizer (the paper runs SGD steps)",
    )
    params = {
        "lam": Param(
            0.1, low=1e-3, high=10.0, log=True, valid=(0, None), help="λ: pull of vᵢ towards w"
        ),
        "personal_epochs": Param(
            None,
            valid=(1, None),
            value_type=int,
            help="E_p: epochs of vᵢ per round; default (null): the suite's local budget",
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

    def active_deviations(self) -> list[str]:
        out = list(self.deviations)
        if self.personal_epochs is not None:
            out.append(
                f"personal_epochs = {self.personal_epochs}: vᵢ's budget is set apart from the "
                "suite's local budget (paper and official code: the same budget as w)"
            )
        return out

    def eval_model(self, client: Client) -> nn.Module:
        state = client.state.get(PERSONAL)
        return client.model if state is None else client.new_model(state)
