"""FedSM: a global model, SoftPull personalized models and a site selector that routes images."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.messages import Message, Tensors, Upload
from pflbench.method import Method
from pflbench.methods._common import step
from pflbench.params import Param

PERSONAL, SELECTOR, SELECTOR_OPT, BANK = (
    "fedsm/personal",
    "fedsm/selector",
    "fedsm/selector_opt",
    "fedsm/bank",
)


class SiteSelector(nn.Module):
    """A small VGG-style image classifier: which site does this image come from?

    Four blocks of conv3×3–ReLU–maxpool (widths w, 2w, 4w, 8w), global average pooling and a
    linear layer; no normalisation layers, so averaging it never touches integer buffers.
    """

    def __init__(self, in_channels: int, sites: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for k in range(4):
            layers += [nn.Conv2d(c, width * 2**k, 3, padding=1), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = width * 2**k
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, sites)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class SelectorRouting(nn.Module):
    """Per image: the personalized model of the site the selector names when its softmax
    confidence exceeds ``threshold``, otherwise the global model (the official test script)."""

    def __init__(
        self,
        selector: nn.Module,
        experts: list[nn.Module | None],
        fallback: nn.Module,
        threshold: float,
    ) -> None:
        super().__init__()
        self.selector = selector
        self.experts = nn.ModuleList([e if e is not None else nn.Identity() for e in experts])
        self.present = [e is not None for e in experts]
        self.fallback = fallback
        self.threshold = threshold

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The expert index of each image, -1 for the global model."""
        conf, idx = F.softmax(self.selector(x), dim=1).max(dim=1)
        present = torch.tensor(self.present, device=x.device)
        keep = (conf > self.threshold) & present[idx]
        return torch.where(keep, idx, torch.full_like(idx, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.route(x)
        out = self.fallback(x)
        for k, expert in enumerate(self.experts):
            rows = choice == k
            if bool(rows.any()):
                out[rows] = expert(x[rows])
        return out


def soft_pull(models: Mapping[str, Tensors], lam: float) -> dict[str, Tensors]:
    """pᵢ = λ·wᵢ + (1 − λ)/(M − 1)·Σ_{j≠i} wⱼ over the M uploaded personalized models.

    Accumulates in float64; with one model (M = 1) it is returned as it is (the official
    aggregator would divide by zero).
    """
    ids = list(models)
    if len(ids) == 1:
        return {ids[0]: {k: v.clone() for k, v in models[ids[0]].items()}}
    keys = models[ids[0]].keys()
    total = {k: sum(models[c][k].to(torch.float64) for c in ids) for k in keys}
    other = (1.0 - lam) / (len(ids) - 1)
    out: dict[str, Tensors] = {}
    for c in ids:
        out[c] = {}
        for k in keys:
            own = models[c][k].to(torch.float64)
            out[c][k] = (lam * own + other * (total[k] - own)).to(models[c][k].dtype)
    return out


def _floats(state: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


class FedSM(Method):
    """Global model, SoftPull personalized models and a site selector that routes each image.

    A FedAvg global model w, personalized models pᵢ mixed by SoftPull, and a model selector
    trained to predict the site an image comes from.

    Paper: Xu, Li, Roth, Wang, Myronenko, Xu, "Closing the Generalization Gap of Cross-silo
    Federated Medical Image Segmentation", CVPR 2022 (arXiv 2203.10144). Checked against the
    official code, NVIDIA/NVFlare ``research/fed-sm`` (learner, ``AccumulateWeightedAggregatorFedSM``,
    ``result_stat/prostate_2d_test_only.py``).

    Round, per sampled client (official order): (1) the global copy (the client's model, w
    merged in on receipt) trains for the suite's budget and is uploaded for FedAvg; (2) pᵢ,
    started from the SoftPull model the server sent (round 1: the shared init), trains for the
    same budget (label ``personal``) and is uploaded whole; (3) the selector trains for
    ``selector_epochs`` (default 1, official) epochs of cross-entropy on the client's own images,
    every image labelled with the client's site index (label ``selector``), with Adam at
    ``selector_lr`` (1e-3, official) whatever the suite's optimizer, whose moments are averaged
    by the server and loaded back, as the official code does (its README: the selector does not
    train without it). Server: w and the selector (and its Adam moments) are averaged with the
    aggregation weights; the personalized models are mixed by SoftPull
    pᵢ = λ·wᵢ + (1−λ)/(M−1)·Σ_{j≠i} wⱼ, λ = 0.7 (official default), over the M uploads, float
    entries only; each client gets its own pᵢ in a per-client message.

    "Class" in segmentation: the selector's classes are the sites (index = position of the
    client id in sorted order, assigned by the server in ``setup_server``); the segmentation
    models are the suite's model. Evaluation (``inference="selector"``, default): the official
    test-time rule, per image: the selector's softmax; if its maximum exceeds ``threshold``
    (0.9, official) the image goes to that site's SoftPull model pⱼ, otherwise to w. So every
    client receives the bank of all pⱼ with each message (counted in bytes; the official test
    script loads them centrally). ``inference="personal"`` evaluates pᵢ on site i (the official
    per-round validation) and sends no bank. w, with the selector, serves unseen sites.
    Optimizer state of w and pᵢ reset every round; the selector's Adam state persists (official).
    """

    name = "fedsm"
    newcomer = (
        "the global model w (no personalized pⱼ and no selector routing for a site the selector "
        "never saw)"
    )
    paper = "Xu et al., CVPR 2022, arXiv:2203.10144"
    official_code = "NVIDIA/NVFlare research/fed-sm (learner, aggregator, test script)"
    shares = "w (FedAvg), pᵢ up / SoftPull pᵢ down, the selector and its Adam moments (FedAvg)"
    personal = "pᵢ between rounds, the selector's Adam state; the bank of all pⱼ (received)"
    evaluates = "per image: pⱼ of the site the selector names (confidence > 0.9), else w"
    extra_passes = "`personal`: pᵢ's training, the same budget as w's; `selector`: its epochs"
    deviations: ClassVar[tuple[str, ...]] = (
        "the selector is a 4-block VGG-style CNN without normalisation (width 16), not VGG11, "
        "sized for the suite's image sizes",
        "with a single upload in a round SoftPull returns that model (the official aggregator "
        "divides by zero); with partial participation it mixes the sampled clients only",
        "each client receives the bank of all pⱼ for the selector's routing, counted in bytes "
        "(the official test script loads them on one machine)",
        "the model selection is the engine's, on the routed prediction (the official code keeps "
        "the best pᵢ by its own validation Dice)",
    )
    params = {
        "lam": Param(
            0.7, low=0.1, high=1.0, valid=(0, 1), help="λ: SoftPull weight of the client's own pᵢ"
        ),
        "selector_epochs": Param(1, valid=(1, None), help="selector epochs per round"),
        "selector_lr": Param(
            1e-3, low=1e-4, high=1e-2, log=True, valid=(0, None), help="selector Adam rate"
        ),
        "selector_width": Param(16, valid=(1, None), help="channels of the selector's first block"),
        "threshold": Param(
            0.9, valid=(0, 1), help="selector confidence above which pⱼ replaces w at inference"
        ),
        "inference": Param(
            "selector",
            choices=("selector", "personal"),
            search=False,
            help="selector: the official test-time routing; personal: pᵢ on its own site",
        ),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.sites: list[str] = []
        self.pulled: dict[str, Tensors] = {}

    # setup: the server assigns each client its selector label ----------------------------------
    def setup(self, client: Client) -> int:
        return 1  # a presence token: the server learns who takes part

    def setup_server(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        self.sites = sorted(payloads)
        return {cid: {"label": i, "sites": len(self.sites)} for i, cid in enumerate(self.sites)}

    def receive_setup(self, client: Client, message: Any) -> None:
        super().receive_setup(client, message)
        # every client starts from the same seeded init, so a seed drawn from it gives every
        # client the same selector initialisation without sending it
        first = next(iter(client.model.state_dict().values()))
        seed = zlib.crc32(first.detach().cpu().numpy().tobytes())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            selector = self._selector(client, message["sites"])
        client.state[SELECTOR] = {k: v.clone() for k, v in selector.state_dict().items()}

    def _selector(self, client: Client, sites: int | None = None) -> nn.Module:
        sites = sites if sites is not None else client.state["setup"]["sites"]
        channels = int(client.train_data.images.shape[1])
        return SiteSelector(channels, sites, self.selector_width).to(client.device)

    # rounds ----------------------------------------------------------------------------------
    def receive(self, client: Client, message: Message) -> None:
        super().receive(client, message)
        ex = message.extras
        if "personal" in ex:
            base = client.state.get(PERSONAL) or client.model.state_dict()
            client.state[PERSONAL] = {
                k: ex["personal"].get(k, v).detach().clone() for k, v in base.items()
            }
        if "selector" in ex:
            client.state[SELECTOR] = {k: v.clone() for k, v in ex["selector"].items()}
        opt = client.state.get(SELECTOR_OPT)
        if opt is not None and "exp_avg" in ex:
            for i, s in opt["state"].items():
                s["exp_avg"] = ex["exp_avg"][str(i)].clone()
                s["exp_avg_sq"] = ex["exp_avg_sq"][str(i)].clone()
        if "bank" in ex:
            client.state[BANK] = {j: dict(p) for j, p in ex["bank"].items()}

    def local_update(self, client: Client) -> None:
        personal = client.new_model(client.state.get(PERSONAL))
        client.fit()
        client.fit(personal, label="personal", key="personal")
        client.state[PERSONAL] = {k: v.detach().clone() for k, v in personal.state_dict().items()}
        self.train_selector(client)

    def train_selector(self, client: Client) -> None:
        selector = self._selector(client)
        selector.load_state_dict(client.state[SELECTOR])
        opt = torch.optim.Adam(selector.parameters(), lr=self.selector_lr)
        if client.state.get(SELECTOR_OPT) is not None:
            opt.load_state_dict(client.state[SELECTOR_OPT])
        label = int(client.state["setup"]["label"])
        where = f"client {client.id} round {client.round} (selector)"
        selector.train()
        for x, _ in client.batches("selector", epochs=self.selector_epochs):
            target = torch.full((len(x),), label, dtype=torch.long, device=x.device)
            opt.zero_grad(set_to_none=True)
            step(opt, F.cross_entropy(selector(x), target), where)
        client.state[SELECTOR] = {k: v.detach().clone() for k, v in selector.state_dict().items()}
        client.state[SELECTOR_OPT] = opt.state_dict()

    def upload(self, client: Client) -> Upload | None:
        up = super().upload(client)
        opt = client.state[SELECTOR_OPT]["state"]
        up.extras = {
            "personal": _floats(client.state[PERSONAL]),
            "selector": _floats(client.state[SELECTOR]),
            "exp_avg": {str(i): s["exp_avg"].clone() for i, s in opt.items()},
            "exp_avg_sq": {str(i): s["exp_avg_sq"].clone() for i, s in opt.items()},
        }
        return up

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> dict[str, Message]:
        ups = dict(uploads.items())
        glob = masked_average(ups)
        common = {}
        for part in ("selector", "exp_avg", "exp_avg_sq"):
            pieces = {c: Upload(entries=u.extras[part], weight=u.weight) for c, u in ups.items()}
            common[part] = masked_average(pieces).entries
        pulled = soft_pull({c: u.extras["personal"] for c, u in ups.items()}, self.lam)
        self.pulled.update(pulled)
        if self.inference == "selector":
            common["bank"] = {
                str(i): self.pulled[c] for i, c in enumerate(self.sites) if c in self.pulled
            }
        messages = {}
        for cid in self.sites or list(ups):
            extras = dict(common)
            if cid in pulled:
                extras["personal"] = pulled[cid]
            messages[cid] = Message(entries=glob.entries, masks=glob.masks, extras=extras)
        return messages

    # evaluation -----------------------------------------------------------------------------
    def eval_model(self, client: Client) -> nn.Module:
        personal = client.state.get(PERSONAL)
        if self.inference == "personal":
            return client.model if personal is None else client.new_model(personal)
        bank = client.state.get(BANK)
        if not bank:
            return client.model
        selector = self._selector(client)
        selector.load_state_dict(client.state[SELECTOR])
        experts: list[nn.Module | None] = []
        for j in range(int(client.state["setup"]["sites"])):
            entries = bank.get(str(j))
            if entries is None:
                experts.append(None)
                continue
            m = client.new_model(client.model.state_dict())
            m.load_state_dict(entries, strict=False)
            experts.append(m)
        glob = client.new_model(client.model.state_dict())
        return SelectorRouting(selector, experts, glob, self.threshold)
