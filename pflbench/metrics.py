"""Segmentation metrics: Dice, IoU, HD95 and ASSD per case and per structure, and client summaries.

Definitions (reference: data.md §5)
-----------------------------------
* **Binarisation.** :func:`predict_labels` turns logits N×K×H×W into a class map: for K == 1 (one
  binary structure) a pixel is class 1 when sigmoid(logit) > 0.5, i.e. logit > 0 (a logit of
  exactly 0 is background); for K > 1 the argmax over classes.
* **Structures.** A reported structure is a set of class ids (:func:`structure_masks`), so nested
  structures work: fundus disc = {1, 2}, cup = {2}.
* **Dice / IoU.** ``Dice = 2|P∩T| / (|P| + |T|)``, ``IoU = |P∩T| / |P∪T|``.
* **HD95 / ASSD** follow MedPy (``medpy.metric.binary``, version ≥ 0.5): the border of a mask is the
  mask minus its binary erosion with connectivity 1 (4-connectivity in 2-D, 6 in 3-D; voxels outside
  the array count as background, so a mask touching the array edge has a border there); the
  directed distances A→B are the Euclidean distances (in spacing units) from every border voxel of A
  to the nearest border voxel of B. HD95 is the 95th percentile (numpy's linear interpolation) of
  the **pooled** distances A→B ∪ B→A, and ASSD is the mean of the same pooled distances.
  This is *not* MONAI's ``compute_hausdorff_distance(percentile=95)``, which takes the max of the two
  directed 95th percentiles and can differ by 3× on the same masks; and older MedPy (≤ 0.4) averaged
  the two directed means for ASSD instead of pooling. Do not mix numbers from those definitions.
* **Empty masks (fixed convention).**

  ====================  ==========  ==================================================
  prediction / truth    Dice, IoU   HD95, ASSD
  ====================  ==========  ==================================================
  both empty            1.0         0.0
  exactly one empty     0.0         the failure value: the image (or volume) diagonal
                                    in physical units, :func:`failure_distance`
  ====================  ==========  ==================================================

  The surface distance of an empty mask is undefined; dropping it (NaN) would reward a method
  for predicting nothing, so such a case takes the worst distance the image allows, flagged in
  the ``surface_failure`` column of :func:`evaluate_cases` so reports can count it. This is the
  BraTS convention (an empty prediction of a non-empty tumour scores HD95 = 373.13 mm, the
  diagonal of the 240×240×155 mm volume; Bakas et al., arXiv:1811.02629, and the BraTS
  evaluation in CaPTk), and follows Metrics Reloaded's advice to give undefined boundary metrics
  a declared worst-case value rather than excluding them (Maier-Hein, Reinke et al., Nature
  Methods 21, 2024, arXiv:2206.01653). The diagonal is ``sqrt(Σ (n_i · s_i)²)`` over the axes
  (n_i voxels of spacing s_i), so 373.13 for BraTS and 45.25 for a 32×32 image of 1-unit pixels.

* **Cases.** A case is an image, or a volume (the slices of one case id stacked in slice order) for
  datasets made of slices; :func:`evaluate_cases` gives one row per case and structure. A client's
  score is the mean over its cases; :func:`summarize_clients` turns per-client scores into the
  headline (unweighted mean over clients) plus the case-weighted mean, worst/best client and spread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

__all__ = [
    "predict_labels",
    "structure_masks",
    "dice_iou",
    "surface_distances",
    "failure_distance",
    "hd95",
    "assd",
    "case_metrics",
    "evaluate_cases",
    "summarize_clients",
]

METRIC_COLUMNS: tuple[str, ...] = (
    "case_id",
    "structure",
    "dice",
    "iou",
    "hd95",
    "assd",
    "surface_failure",
)


# --------------------------------------------------------------------------------------------
# Binarisation and structures
# --------------------------------------------------------------------------------------------


def predict_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class map (int64, N×H×W or N×D×H×W) from logits N×K×....

    K == 1: one binary structure, class 1 where sigmoid(logit) > 0.5 (logit > 0). K > 1: argmax.
    """
    if logits.ndim < 2:
        raise ValueError(f"logits must be N×K×..., got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.int64)
    return logits.argmax(dim=1).to(torch.int64)


def structure_masks(
    labels: torch.Tensor | np.ndarray, structures: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor | np.ndarray]:
    """For every structure the boolean mask ``isin(labels, ids)``, same type and device as labels."""
    out: dict[str, torch.Tensor | np.ndarray] = {}
    if isinstance(labels, torch.Tensor):
        for name, ids in structures.items():
            ids_t = torch.as_tensor(list(ids), dtype=labels.dtype, device=labels.device)
            out[name] = torch.isin(labels, ids_t)
    else:
        arr = np.asarray(labels)
        for name, ids in structures.items():
            out[name] = np.isin(arr, np.asarray(list(ids)))
    return out


# --------------------------------------------------------------------------------------------
# Dice / IoU
# --------------------------------------------------------------------------------------------


def _overlap_counts(
    pred: torch.Tensor, true: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item |P∩T|, |P|, |T| (int64) for bool tensors N×...."""
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs true {tuple(true.shape)}")
    n = pred.shape[0] if pred.ndim else 1
    p = pred.reshape(n, -1)
    t = true.reshape(n, -1)
    if p.dtype != torch.bool:
        p = p != 0
    if t.dtype != torch.bool:
        t = t != 0
    inter = (p & t).sum(dim=1, dtype=torch.int64)
    return inter, p.sum(dim=1, dtype=torch.int64), t.sum(dim=1, dtype=torch.int64)


def _dice_iou_from_counts(
    inter: torch.Tensor, psum: torch.Tensor, tsum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    inter = inter.to(torch.float64)
    total = (psum + tsum).to(torch.float64)
    union = total - inter
    one = torch.ones((), dtype=torch.float64, device=inter.device)
    # both empty → total == union == 0 → 1; exactly one empty → inter == 0 → 0.
    dice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), one)
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), one)
    return dice, iou


def dice_iou(
    pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item Dice and IoU (float64, on the input's device) of boolean masks batched N×....

    Empty convention: both empty → 1, exactly one empty → 0.
    """
    pred_t = torch.as_tensor(pred)
    true_t = torch.as_tensor(true, device=pred_t.device)
    return _dice_iou_from_counts(*_overlap_counts(pred_t, true_t))


# --------------------------------------------------------------------------------------------
# Surface distances (MedPy definition)
# --------------------------------------------------------------------------------------------


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(sp) == 1 and ndim > 1:
        sp = sp * ndim
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} entries for a {ndim}-D mask")
    if any(not np.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def _as_mask(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(x)).astype(bool, copy=False)


def _border(mask: np.ndarray) -> np.ndarray:
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, iterations=1, border_value=0)


def surface_distances(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Pooled directed border distances pred→true ∪ true→pred (MedPy's definition), 2-D or 3-D.

    ``spacing`` has one entry per axis of the masks (None: all 1). Both masks must be non-empty
    (``ValueError`` otherwise; :func:`hd95` / :func:`assd` apply the empty convention first).
    The first part of the result is pred→true (one entry per border voxel of pred), then
    true→pred.
    """
    a = _as_mask(pred)
    b = _as_mask(true)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: pred {a.shape} vs true {b.shape}")
    sp = _spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    # Crop to the bounding box of the union plus a one-voxel zero margin. This is exact: every
    # border voxel lies inside the box, erosion sees background outside it (as outside the array,
    # border_value=0), and the distance transform only needs the border voxels.
    union = a | b
    box = []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        hit = np.flatnonzero(union.any(axis=other)) if other else np.flatnonzero(union)
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    a = np.pad(a[tuple(box)], 1)
    b = np.pad(b[tuple(box)], 1)
    border_a = _border(a)
    border_b = _border(b)
    a_to_b = ndimage.distance_transform_edt(~border_b, sampling=sp)[border_a]
    b_to_a = ndimage.distance_transform_edt(~border_a, sampling=sp)[border_b]
    return np.concatenate([a_to_b, b_to_a]).astype(np.float64, copy=False)


def failure_distance(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The declared HD95/ASSD of a case where exactly one mask is empty: the diagonal of the
    image or volume in physical units, ``sqrt(Σ (n_i · s_i)²)`` (BraTS: 373.13 for 240×240×155
    at 1 mm), the largest distance two points of the image can have (up to one voxel)."""
    sp = _spacing(spacing, len(shape))
    return float(np.sqrt(sum((int(n) * s) ** 2 for n, s in zip(shape, sp, strict=True))))


def _surface_pair(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None
) -> tuple[float, float]:
    """(HD95, ASSD) with the empty convention, computing the distances once."""
    a = _as_mask(pred)
    b = _as_mask(true)
    pa, pb = bool(a.any()), bool(b.any())
    if not pa and not pb:
        _spacing(spacing, a.ndim)  # still validate
        return 0.0, 0.0
    if pa != pb:
        worst = failure_distance(a.shape, spacing)
        return worst, worst
    d = surface_distances(a, b, spacing)
    return float(np.percentile(d, 95)), float(d.mean())


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the pooled border distances (MedPy). Both empty → 0; exactly one
    empty → :func:`failure_distance`."""
    return _surface_pair(pred, true, spacing)[0]


def assd(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Mean of the pooled border distances (MedPy ≥ 0.5). Both empty → 0; exactly one empty →
    :func:`failure_distance`."""
    return _surface_pair(pred, true, spacing)[1]


def case_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    spacing: Sequence[float] | None = None,
    surface: bool = True,
) -> dict[str, float]:
    """Dice, IoU, HD95 and ASSD of one case (boolean masks, any dimension).

    With ``surface=False`` HD95 and ASSD are NaN (not computed).
    """
    a = _as_mask(pred)
    b = _as_mask(true)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: pred {a.shape} vs true {b.shape}")
    inter = int(np.count_nonzero(a & b))
    pa, pb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    total = pa + pb
    union = total - inter
    dice = 2.0 * inter / total if total else 1.0
    iou = inter / union if union else 1.0
    if surface:
        h, s = _surface_pair(a, b, spacing)
    else:
        h = s = float("nan")
    return {"dice": float(dice), "iou": float(iou), "hd95": h, "assd": s}


# --------------------------------------------------------------------------------------------
# Per-case evaluation of a site
# --------------------------------------------------------------------------------------------


def evaluate_cases(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    case_ids: list[str],
    slice_index: list[int],
    structures: Mapping[str, Sequence[int]],
    spacing: Sequence[float] = (1.0, 1.0),
    case_level: Literal["image", "volume"] = "image",
    surface: bool = True,
) -> pd.DataFrame:
    """One row per case and structure: case_id, structure, dice, iou, hd95, assd, surface_failure.

    ``surface_failure`` is True where exactly one of the masks is empty and HD95/ASSD therefore
    hold the declared failure value (:func:`failure_distance`); False otherwise (also with
    ``surface=False``, where HD95/ASSD are NaN).

    ``pred_labels`` / ``true_labels`` are class maps N×H×W (any device). ``case_level="image"``:
    every image is a case, named ``f"{case_id}/{slice_index}"`` when its case id has several
    images, else ``case_id``; ``spacing`` is (row, col) (a 3-tuple's last two entries are used).
    ``case_level="volume"``: the images of one case id are stacked in ``slice_index`` order into a
    D×H×W volume and measured in 3-D; ``spacing`` is (row, col), extended to (1.0, row, col), or a
    full (slice, row, col) 3-tuple. Rows follow the order in which cases first appear, structures
    in dict order. Dice/IoU are vectorised (per-image overlap counts summed per case); only
    HD95/ASSD loop over cases (skipped, NaN, with ``surface=False``).
    """
    pred_t = torch.as_tensor(pred_labels)
    true_t = torch.as_tensor(true_labels, device=pred_t.device)
    if pred_t.shape != true_t.shape or pred_t.ndim != 3:
        raise ValueError(
            f"pred_labels {tuple(pred_t.shape)} and true_labels {tuple(true_t.shape)} "
            "must both be N×H×W"
        )
    n = int(pred_t.shape[0])
    if len(case_ids) != n or len(slice_index) != n:
        raise ValueError(
            f"{n} images but {len(case_ids)} case ids and {len(slice_index)} slice indices"
        )
    if case_level not in ("image", "volume"):
        raise ValueError(f"case_level must be 'image' or 'volume', got {case_level!r}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 entries, got {sp}")

    # Group images into cases: `groups[c]` lists image indices of case c (slice order for volumes).
    per_id: dict[str, list[int]] = {}
    for i, cid in enumerate(case_ids):
        per_id.setdefault(cid, []).append(i)
    if case_level == "image":
        groups = [[i] for i in range(n)]
        names = [
            f"{cid}/{slice_index[i]}" if len(per_id[cid]) > 1 else cid
            for i, cid in enumerate(case_ids)
        ]
        case_spacing: tuple[float, ...] = sp[-2:]
    else:
        groups = [sorted(idx, key=lambda i: slice_index[i]) for idx in per_id.values()]
        names = list(per_id)
        case_spacing = sp if len(sp) == 3 else (1.0, *sp)
    n_cases = len(groups)
    group_of = torch.empty(n, dtype=torch.long)
    for c, idx in enumerate(groups):
        group_of[idx] = c
    group_of = group_of.to(pred_t.device)

    pred_masks = structure_masks(pred_t, structures)
    true_masks = structure_masks(true_t, structures)
    columns: dict[str, list] = {k: [] for k in METRIC_COLUMNS}
    per_structure: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for name in structures:
        pm, tm = pred_masks[name], true_masks[name]
        counts = _overlap_counts(pm, tm)
        if case_level == "volume":
            counts = tuple(
                torch.zeros(n_cases, dtype=torch.int64, device=x.device).index_add_(0, group_of, x)
                for x in counts
            )
        dice, iou = _dice_iou_from_counts(*counts)
        fail = ((counts[1] > 0) != (counts[2] > 0)).cpu().numpy() & surface
        hd = np.full(n_cases, np.nan)
        sd = np.full(n_cases, np.nan)
        if surface:
            pm_np = pm.cpu().numpy()
            tm_np = tm.cpu().numpy()
            for c, idx in enumerate(groups):
                sel = idx[0] if case_level == "image" else idx
                hd[c], sd[c] = _surface_pair(pm_np[sel], tm_np[sel], case_spacing)
        per_structure.append((name, dice.cpu().numpy(), iou.cpu().numpy(), hd, sd, fail))

    for c in range(n_cases):
        for name, dice, iou, hd, sd, fail in per_structure:
            columns["case_id"].append(names[c])
            columns["structure"].append(name)
            columns["dice"].append(float(dice[c]))
            columns["iou"].append(float(iou[c]))
            columns["hd95"].append(float(hd[c]))
            columns["assd"].append(float(sd[c]))
            columns["surface_failure"].append(bool(fail[c]))
    df = pd.DataFrame(columns, columns=list(METRIC_COLUMNS))
    for k in ("dice", "iou", "hd95", "assd"):
        df[k] = df[k].astype(np.float64)
    df["surface_failure"] = df["surface_failure"].astype(bool)
    return df


# --------------------------------------------------------------------------------------------
# Client summaries
# --------------------------------------------------------------------------------------------


def summarize_clients(
    client_scores: pd.Series | Mapping[str, float],
    case_counts: Mapping[str, int] | None = None,
    higher_is_better: bool = True,
) -> dict[str, float]:
    """Headline numbers from one score per client (each the mean over that client's cases).

    Returns client_macro (unweighted mean over clients: the headline), case_weighted (mean
    weighted by ``case_counts``; NaN without them), worst_client (min), best_client (max), spread
    (standard deviation over clients, ddof=0) and n_clients. Clients whose score is NaN (e.g. HD95
    undefined on every case) are left out of all of them, and n_clients counts the clients used.
    For metrics where lower is better (HD95, ASSD) pass ``higher_is_better=False``: worst_client
    is then the max and best_client the min.
    """
    scores = pd.Series(client_scores, dtype=np.float64)
    scores = scores[scores.notna()]
    nan = float("nan")
    if scores.empty:
        return {
            "client_macro": nan,
            "case_weighted": nan,
            "worst_client": nan,
            "best_client": nan,
            "spread": nan,
            "n_clients": 0,
        }
    values = scores.to_numpy()
    if case_counts is not None:
        missing = [c for c in scores.index if c not in case_counts]
        if missing:
            raise KeyError(f"case_counts has no entry for client(s) {missing}")
        w = np.asarray([float(case_counts[c]) for c in scores.index])
        if (w < 0).any():
            raise ValueError("case_counts must be non-negative")
        case_weighted = float((values * w).sum() / w.sum()) if w.sum() > 0 else nan
    else:
        case_weighted = nan
    return {
        "client_macro": float(values.mean()),
        "case_weighted": case_weighted,
        "worst_client": float(values.min() if higher_is_better else values.max()),
        "best_client": float(values.max() if higher_is_better else values.min()),
        "spread": float(values.std(ddof=0)),
        "n_clients": int(len(values)),
    }
