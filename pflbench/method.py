"""The Method contract: a method owns its algorithm, the engine owns everything else.

Every hook has a default that gives FedAvg, so a method overrides only what makes it different.
The engine calls client hooks on a fresh instance per client call (so nothing a method stores on
``self`` during one client's hook can reach another client's hook) and server hooks on the
server's instance. Per-client state that must persist across rounds goes in ``client.state``;
the engine stores it with the client's model (in memory or on disk).

Hooks (side, default):
    adapt_model(model)        engine  the suite's model itself (the architecture is unchanged)
    partition(model)          both    every floating-point entry shared
    start_server(model, ids)  server  nothing (the server's copy of the initial model)
    setup(client)             client  nothing sent
    setup_server(payloads)    server  nothing sent back
    receive_setup(client, m)  client  keep m in client.state["setup"]
    receive(client, message)  client  copy the shared entries into the client model
    local_update(client)      client  the suite's local budget of supervised training
    upload(client)            client  the shared entries and the sample count
    aggregate(uploads, round) server  weighted average of each shared element over its sharers,
                                      broadcast to every client (or one message per client)
    eval_model(client)        client  the client's model
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pflbench.aggregation import masked_average, merge_into
from pflbench.client import Client
from pflbench.messages import Message, Upload
from pflbench.params import Param, resolve_params
from pflbench.partition import Partition, floating_entries


class Method:
    """Base class of federated methods; FedAvg when nothing is overridden."""

    name: ClassVar[str] = ""
    #: Citation of the method's paper (authors, venue, year, arXiv id).
    paper: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    #: Whether optimizer state (e.g. Adam moments) survives from one round to the next; None
    #: follows the suite's ``protocol.optimizer_state``, a value forces it for this method.
    optimizer_state: ClassVar[Literal["reset", "persist"] | None] = None
    #: False for methods that never send anything (Local).
    communicates: ClassVar[bool] = True

    # fidelity: what the implementation was checked against and where it departs from it. The
    # README's fidelity table is generated from these (``python -m pflbench.docs``), so that the
    # claims a reader sees are the ones the class makes.
    #: The official code (and other implementations) the method was read against.
    official_code: ClassVar[str] = ""
    #: What the clients send and the server averages.
    shares: ClassVar[str] = "every floating-point entry (weights, biases, BN running statistics)"
    #: What stays on the client.
    personal: ClassVar[str] = "nothing"
    #: The model each client is evaluated with.
    evaluates: ClassVar[str] = "the global model w"
    #: Passes over local data beyond the suite's budget (their budget labels).
    extra_passes: ClassVar[str] = "none"
    #: Every deliberate departure from the paper or its official code, one sentence each.
    deviations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hparams: Any) -> None:
        self.hparams: dict[str, Any] = resolve_params(
            self.params, hparams, f"method {self.name or type(self).__name__}"
        )

    def __getattr__(self, item: str) -> Any:
        hp = self.__dict__.get("hparams")
        if hp is not None and item in hp:
            return hp[item]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def active_deviations(self) -> list[str]:
        """Deviations of this configuration: the declared ones plus those its hyperparameters
        switch on (recorded in the run's manifest)."""
        return list(self.deviations)

    def fresh(self) -> Method:
        """A new instance with the same hyperparameters (one per client hook call)."""
        return type(self)(**self.hparams)

    # architecture ------------------------------------------------------------------------
    def adapt_model(self, model: nn.Module) -> nn.Module:
        """The model this method trains, made from the suite's freshly seeded one.

        A suite has one model for every method; a method whose definition *is* an architecture
        change (PN replaces the norm layers by Population Normalization) makes it here, so the
        change belongs to that method alone and is never a suite option another method could
        pick up by accident. The engine calls it once per run, right after building the seeded
        model and before anything else sees it; every client, the server and every evaluation
        then use what it returns. The default returns ``model`` itself: every other method's run
        is bitwise what it was without this hook. An override must draw no random numbers (the
        weights it keeps stay exactly those the other methods start from, so runs stay paired)
        and must refuse (PartitionError) a model it cannot adapt rather than run something else.
        """
        return model

    # partition ---------------------------------------------------------------------------
    def partition(self, model: nn.Module) -> Partition:
        """Which entries are shared (True), personal (False) or shared element-wise (mask)."""
        return floating_entries(model)

    def client_partition(self, client: Client) -> Partition:
        """The partition in force for this client now (element-wise methods keep it in state)."""
        return self.partition(client.model)

    # setup ---------------------------------------------------------------------------------
    def start_server(self, model: nn.Module, client_ids: Sequence[str]) -> None:
        """The server's start: the initial global model it broadcasts and its clients' ids.

        Free of bytes as in every method: all clients start from the same seeded model, which
        the engine does not count as a broadcast. Methods with server state that depends on the
        previous global model (FedNova, FedDyn) or on the federation's size (SCAFFOLD) keep it
        here; FedAvg needs nothing.
        """

    def setup(self, client: Client) -> Any:
        return None

    def setup_server(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def receive_setup(self, client: Client, message: Any) -> None:
        client.state["setup"] = message

    # rounds --------------------------------------------------------------------------------
    def receive(self, client: Client, message: Message) -> None:
        with torch.no_grad():
            state = client.model.state_dict()
            merge_into(state, message, self.client_partition(client))

    def local_update(self, client: Client) -> None:
        client.fit()

    def upload(self, client: Client) -> Upload | None:
        shared = self.client_partition(client)
        state = client.model.state_dict()
        entries, masks = {}, {}
        for k, m in shared.items():
            if isinstance(m, torch.Tensor):
                if bool(m.any()):
                    entries[k] = state[k].detach().clone()
                    masks[k] = m.clone()
            elif m:
                entries[k] = state[k].detach().clone()
        return Upload(entries=entries, masks=masks, weight=client.weight)

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message | dict[str, Message]:
        """One message broadcast to every client, or a message per client id.

        The default is the weighted average of each shared element over the clients sharing it.
        """
        return masked_average(uploads)

    # evaluation ------------------------------------------------------------------------------
    def eval_model(self, client: Client) -> nn.Module:
        return client.model
