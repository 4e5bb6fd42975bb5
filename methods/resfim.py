"""pFL-ResFIM: parameter-level personalization by Residual Fisher Information."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pflbench.aggregation import masked_average
from pflbench.client import Client
from pflbench.fisher import (
    FISHER_CHUNK,
    diagonal_fisher_sets,
    normalize_scores,
    random_mask,
    residual_scores,
    tensor_level_mask,
    top_rho_mask,
)
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.params import Param, ParamError
from pflbench.partition import BATCHNORM_STATS, Partition, keys_of_types
from pflbench.spectral import spectral_transfer, style_bank_entry

__all__ = ["ResFIM", "intensity_stats", "intensity_transfer", "simulate_style"]

Bank = dict[str, torch.Tensor]

_BANK = "resfim/bank"  # other clients' amplitude spectra, received once at setup
_SHARED = "resfim/shared"  # this client's element masks (True = domain-invariant, shared)
_MASK_ROUND = "resfim/mask_round"  # round at which the mask was last computed


# --------------------------------------------------------------------------------------------
# Style simulation (the images never leave the client; only amplitude spectra arrive)
# --------------------------------------------------------------------------------------------


def intensity_stats(amp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the images an amplitude spectrum came from.

    Read from the spectrum itself, so the ``intensity`` transfer needs nothing beyond the
    amplitude bank: the DC amplitude is ``|Σ x| = H·W·mean`` (images are non-negative) and by
    Parseval ``Σ x² = Σ |X|² / (H·W)``. ``amp``: …×H×W; returns tensors of shape ….
    """
    hw = amp.shape[-1] * amp.shape[-2]
    mean = amp[..., 0, 0] / hw
    second = amp.square().sum((-2, -1)) / (hw * hw)
    return mean, (second - mean.square()).clamp_min(0).sqrt()


def intensity_transfer(
    x: torch.Tensor, amp_target: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """The crude alternative to spectral transfer: match each channel's mean and std to the target.

    ``x``: N×C×H×W; ``amp_target``: N×C×H×W amplitude spectra; ``lam``: N blend weights.
    ``x' = (1−λ)·x + λ·((x − μ_x)/σ_x·σ_t + μ_t)``, clipped to [0, 1]; λ = 0 is the identity.
    """
    mu_t, sd_t = intensity_stats(amp_target)
    mu_x = x.mean((-2, -1))
    sd_x = x.std((-2, -1), correction=0).clamp_min(1e-6)
    matched = (x - mu_x[..., None, None]) / sd_x[..., None, None] * sd_t[..., None, None]
    matched = matched + mu_t[..., None, None]
    lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return ((1 - lam) * x + lam * matched).clamp(0.0, 1.0)


def simulate_style(
    x: torch.Tensor,
    bank: torch.Tensor,
    how: str,
    beta: float,
    lambda_min: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``x`` moved into the style of one other client, given that client's amplitude bank.

    Each image takes a random amplitude of ``bank`` and its own λ ~ U(λ_min, 1) (spec §2).
    Labels are untouched by construction: only images go in and out.
    """
    n = x.shape[0]
    pick = torch.randint(len(bank), (n,), generator=generator)
    lam = lambda_min + (1.0 - lambda_min) * torch.rand(n, generator=generator)
    target = bank.index_select(0, pick.to(bank.device)).to(x.device)
    lam = lam.to(x.device)
    if how == "spectral":
        return spectral_transfer(x, target, beta, lam)
    if how == "intensity":
        return intensity_transfer(x, target, lam)
    raise ValueError(f"unknown transfer {how!r}; expected spectral or intensity")


def _compact(shared: torch.Tensor) -> bool | torch.Tensor:
    """An all-True (all-False) mask is whole-tensor sharing (keeping): it needs no mask bits."""
    if bool(shared.all()):
        return True
    if not bool(shared.any()):
        return False
    return shared


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class ResFIM(Method):
    """pFL-ResFIM: share the parameters whose Fisher information does not move with image style.

    Paper: Meilu Zhu, Yuxing Li, Zhiwei Wang, Edmund Y. Lam, "Personalized Federated Learning with
    Residual Fisher Information for Medical Image Segmentation", ISBI 2026, arXiv 2603.14848.

    **From the paper (abstract only):** personalization at the parameter level; a Residual Fisher
    Information Matrix measures how sensitive each parameter is to domain discrepancy; it is
    estimated without raw data leaving a client, by a spectral transfer that simulates the
    other clients' domain styles; domain-sensitive parameters stay local, the server aggregates
    only the domain-invariant ones; a client's model is its sensitive part plus the aggregated
    invariant part.

    **Reconstructed (``reference/resfim.md``; the method section is not public):** everything
    else. Setup: each client uploads the FFT amplitude spectra of ``bank_size`` random training
    images (never phases, images or labels); each client receives the others' amplitudes.
    At the end of local training, on ``fisher_samples`` local training images D_k and their
    transfers D_{k→j} into each other client's style (FDA low-frequency amplitude swap, window
    ``beta``, λ ~ U(``lambda_min``, 1) per image), R_k = mean_j |F(D_{k→j}) − F(D_k)| with F the
    diagonal empirical Fisher (per-sample gradients, or the ``batch`` approximation); R is
    min–max normalized; the top-``rho`` entries of each tensor are personal. The server averages
    each element over the clients that share it (n-weighted), an element nobody shares keeps
    each client's value. BN running statistics have no gradient and stay local by default.
    During ``warmup_rounds`` every parameter is shared (BN statistics per ``bn_stats``); masks are
    recomputed every ``mask_every`` rounds after that.

    Choices of this implementation: Fisher passes run the model in eval mode (BN uses running
    statistics, as at evaluation, so a per-sample gradient is defined and no statistic moves);
    the Fisher loss is the suite's training loss; masks cover every trainable parameter, BN γ/β
    included; ties in top-ρ go to the lower index; with ``rho`` 0 or 1 or ``mask: random`` no
    Fisher is computed (the mask does not depend on it); the bank is exchanged only when
    something uses it; a client with no other client in the bank gets R = 0 (nothing to
    compare). Bytes: the bank once (float32 amplitudes), then every shared tensor whole plus its
    mask at one bit per element; a tensor a client shares (keeps) whole is sent (not sent)
    without a mask, which carries the same information. Evaluated model: the client's
    personalized model (an unseen site gets the element-wise broadcast: see ``newcomer``).
    Optimizer state is reset every round. Extra work: K × ``fisher_samples`` Fisher samples per client and mask round,
    recorded under "fisher". ``style_augment: p`` swaps each training image into a random
    other client's style with probability p, inside the suite's budget.

    Switches (ablation, spec §4–7): ``fisher``, ``residual``, ``transfer``
    (``intensity`` = per-channel mean/std matching read from the same amplitude bank),
    ``normalize``, ``mask``, ``scope`` (``model`` = one top-ρ over all entries; not in the spec:
    it is the reading under which ``normalize`` changes the element-wise mask), ``bn_stats``,
    ``aggregate_over``, ``style_augment``.
    """

    name = "resfim"
    newcomer = (
        "the element-wise broadcast (each element averaged over the clients sharing it), the "
        "initial value where no client shares it; BN statistics not sent (bn_stats: local) "
        "recomputed on the new site's unlabelled images (option: the clients' personal entries "
        "averaged)"
    )
    paper = "Zhu, Li, Wang, Lam, ISBI 2026, arXiv:2603.14848"
    official_code = "none public: everything beyond the abstract follows reference/resfim.md"
    shares = "element-wise: the entries outside each client's top-ρ residual-Fisher mask"
    personal = "the top-ρ entries of each tensor by residual Fisher; BN running statistics (bn_stats: local)"
    evaluates = "the client's personalized model"
    extra_passes = "`fisher`: K × fisher_samples Fisher samples per mask round"
    deviations: ClassVar[tuple[str, ...]] = (
        "the method section is not public: the Fisher estimator, spectral transfer, normalization and masking rules are a reconstruction (reference/resfim.md)",
    )
    params = {
        # tuned (spec ranges)
        "rho": Param(0.2, 0.05, 0.5, valid=(0, 1), help="fraction of entries kept personal"),
        "beta": Param(
            0.05, 0.005, 0.2, log=True, valid=(0, 0.5), help="low-frequency window half-width ratio"
        ),
        "lambda_min": Param(
            0.5, 0.0, 0.9, valid=(0, 1), help="λ ~ U(lambda_min, 1) per transferred image"
        ),
        # fixed during tuning
        "bank_size": Param(16, valid=(1, None), help="amplitude spectra each client uploads"),
        "fisher_samples": Param(16, valid=(1, None), help="local images per Fisher estimate"),
        "mask_every": Param(1, valid=(1, None), help="recompute the mask every this many rounds"),
        "warmup_rounds": Param(
            1, valid=(0, None), help="rounds sharing every parameter before the first mask"
        ),
        "style_augment": Param(
            0.0, valid=(0, 1), help="probability of a style-swapped training image"
        ),
        # switches (ablation): validated against their choices, never searched by the tuner
        "fisher": Param(
            "per_sample",
            choices=("per_sample", "batch"),
            search=False,
            help="per_sample | batch: the Fisher estimator",
        ),
        "residual": Param(
            True,
            choices=(True, False),
            search=False,
            help="true: rank by R; false: by the local Fisher alone",
        ),
        "transfer": Param(
            "spectral",
            choices=("spectral", "intensity", "none"),
            search=False,
            help="spectral | intensity | none: style simulation",
        ),
        "normalize": Param(
            "tensor",
            choices=("tensor", "global"),
            search=False,
            help="tensor | global: min-max scope of the scores",
        ),
        "mask": Param(
            "resfim",
            choices=("resfim", "random", "tensor"),
            search=False,
            help="resfim | random | tensor: element, random or whole tensors",
        ),
        "scope": Param(
            "tensor",
            choices=("tensor", "model"),
            search=False,
            help="tensor | model: top-ρ in each tensor or over the model",
        ),
        "bn_stats": Param(
            "local",
            choices=("local", "shared"),
            search=False,
            help="local | shared: BN running statistics",
        ),
        "aggregate_over": Param(
            "invariant",
            choices=("invariant", "all"),
            search=False,
            help="invariant | all: who is averaged per element",
        ),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        h = self.hparams  # ranges are checked by each Param's `valid`; here: combinations
        owner = f"method {self.name}"
        if h["transfer"] == "none" and h["residual"]:
            raise ParamError(
                f"{owner}: transfer 'none' leaves no other style to compare with, so residual "
                "must be false (residual: false ranks by the local Fisher alone)"
            )
        if h["transfer"] == "none" and h["style_augment"] > 0:
            raise ParamError(
                f"{owner}: style_augment > 0 needs a transfer (spectral or intensity), not 'none'"
            )

    # what is used --------------------------------------------------------------------------
    @property
    def _needs_fisher(self) -> bool:
        return self.mask != "random" and 0.0 < self.rho < 1.0

    @property
    def _needs_bank(self) -> bool:
        return (self.residual and self._needs_fisher) or self.style_augment > 0

    # partition -----------------------------------------------------------------------------
    def _bn_stat_keys(self, model: nn.Module) -> set[str]:
        return {
            k
            for k in keys_of_types(model, (nn.modules.batchnorm._BatchNorm,))
            if k.rsplit(".", 1)[-1] in BATCHNORM_STATS
        }

    def partition(self, model: nn.Module) -> Partition:
        """The warm-up partition: every floating entry shared, BN statistics per ``bn_stats``."""
        stats = self._bn_stat_keys(model) if self.bn_stats == "local" else set()
        return {
            k: bool(v.is_floating_point()) and k not in stats for k, v in model.state_dict().items()
        }

    def client_partition(self, client: Client) -> Partition:
        """The warm-up partition with this client's element masks on the parameters, once it has
        one. A tensor shared (kept) whole is ``True`` (``False``): only partial masks cost bits.
        """
        part = self.partition(client.model)
        part.update(client.state.get(_SHARED, {}))
        return part

    # setup: the amplitude bank -------------------------------------------------------------
    def setup(self, client: Client) -> torch.Tensor | None:
        if not self._needs_bank:
            return None
        images = client.train_data.images
        return style_bank_entry(images, self.bank_size, client.generator("style-bank")).float()

    def setup_server(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        """Each client gets every other client's amplitudes, never its own back."""
        return {cid: {j: a for j, a in payloads.items() if j != cid} for cid in payloads}

    def receive_setup(self, client: Client, message: Any) -> None:
        client.state[_BANK] = dict(message)

    # local update ----------------------------------------------------------------------------
    def local_update(self, client: Client) -> None:
        bank: Bank = client.state.get(_BANK, {})
        if self.style_augment > 0 and bank:
            self._fit_style_augmented(client, bank)
        else:
            client.fit()
        last = client.state.get(_MASK_ROUND)
        due = last is None or client.round - last >= self.mask_every
        if client.round > self.warmup_rounds and due:
            client.state[_SHARED] = {k: _compact(~m) for k, m in self.personal_mask(client).items()}
            client.state[_MASK_ROUND] = client.round

    def _fit_style_augmented(self, client: Client, bank: Bank) -> None:
        """The suite's budget, with each image swapped into a random other style with prob. p."""
        g = client.generator("style-augment")
        others = sorted(bank)

        def stream():
            for x, y in client.batches("local"):
                swap = torch.rand(len(x), generator=g) < self.style_augment
                pick = torch.randint(len(others), (len(x),), generator=g)
                x = x.clone()
                for j, cid in enumerate(others):
                    sel = (swap & (pick == j)).nonzero().flatten()
                    if len(sel):
                        moved = simulate_style(
                            x[sel.to(x.device)],
                            bank[cid],
                            self.transfer,
                            self.beta,
                            self.lambda_min,
                            g,
                        )
                        x[sel.to(x.device)] = moved
                yield x, y

        client.fit(batches=stream())

    def fisher_data(
        self, client: Client
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """D_k (images, labels) and, per other client j, the same images in j's style (D_{k→j}).

        The labels of D_{k→j} are the labels of D_k. All passes are counted under "fisher".
        """
        data = client.train_data
        n = min(self.fisher_samples, len(data))
        idx = torch.randperm(len(data), generator=client.generator("fisher-samples"))[:n]
        idx = idx.sort().values
        on = idx.to(data.images.device)  # the site's data may live on the GPU
        x = data.images.index_select(0, on).to(client.device)
        y = data.labels.index_select(0, on).to(client.device)
        moved: dict[str, torch.Tensor] = {}
        if self.residual:
            bank: Bank = client.state.get(_BANK, {})
            g = client.generator("fisher-transfer")
            for cid in sorted(bank):
                moved[cid] = simulate_style(
                    x, bank[cid], self.transfer, self.beta, self.lambda_min, g
                )
        client.count("fisher", n * (1 + len(moved)))
        return x, y, moved

    def scores(self, client: Client) -> dict[str, torch.Tensor]:
        """Normalized sensitivity of every trainable parameter entry (R, or F when not residual)."""
        x, y, moved = self.fisher_data(client)
        sets = [(x, y)] + [(xj, y) for xj in moved.values()]
        chunk = FISHER_CHUNK if self.fisher == "per_sample" else client.work.batch_size
        f_local, *f_moved = diagonal_fisher_sets(
            client.model, sets, self.fisher, loss_fn=client.loss, chunk_size=chunk
        )
        raw = residual_scores(f_local, f_moved) if self.residual else f_local
        return normalize_scores(raw, self.normalize)

    def personal_mask(self, client: Client) -> dict[str, torch.Tensor]:
        """``True`` = domain-sensitive (personal) entry, for every trainable parameter."""
        shapes = {k: p.shape for k, p in client.model.named_parameters() if p.requires_grad}
        device = next(client.model.parameters()).device
        if self.mask == "random":
            g = client.generator("random-mask")
            return {k: m.to(device) for k, m in random_mask(shapes, self.rho, g).items()}
        if not self._needs_fisher:  # rho 0 or 1: the ranking does not matter
            full = self.rho >= 1.0
            return {
                k: torch.full(s, full, dtype=torch.bool, device=device) for k, s in shapes.items()
            }
        s = self.scores(client)
        if self.mask == "tensor":
            return tensor_level_mask(s, self.rho)
        return top_rho_mask(s, self.rho, self.scope)

    # upload / aggregate --------------------------------------------------------------------
    def upload(self, client: Client) -> Upload | None:
        if self.aggregate_over == "invariant" or _SHARED not in client.state:
            return super().upload(client)
        # aggregate over all: the whole of every parameter, no mask (the server does not use it)
        state = client.model.state_dict()
        params = {k for k, _ in client.model.named_parameters()}
        part = self.client_partition(client)
        entries = {
            k: state[k].detach().clone() for k, m in part.items() if k in params or m is True
        }
        return Upload(entries=entries, weight=client.weight)

    def aggregate(self, uploads: Mapping[str, Upload], round: int) -> Message:
        """Element-wise over the sharers (spec §6); with ``all`` the uploads carry no masks."""
        return masked_average(uploads)
