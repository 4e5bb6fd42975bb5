"""One federated run: the round loop, sampling, seeding, evaluation, selection, accounting.

The engine owns everything except the algorithm, so every method is trained, evaluated and
selected the same way. A method only sees :class:`~pflbench.client.Client` views in its client
hooks and uploads in its server hooks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pflbench import metrics, qualitative
from pflbench.aggregation import masked_average
from pflbench.client import Budget, Client, LocalWork, UnlabelledClient, _seed
from pflbench.data import FederatedData, SiteData
from pflbench.federation import ClientSplits, Mode, build_clients, place_clients
from pflbench.messages import Message, Upload, payload_bytes
from pflbench.method import Method, ServerView
from pflbench.partition import partition_sizes
from pflbench.registry import get_method, get_model
from pflbench.state import MemoryStore, StateStore, StoredUploads, make_store
from pflbench.suite import Evaluation, MethodSpec, ModelSpec, Protocol
from pflbench.training import Diverged, divergence_guard

EvalCallback = Callable[[int, float], None]
RoundCallback = Callable[[int, int], None]


@dataclass
class RunOutput:
    rounds: pd.DataFrame
    comm: pd.DataFrame
    cases: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    #: the predicted masks of the candidate test cases at the selected round (final runs only)
    qualitative: list[qualitative.Case] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("protocol.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def output_channels(data: FederatedData) -> int:
    """One logit for a single structure (sigmoid), one per class otherwise (softmax)."""
    return 1 if data.num_classes == 2 else data.num_classes


def build_model(spec: ModelSpec, data: FederatedData, init_seed: int) -> nn.Module:
    cls = get_model(spec.name)
    torch.manual_seed(init_seed)
    return cls(data.in_channels, output_channels(data), **spec.options)


def build_method(spec: MethodSpec) -> Method:
    cls = get_method(spec.name)
    return cls(**spec.params)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The protocol's mixed precision for the model's passes (local training, methods' extra
    passes, evaluation forwards): ``bf16`` / ``fp16`` autocast convolutions and matrix products
    to bfloat16 / float16 (weights, gradients and optimizer state stay float32; losses and
    normalizations run in float32, as autocast's op lists say; fp16 steps go through a gradient
    scaler, :meth:`pflbench.client.Client.optimizer`). Metrics and aggregation never run under
    it: counts in 16 bits lose integers above 2048. ``off`` changes nothing, so default runs
    are bit for bit what they were."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(
    model: nn.Module, data: SiteData, device: torch.device, batch: int = 32, amp: str = "off"
) -> torch.Tensor:
    """Class map for every image of ``data`` (model in eval mode, restored afterwards), left on
    ``device``: the Dice/IoU counts are taken there too, and only the per-case scores travel
    to the host. Only the forward pass runs under ``amp``, the thresholds in float32."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        x = data.images[i : i + batch].to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(x)
        out.append(metrics.predict_labels(logits.float()))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


class Federation:
    """A run in progress. ``run()`` returns the tidy tables; nothing here writes files."""

    def __init__(
        self,
        data: FederatedData,
        splits: dict[str, dict[str, list[str]]],
        method: Method,
        model_spec: ModelSpec,
        protocol: Protocol,
        seed: int,
        mode: Mode = "final",
        on_eval: EvalCallback | None = None,
        on_round: RoundCallback | None = None,
        store: StateStore | None = None,
        held_out: Sequence[str] = (),
        evaluation: Evaluation | None = None,
    ) -> None:
        data, newcomers = _hold_out(data, held_out)
        self.data = data  # the federation's sites only: a held-out site never reaches a hook
        self.protocol = protocol
        self.method = method
        self.mode = mode
        self.seed = seed
        self.on_eval = on_eval
        self.on_round = on_round
        self.device = resolve_device(protocol.device)
        members = build_clients(data, splits, mode)
        placed, self.placement = place_clients(
            members + build_clients(newcomers, splits, mode), protocol.data_placement, self.device
        )
        self.clients: list[ClientSplits] = placed[: len(members)]
        self.newcomers: list[ClientSplits] = placed[len(members) :]
        self.evaluation = evaluation or Evaluation()
        #: the federation's last broadcast, per client id (what a newcomer may be given)
        self.final_messages: dict[str, Message] = {}
        self.ids = [c.name for c in self.clients]
        self.by_id = {c.name: c for c in self.clients}
        seeded = build_model(model_spec, data, _seed(seed, "init"))
        self.model = method.adapt_model(seeded).to(self.device)
        if protocol.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.initial = _state_copy(self.model)
        self.client_seed = _seed(seed, "client")
        self.sampling = np.random.default_rng(_seed(seed, "sampling"))
        self.store = store or make_store(protocol.store)
        self.budget = Budget()
        opt = protocol.optimizer
        self.work = LocalWork(
            epochs=protocol.local_epochs,
            steps=protocol.local_steps,
            batch_size=protocol.batch_size,
            optimizer=opt.name,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            momentum=opt.momentum,
            augment=protocol.augmentations,
            shuffle=protocol.shuffle,
            loss_smoothing=protocol.loss_smoothing,
            aggregation_weights=protocol.aggregation_weights,
            amp=protocol.amp,
        )
        self.persist_optimizer = (method.optimizer_state or protocol.optimizer_state) == "persist"
        self.comm_rows: list[dict[str, Any]] = []
        self.round_rows: list[dict[str, Any]] = []
        self.best: dict[str, tuple[float, int]] = {}
        self.timings = {"setup_s": 0.0, "train_s": 0.0, "aggregate_s": 0.0, "eval_s": 0.0}
        self.status = "ok"
        self.error = ""
        self.rounds_done = 0
        self.qualitative: list[qualitative.Case] = []
        self.newcomer_bytes_up = 0
        self.newcomer_errors: list[str] = []

    # client records --------------------------------------------------------------------------
    def _open(self, cid: str, round: int) -> Client:
        record = self.store.get(cid)
        self.model.load_state_dict(record["model"])
        return Client(
            cid,
            self.model,
            record["state"],
            self.by_id[cid].train,
            self.work,
            round=round,
            seed=self.client_seed,
            device=self.device,
            budget=self.budget,
            persist_optimizer=self.persist_optimizer,
            lr_factor=self.protocol.lr_factor(round),
        )

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """Around every client hook: the protocol's precision, and one divergence check at the
        end of the hook for every loss it trained on (no host synchronisation per step)."""
        with divergence_guard(), autocast(self.protocol.amp, self.device):
            yield

    def _close(self, cid: str, client: Client) -> None:
        self.store.put(cid, {"model": _state_copy(self.model), "state": client.state})

    def _comm(
        self, round: int, cid: str, up: int = 0, down: int = 0, sampled: bool = False
    ) -> None:
        self.comm_rows.append(
            {"round": round, "client": cid, "bytes_up": up, "bytes_down": down, "sampled": sampled}
        )

    # phases -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        for cid in self.ids:
            self.store.put(cid, {"model": _state_copy(self.model), "state": {}})
        self.method.start_server(self.model, list(self.ids))
        payloads: dict[str, Any] = {}
        for cid in self.ids:
            client = self._open(cid, 0)
            with self._numerics():
                payload = self.method.fresh().setup(client)
            self._close(cid, client)
            if payload is not None:
                payloads[cid] = payload
                self._comm(0, cid, up=payload_bytes(payload))
        messages = self.method.setup_server(payloads) if payloads else {}
        for cid, msg in messages.items():
            client = self._open(cid, 0)
            self.method.fresh().receive_setup(client, msg)
            self._close(cid, client)
            self._comm(0, cid, down=payload_bytes(msg))

    def _sample(self) -> list[str]:
        k = len(self.ids)
        n = max(1, int(round(self.protocol.client_fraction * k)))
        if n >= k:
            return list(self.ids)
        chosen = sorted(self.sampling.choice(k, size=n, replace=False).tolist())
        return [self.ids[i] for i in chosen]

    def _round(self, r: int) -> None:
        t0 = time.perf_counter()
        on_disk = not isinstance(self.store, MemoryStore)
        uploads: dict[str, Upload] = {}
        stored: list[str] = []
        for cid in self._sample():
            client = self._open(cid, r)
            m = self.method.fresh()
            with self._numerics():
                m.local_update(client)
            up = m.upload(client) if self.method.communicates else None
            self._close(cid, client)
            if up is not None:
                if on_disk:  # keep one upload in memory at a time
                    self.store.put(f"{cid}/upload", {"upload": up})
                    stored.append(cid)
                else:
                    uploads[cid] = up
            self._comm(r, cid, up=payload_bytes(up), sampled=True)
        t1 = time.perf_counter()
        self.timings["train_s"] += t1 - t0
        if not (uploads or stored):
            return
        messages = self.method.aggregate(
            StoredUploads(self.store, stored) if on_disk else uploads, r
        )
        targets = {cid: messages for cid in self.ids} if isinstance(messages, Message) else messages
        self.final_messages = dict(targets)
        for cid, msg in targets.items():
            client = self._open(cid, r)
            with self._numerics():  # FedALA and others train or score here
                self.method.fresh().receive(client, msg)
            self._close(cid, client)
            self._comm(r, cid, down=payload_bytes(msg))
        self.timings["aggregate_s"] += time.perf_counter() - t1

    def _eval_model(self, cid: str, r: int) -> nn.Module:
        client = self._open(cid, r)
        with self._numerics():  # fine-tuning methods train here
            return self.method.fresh().eval_model(client)

    def _score(
        self, model: nn.Module, data: SiteData, surface: bool, pred: torch.Tensor | None = None
    ) -> pd.DataFrame:
        pred = predict(model, data, self.device, amp=self.protocol.amp) if pred is None else pred
        return metrics.evaluate_cases(
            pred,
            data.labels,
            data.case_ids,
            data.slice_index,
            self.data.structures,
            spacing=data.spacing,
            case_level=self.data.case_level,
            surface=surface,
        )

    def _evaluate(self, r: int) -> float:
        t0 = time.perf_counter()
        selectable = {
            "best_after_half": r >= self.protocol.first_selectable() or self.protocol.rounds == 1,
            "best": True,
            "last": False,
        }[self.protocol.selection]
        client_scores = []
        for cid in self.ids:
            model = self._eval_model(cid, r)
            splits = [("val", self.by_id[cid].val)]
            if self.mode == "final" and self.protocol.track_test:
                splits.append(("test", self.by_id[cid].test))
            val_dice = float("nan")
            for split, data in splits:
                cases = self._score(model, data, surface=False)
                per_structure = cases.groupby("structure")[["dice", "iou"]].mean()
                for metric in ("dice", "iou"):
                    for structure, value in per_structure[metric].items():
                        self._round_row(r, cid, split, structure, metric, value)
                    mean = float(per_structure[metric].mean())
                    self._round_row(r, cid, split, "mean", metric, mean)
                    if split == "val" and metric == "dice":
                        val_dice = mean
            client_scores.append(val_dice)
            if selectable and (cid not in self.best or val_dice > self.best[cid][0]):
                self.best[cid] = (val_dice, r)
                self.store.put(f"{cid}/snapshot", {"module": model})  # the store copies it
        self.timings["eval_s"] += time.perf_counter() - t0
        return float(np.nanmean(client_scores)) if client_scores else float("nan")

    def _round_row(
        self, r: int, cid: str, split: str, structure: str, metric: str, value: float
    ) -> None:
        self.round_rows.append(
            {
                "round": r,
                "client": cid,
                "split": split,
                "structure": structure,
                "metric": metric,
                "value": float(value),
            }
        )

    def _final_cases(self) -> pd.DataFrame:
        """Full per-case metrics (surface distances too) at the selected and the last round."""
        t0 = time.perf_counter()
        splits = ["val"] + (["test"] if self.mode == "final" else [])
        frames = []
        last = self.rounds_done
        for cid in self.ids:
            current = self._eval_model(cid, last)
            chosen: list[tuple[str, int, nn.Module]] = [("last", last, current)]
            if cid in self.best:
                snap = self.store.get(f"{cid}/snapshot")["module"]
                chosen.append(("best", self.best[cid][1], snap))
            else:
                chosen.append(("best", last, current))
            for selection, r, model in chosen:
                for split in splits:
                    data = getattr(self.by_id[cid], split)
                    pred = predict(model, data, self.device, amp=self.protocol.amp)
                    if selection == "best" and split == "test":
                        self._keep_qualitative(cid, r, data, pred)
                    df = self._score(model, data, self.protocol.surface_metrics, pred)
                    df.insert(0, "split", split)
                    df.insert(0, "client", cid)
                    df.insert(0, "round", r)
                    df.insert(0, "selection", selection)
                    frames.append(df)
        self.timings["eval_s"] += time.perf_counter() - t0
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _keep_qualitative(self, cid: str, r: int, data: SiteData, pred: torch.Tensor) -> None:
        """Keep the selected round's predictions of the site's candidate test cases (the fixed
        rule of :func:`pflbench.qualitative.candidate_cases`) for the report's figure."""
        for case in qualitative.candidate_cases(
            cid, data.case_ids, self.protocol.qualitative_cases
        ):
            idx = sorted(
                (i for i, c in enumerate(data.case_ids) if c == case),
                key=lambda i: data.slice_index[i],
            )
            pick = idx[qualitative.representative_slice(data.labels[idx].cpu().numpy())]
            self.qualitative.append(
                qualitative.Case(
                    client=cid,
                    case_id=case,
                    slice_index=int(data.slice_index[pick]),
                    round=int(r),
                    image=qualitative.display_image(data.images[pick].cpu().numpy()),
                    label=qualitative.label_map(data.labels[pick].cpu().numpy()),
                    pred=qualitative.label_map(pred[pick].cpu().numpy()),
                )
            )

    # sites that did not take part -----------------------------------------------------------
    def _personal_average(self) -> Message | None:
        """The clients' personal entries (the complement of each one's partition, element-wise
        where it is a mask), uploaded once after the last round and averaged by the server
        (``newcomer_personal: average``); their bytes are ``newcomer_bytes_up``."""
        if not self.method.communicates:
            return None
        uploads: dict[str, Upload] = {}
        for cid in self.ids:
            client = self._open(cid, self.rounds_done)
            state = self.model.state_dict()
            entries, masks = {}, {}
            for k, m in self.method.fresh().client_partition(client).items():
                if not state[k].is_floating_point():
                    continue
                if isinstance(m, torch.Tensor):
                    if bool((~m).any()):
                        entries[k], masks[k] = state[k].detach().clone(), ~m
                elif not m:
                    entries[k] = state[k].detach().clone()
            if entries:
                uploads[cid] = Upload(entries=entries, masks=masks, weight=client.weight)
                self.newcomer_bytes_up += payload_bytes(uploads[cid])
        return masked_average(uploads) if uploads else None

    def _newcomer_client(self, site: ClientSplits, labelled: bool) -> Client:
        """A view of a held-out site: its own train split (no labels in zero-shot), a copy of the
        architecture at the initial weights, and the run's budget."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.initial)
        cls = Client if labelled else UnlabelledClient
        args = (site.name, model, {}, site.train) if labelled else (site.name, model, site.train)
        return cls(
            *args,
            self.work,
            round=self.rounds_done + 1,
            seed=_seed(self.seed, "newcomer"),
            device=self.device,
            budget=self.budget,
        )

    def _unseen_cases(self) -> pd.DataFrame:
        """Each held-out site's test split scored with the method's newcomer model, per regime:
        split ``unseen``, client = the held-out site, selection ``last`` (a newcomer gets the
        final messages; there is no validation history of its own to select on)."""
        t0 = time.perf_counter()
        ev = self.evaluation
        personal = self._personal_average() if ev.newcomer_personal == "average" else None
        view = ServerView(initial=self.initial, messages=self.final_messages, personal=personal)
        frames = []
        for site in self.newcomers:
            zero = self.method.fresh().newcomer_model(view, self._newcomer_client(site, False))
            models = {"zero_shot": zero}
            if "few_shot" in ev.regimes:
                client = self._newcomer_client(site, True)
                try:
                    models["few_shot"] = self.method.fresh().newcomer_adapt(
                        client, copy.deepcopy(zero), ev.few_shot_steps
                    )
                except Diverged as exc:
                    self.newcomer_errors.append(f"{site.name} few_shot: {exc}")
            for regime in ev.regimes:
                if regime not in models:
                    continue
                df = self._score(models[regime], site.test, self.protocol.surface_metrics)
                df.insert(0, "split", "unseen")
                df.insert(0, "client", site.name)
                df.insert(0, "round", self.rounds_done)
                df.insert(0, "selection", "last")
                df["regime"] = regime
                frames.append(df)
        self.timings["unseen_s"] = time.perf_counter() - t0
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _client_partition_sizes(self) -> dict[str, dict[str, int]]:
        """Shared and personal entries of each client's own partition at the end (element masks
        included), next to the method's base partition in the manifest."""
        sizes = {}
        for cid in self.ids:
            client = self._open(cid, self.rounds_done)
            sizes[cid] = partition_sizes(self.model, self.method.fresh().client_partition(client))
        return sizes

    def run(self) -> RunOutput:
        start = time.perf_counter()
        threads = self.protocol.threads
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            self._setup()
            self.timings["setup_s"] = time.perf_counter() - t0
            T = self.protocol.rounds
            for r in range(1, T + 1):
                try:
                    self._round(r)
                except Diverged as exc:
                    self.status, self.error = "diverged", str(exc)
                    break
                self.rounds_done = r
                if r % self.protocol.eval_every == 0 or r == T:
                    score = self._evaluate(r)
                    if self.on_eval is not None:
                        self.on_eval(r, score)
                if self.on_round is not None:
                    self.on_round(r, T)
            if self.rounds_done == 0:
                cases = pd.DataFrame(
                    columns=["selection", "round", "client", "split", *metrics.METRIC_COLUMNS]
                )
            else:
                if self.status == "diverged" and not any(
                    row["round"] == self.rounds_done for row in self.round_rows
                ):
                    self._evaluate(self.rounds_done)
                cases = self._final_cases()
                if self.newcomers and self.mode == "final":
                    cases = pd.concat([cases, self._unseen_cases()], ignore_index=True)
            client_sizes = self._client_partition_sizes()
        finally:
            self.store.close()
        self.timings["total_s"] = time.perf_counter() - start
        probe = self.model
        info = {
            "status": self.status,
            "error": self.error,
            "rounds_done": self.rounds_done,
            "timings": self.timings,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "data_placement": self.placement,
            "optimizer_state": "persist" if self.persist_optimizer else "reset",
            "budget": dict(self.budget.samples),
            "partition_sizes": partition_sizes(probe, self.method.partition(probe)),
            "client_partition_sizes": client_sizes,
            "deviations": self.method.active_deviations(),
            "selected_rounds": {cid: r for cid, (_, r) in self.best.items()},
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.newcomers:
            info["held_out"] = [c.name for c in self.newcomers]
            info["newcomer_bytes_up"] = self.newcomer_bytes_up
            info["newcomer_errors"] = self.newcomer_errors
        comm = pd.DataFrame(
            self.comm_rows, columns=["round", "client", "bytes_up", "bytes_down", "sampled"]
        )
        info["bytes_up"] = int(comm["bytes_up"].sum())
        info["bytes_down"] = int(comm["bytes_down"].sum())
        rounds = pd.DataFrame(
            self.round_rows, columns=["round", "client", "split", "structure", "metric", "value"]
        )
        return RunOutput(
            rounds=rounds, comm=comm, cases=cases, info=info, qualitative=self.qualitative
        )


def _hold_out(data: FederatedData, held_out: Sequence[str]) -> tuple[FederatedData, FederatedData]:
    """The federation's data without the held-out sites, and the held-out sites alone; an
    unknown site is an error naming the dataset's sites."""
    unknown = [s for s in held_out if s not in data.site_names]
    if unknown:
        raise ValueError(
            f"held-out sites {unknown} are not sites of dataset {data.name!r} ({data.site_names})"
        )
    keep = [s for s in data.sites if s.name not in held_out]
    if held_out and not keep:
        raise ValueError(f"dataset {data.name!r}: holding out {list(held_out)} leaves no site")
    out = [s for s in data.sites if s.name in held_out]
    return dataclasses.replace(data, sites=keep), dataclasses.replace(data, sites=out)


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (and of the GPU when one is used), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    if device is not None and device.type == "cuda":
        mb += torch.cuda.max_memory_allocated(device) / 2**20
    return float(mb)
