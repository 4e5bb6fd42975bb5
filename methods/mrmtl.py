"""MR-MTL: personal models pulled towards the mean of the personal models; no global model."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pflbench.aggregation import merge_into
from pflbench.client import Client
from pflbench.messages import Message
from pflbench.method import Method
from pflbench.methods._common import param_snapshot, proximal_term
from pflbench.params import Param
from pflbench.partition import Partition, floating_entries

MEAN = "mrmtl/mean"


class MRMTL(Method):
    """Mean-regularized MTL: personal models vᵢ pulled towards the mean v̄ of the personal models.

    Each client trains vᵢ on fᵢ(v) + λ/2‖v − v̄‖², v̄ = the mean of the personal models after
    the previous round.

    Paper: Liu, Hu, Wu, Smith, "On Privacy and Personalization in Cross-Silo Federated
    Learning", NeurIPS 2022 (arXiv 2206.07902). Checked against the official code
    (kenziyuliu/private-cross-silo-fl, ``trainers/mrmtl.py``).

    The client's model *is* vᵢ: the server's message never overwrites it. Round, per sampled
    client: vᵢ trains for the suite's local budget with the proximal term anchored at the v̄ it
    last received (parameters only, never BN buffers, as in the official flat-parameter term);
    vᵢ's parameters are uploaded; the server sets v̄ ← the weighted mean of the uploaded vᵢ
    (``protocol.aggregation_weights``; the official ``update_weights`` are uniform or by
    training samples) and broadcasts it; ``receive`` only stores v̄ as the next anchor. Before
    any v̄ exists (round 1) the anchor is the client's model, i.e. the common initialisation,
    which is the mean of the identical initial personal models (the official code starts
    ``global_params`` at the shared init). With λ = 0 the method is Local (same training, same
    seeds) except that it communicates. Each client keeps its own BN running statistics.

    λ: no single paper value (tuned per dataset and privacy level; the repository's README sweeps
    0.1 to 3, its runner scripts default to 0.001); default 0.1, search [1e-3, 10] (log).
    Evaluated model: vᵢ; v̄ is the model for unseen sites. Optimizer state reset every round
    (the official code re-initialises the optimizer every round). No extra passes.
    """

    name = "mrmtl"
    newcomer = (
        "the mean v̄ of the personal models' parameters (the broadcast anchor); BN statistics "
        "recomputed on the new site's unlabelled train images"
    )
    paper = "Liu et al., NeurIPS 2022, arXiv:2206.07902"
    official_code = "kenziyuliu/private-cross-silo-fl (trainers/mrmtl.py)"
    shares = "vᵢ's parameters up; their mean v̄ down (an anchor only, never merged)"
    personal = "the whole model vᵢ (BN running statistics included)"
    evaluates = "vᵢ"
    extra_passes = "none"
    deviations: ClassVar[tuple[str, ...]] = (
        "v̄ is the mean of the models uploaded this round; the official code adds the mean of "
        "the sampled clients' updates to v̄, which is the same when every client takes part "
        "(its cross-silo setting)",
    )
    params = {
        "lam": Param(
            0.1, low=1e-3, high=10.0, log=True, valid=(0, None), help="λ: pull of vᵢ towards v̄"
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        """Parameters are uploaded (to form v̄); buffers never leave the client."""
        params = {n for n, _ in model.named_parameters()}
        return {k: bool(v and k in params) for k, v in floating_entries(model).items()}

    def receive(self, client: Client, message: Message) -> None:
        client.state[MEAN] = {k: v.detach().clone() for k, v in message.entries.items()}

    def local_update(self, client: Client) -> None:
        anchor = client.state.get(MEAN) or param_snapshot(client.model)
        client.fit(extra_loss=proximal_term(anchor, self.lam))

    def _merge_newcomer(self, state: dict, msg: Message, model: nn.Module) -> None:
        """A newcomer has no vᵢ: it takes the anchor v̄ itself (every parameter it carries)."""
        merge_into(state, msg, {k: True for k in msg.entries})
