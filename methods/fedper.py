"""FedPer: a shared body with a personal head per client."""

from __future__ import annotations

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import declared_path, keys_of_module, local_partition
from pflbench.params import Param
from pflbench.partition import Partition, PartitionError


def head_keys(model: nn.Module, method: str, variant: str = "head") -> list[str]:
    """Keys of the personal head: the module at ``model.head_path``; with ``variant="decoder"``
    also the decoder at ``model.decoder_path`` (``"decoder"`` when the model declares none)."""
    keys = keys_of_module(model, declared_path(model, "head_path", method))
    if variant == "decoder":
        path = getattr(model, "decoder_path", "decoder")
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise PartitionError(
                f"{method}: head='decoder' needs a decoder module, but model "
                f"{type(model).__name__} has no module at {path!r}"
            ) from exc
        keys = keys_of_module(model, path) + keys
    return keys


class FedPer(Method):
    """Body averaged, head personal; body and head trained jointly on the local budget.

    Paper: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
    Layers", arXiv 1912.00818 (2019).

    Head definition: the module the model declares at ``head_path`` (the final 1×1 convolution of
    the U-Nets), never found by name substrings. ``head: decoder`` is the decoder-as-head variant
    used for segmentation: the decoder (module path ``model.decoder_path``, default
    ``"decoder"``) is personal too. A head with no floating-point entries, or a model that
    declares no head, is refused with a PartitionError in ``setup``. Evaluated model: shared body +
    the client's own head; no global model exists for an unseen site (its head would be the
    initial one). No extra local passes; optimizer state reset every round.
    """

    name = "fedper"
    newcomer = (
        "the global body + the initial head (the head never leaves the clients; option: the "
        "clients' heads averaged)"
    )
    paper = "Arivazhagan et al., arXiv:1912.00818"
    official_code = "no official code released; PFLlib clientper"
    shares = "the body (all but the head)"
    personal = "the head (1×1 conv); `head: decoder`: decoder + head"
    evaluates = "shared body + own head"
    params = {
        "head": Param(
            "head", choices=("head", "decoder"), help="personal part: 1×1 head, or decoder + head"
        ),
    }

    def partition(self, model: nn.Module) -> Partition:
        return local_partition(
            model, head_keys(model, self.name, self.head), self.name, f"head ({self.head})"
        )

    def setup(self, client: Client) -> None:
        self.partition(client.model)
        return None
