"""Definition checks of pflbench.metrics written against surviving mutants (issue 22).

Every expected value is computed here from the definition in the module docstring: overlap
counted by hand, borders found pixel by pixel, distances from a brute-force distance matrix.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pflbench.metrics import (
    assd,
    case_metrics,
    dice_iou,
    evaluate_cases,
    failure_distance,
    hd95,
    predict_labels,
    summarize_clients,
    surface_distances,
)

# --------------------------------------------------------------------------------------------
# Brute force from the definition
# --------------------------------------------------------------------------------------------


def border_by_hand(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour (connectivity 1) outside it or off the array."""
    out = np.zeros_like(mask, dtype=bool)
    for idx in zip(*np.nonzero(mask), strict=True):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                out[idx] = True
                break
    return out


def pooled_by_hand(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances a→b and b→a from the full distance matrix between the two borders."""
    sp = np.asarray(spacing, float)
    pa = np.argwhere(border_by_hand(a)) * sp
    pb = np.argwhere(border_by_hand(b)) * sp
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return dist.min(axis=1), dist.min(axis=0)


def random_mask(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    m = rng.random(shape) < density
    m.flat[rng.integers(m.size)] = True  # never empty
    return m


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((9, 11), (1.0, 1.0)), ((8, 7), (0.7, 2.5)), ((5, 6, 4), (3.0, 1.0, 0.5)), ((13,), (2.0,))],
)
def test_surface_distances_are_the_brute_force_border_distances(shape, spacing):
    """Random masks (touching the edges too), 1-D to 3-D: pred→true first, then true→pred;
    HD95 = numpy's 95th percentile of the pooled values and ASSD their mean."""
    rng = np.random.default_rng(len(shape) * 7 + int(spacing[0] * 10))
    for _ in range(4):
        a = random_mask(rng, shape, 0.35)
        b = random_mask(rng, shape, 0.25)
        a_to_b, b_to_a = pooled_by_hand(a, b, spacing)
        d = surface_distances(a, b, spacing)
        assert d.dtype == np.float64
        np.testing.assert_allclose(np.sort(d[: a_to_b.size]), np.sort(a_to_b), atol=1e-12)
        np.testing.assert_allclose(np.sort(d[a_to_b.size :]), np.sort(b_to_a), atol=1e-12)
        pooled = np.concatenate([a_to_b, b_to_a])
        assert hd95(a, b, spacing) == pytest.approx(np.percentile(pooled, 95), abs=1e-12)
        assert assd(a, b, spacing) == pytest.approx(pooled.mean(), abs=1e-12)
        m = case_metrics(a, b, spacing)
        assert m["hd95"] == pytest.approx(np.percentile(pooled, 95), abs=1e-12)
        assert m["assd"] == pytest.approx(pooled.mean(), abs=1e-12)


def test_surface_distances_put_pred_to_true_first():
    """A 1-pixel prediction inside a 5×5 truth: pred→true is one value (distance 2 from the
    centre to the ring), true→pred the 16 ring pixels' distances to the centre."""
    t = np.zeros((7, 7), bool)
    t[1:6, 1:6] = True
    p = np.zeros((7, 7), bool)
    p[3, 3] = True
    d = surface_distances(p, t)
    assert d.size == 1 + 16
    assert d[0] == 2.0
    ring = [math.hypot(r - 3, c - 3) for r in range(1, 6) for c in range(1, 6)]
    ring = [x for x in ring if x >= 2.0]  # the ring: max(|dr|, |dc|) == 2
    assert sorted(d[1:].tolist()) == pytest.approx(sorted(ring))


def test_surface_distances_refuse_bad_input_by_name():
    a = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"shape mismatch: pred \(3, 3\) vs true \(3, 4\)"):
        surface_distances(a, np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="^surface distances need two non-empty masks$"):
        surface_distances(a, np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="^surface distances need two non-empty masks$"):
        surface_distances(np.zeros((3, 3), bool), a)
    with pytest.raises(ValueError, match=r"shape mismatch: pred \(3, 3\) vs true \(2, 3\)"):
        case_metrics(a, np.ones((2, 3), bool))


# --------------------------------------------------------------------------------------------
# Spacing
# --------------------------------------------------------------------------------------------


def test_one_spacing_value_applies_to_every_axis():
    """A scalar (or 1-entry) spacing s means (s, s): every distance scales by s."""
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True
    b[3:5, 2:5] = True
    a_to_b, b_to_a = pooled_by_hand(a, b, (2.5, 2.5))
    pooled = np.concatenate([a_to_b, b_to_a])
    for sp in (2.5, [2.5], (2.5,)):
        assert assd(a, b, sp) == pytest.approx(pooled.mean())
        assert hd95(a, b, sp) == pytest.approx(np.percentile(pooled, 95))
    assert failure_distance((3, 4), 2.0) == pytest.approx(math.hypot(6, 8))


@pytest.mark.parametrize("bad", [(0.0, 1.0), (1.0, -2.0), (math.inf, 1.0), (1.0, math.nan)])
def test_spacing_must_be_positive_and_finite(bad):
    a = np.zeros((4, 4), bool)
    a[1, 1] = True
    with pytest.raises(ValueError, match="spacing must be positive and finite"):
        hd95(a, a, bad)
    with pytest.raises(ValueError, match="spacing must be positive and finite"):
        failure_distance((4, 4), bad)


def test_wrong_spacing_length_is_refused_by_name_even_for_empty_masks():
    a = np.zeros((4, 4), bool)
    a[1, 1] = True
    with pytest.raises(ValueError, match=r"has 3 entries for a 2-D mask"):
        hd95(a, a, (1.0, 1.0, 1.0))
    z = np.zeros((4, 4), bool)
    # both empty: the result is the convention's 0, but a bad spacing is still an error
    with pytest.raises(ValueError, match=r"has 3 entries for a 2-D mask"):
        hd95(z, z, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be positive"):
        assd(z, z, (1.0, 0.0))
    with pytest.raises(ValueError, match=r"has 3 entries for a 2-D mask"):
        hd95(a, z, (1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Dice / IoU from overlap counts
# --------------------------------------------------------------------------------------------


def test_iou_of_one_shared_pixel_is_one():
    """|P∩T| = |P∪T| = 1 → IoU 1 and Dice 2·1/2 = 1 (a union of one pixel is not clamped)."""
    p = torch.zeros(2, 3, 3, dtype=torch.bool)
    t = torch.zeros(2, 3, 3, dtype=torch.bool)
    p[0, 1, 1] = t[0, 1, 1] = True
    p[1, 0, 0] = True  # item 1: one pixel in P only → 0, 0
    dice, iou = dice_iou(p, t)
    assert dice.tolist() == [1.0, 0.0] and iou.tolist() == [1.0, 0.0]


def test_dice_iou_count_any_non_zero_label_as_foreground():
    """Integer masks: every non-zero value is inside (here the class id 2), as for bool masks."""
    p = torch.tensor([[[0, 2, 1], [0, 0, 2]]])
    t = torch.tensor([[[2, 2, 0], [0, 0, 1]]])
    # P = {(0,1), (0,2), (1,2)}, T = {(0,0), (0,1), (1,2)}: |P∩T| = 2, |P| = |T| = 3
    # (reading "inside" as "== 1" would give other counts: not the definition)
    dice, iou = dice_iou(p, t)
    assert dice.item() == pytest.approx(2 * 2 / 6) and iou.item() == pytest.approx(2 / 4)
    dice_b, iou_b = dice_iou(p != 0, t != 0)
    assert (dice.item(), iou.item()) == (dice_b.item(), iou_b.item())
    # numpy input: converted, same answer
    dice_n, _ = dice_iou(p.numpy(), t.numpy())
    assert dice_n.item() == pytest.approx(2 / 3)


def test_dice_iou_of_a_single_unbatched_pixel():
    """0-d input is one item: P = T = {pixel} → 1; P only → 0."""
    one, zero = torch.tensor(True), torch.tensor(False)
    dice, iou = dice_iou(one, one)
    assert dice.tolist() == [1.0] and iou.tolist() == [1.0]
    dice, iou = dice_iou(one, zero)
    assert dice.tolist() == [0.0] and iou.tolist() == [0.0]


def test_dice_iou_refuse_a_shape_mismatch_by_name():
    with pytest.raises(ValueError, match=r"shape mismatch: pred \(1, 2, 2\) vs true \(1, 2, 3\)"):
        dice_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Binarisation
# --------------------------------------------------------------------------------------------


def test_predict_labels_shapes_and_refusal():
    """N×K logits without spatial axes are valid (N labels); fewer than 2 axes are refused."""
    out = predict_labels(torch.tensor([[0.5], [-0.5], [0.0]]))
    assert out.tolist() == [1, 0, 0]
    out = predict_labels(torch.tensor([[0.1, 0.9, 0.0], [2.0, -1.0, 3.0]]))
    assert out.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"logits must be N×K×..., got shape \(3,\)"):
        predict_labels(torch.zeros(3))


def test_predict_labels_two_classes_take_the_argmax_not_a_threshold():
    """K = 2 is a two-class softmax: class 1 where logit_1 > logit_0, whatever logit_0's sign."""
    logits = torch.tensor([[[[0.5, 3.0]], [[2.0, 1.0]]]])  # 1×2×1×2
    assert predict_labels(logits).tolist() == [[[1, 0]]]


# --------------------------------------------------------------------------------------------
# evaluate_cases
# --------------------------------------------------------------------------------------------


def _two_images():
    true = torch.zeros(2, 5, 5, dtype=torch.int64)
    true[:, 1:4, 1:4] = 1
    pred = true.clone()
    pred[1] = 0  # image 1: empty prediction
    return pred, true


def test_evaluate_cases_refuses_bad_input_by_name():
    pred, true = _two_images()
    s = {"fg": [1]}
    with pytest.raises(ValueError, match=r"pred_labels \(2, 5, 5\) and true_labels \(1, 5, 5\)"):
        evaluate_cases(pred, true[:1], ["a", "b"], [0, 0], s)
    with pytest.raises(ValueError, match="must both be N×H×W$"):
        evaluate_cases(pred[0], true[0], ["a"], [0], s)
    with pytest.raises(ValueError, match="2 images but 1 case ids and 2 slice indices"):
        evaluate_cases(pred, true, ["a"], [0, 0], s)
    with pytest.raises(ValueError, match="2 images but 2 case ids and 3 slice indices"):
        evaluate_cases(pred, true, ["a", "b"], [0, 0, 0], s)
    with pytest.raises(ValueError, match="case_level must be 'image' or 'volume', got 'slice'"):
        evaluate_cases(pred, true, ["a", "b"], [0, 0], s, case_level="slice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"spacing must have 2 or 3 entries, got \(1.0,\)"):
        evaluate_cases(pred, true, ["a", "b"], [0, 0], s, spacing=(1.0,))
    with pytest.raises(ValueError, match="spacing must have 2 or 3 entries"):
        evaluate_cases(pred, true, ["a", "b"], [0, 0], s, spacing=(1.0, 1.0, 1.0, 1.0))


def test_evaluate_cases_flags_surface_failures_only_when_surfaces_are_computed():
    """Image 1 has an empty prediction: flagged (HD95 = ASSD = the 5×5 diagonal) with surfaces,
    not flagged (NaN distances) without; image 0 is perfect (0 and 0, not flagged)."""
    pred, true = _two_images()
    df = evaluate_cases(pred, true, ["a", "b"], [0, 0], {"fg": [1]})
    assert df["surface_failure"].tolist() == [False, True]
    assert df["hd95"].tolist() == [0.0, pytest.approx(5 * math.sqrt(2))]
    assert df["surface_failure"].dtype == bool and df["dice"].dtype == np.float64
    off = evaluate_cases(pred, true, ["a", "b"], [0, 0], {"fg": [1]}, surface=False)
    assert off["surface_failure"].tolist() == [False, False]
    assert off["dice"].tolist() == [1.0, 0.0] and off["hd95"].isna().all()
    vol = evaluate_cases(pred, true, ["v", "v"], [0, 1], {"fg": [1]}, case_level="volume")
    # the volume (2 slices): one predicted slice of 9 px vs 18 px → not a failure, Dice 2·9/27
    assert vol["surface_failure"].tolist() == [False]
    assert vol["dice"].iloc[0] == pytest.approx(18 / 27)
    vol_empty = evaluate_cases(
        torch.zeros_like(pred), true, ["v", "v"], [0, 1], {"fg": [1]}, case_level="volume"
    )
    assert vol_empty["surface_failure"].tolist() == [True]
    # failure value of the 2×5×5 volume at spacing (1, 1, 1)
    assert vol_empty["hd95"].iloc[0] == pytest.approx(math.sqrt(4 + 25 + 25))


def test_evaluate_cases_image_level_uses_the_last_two_entries_of_a_3_tuple():
    """At image level the slice spacing is irrelevant: (9, 1, 3) measures like (1, 3)."""
    a = np.zeros((6, 8), np.int64)
    b = np.zeros((6, 8), np.int64)
    a[1:4, 1:3] = 1
    b[2:5, 3:6] = 1
    pred, true = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    a_to_b, b_to_a = pooled_by_hand(a == 1, b == 1, (1.0, 3.0))
    pooled = np.concatenate([a_to_b, b_to_a])
    df = evaluate_cases(pred, true, ["c"], [0], {"fg": [1]}, spacing=(9.0, 1.0, 3.0))
    assert df["assd"].iloc[0] == pytest.approx(pooled.mean())
    assert df["hd95"].iloc[0] == pytest.approx(np.percentile(pooled, 95))


def test_evaluate_cases_volume_rows_per_case_and_structure_in_first_appearance_order():
    """Two volumes given interleaved ("q" first), two structures: rows q/s1, q/s2, p/s1, p/s2;
    Dice per volume from the summed per-slice counts."""
    true = torch.zeros(4, 3, 3, dtype=torch.int64)
    pred = torch.zeros(4, 3, 3, dtype=torch.int64)
    true[:, 0, :] = 1  # 3 px of class 1 per image
    true[:, 2, 0] = 2  # 1 px of class 2 per image
    pred[:, 0, :2] = 1  # 2 of the 3 class-1 px per image
    pred[0, 2, 0] = 2  # class 2 found in image 0 only (case q)
    ids = ["q", "p", "q", "p"]
    df = evaluate_cases(
        pred, true, ids, [1, 0, 0, 1], {"s1": [1], "s2": [2]}, case_level="volume", surface=False
    )
    assert df["case_id"].tolist() == ["q", "q", "p", "p"]
    assert df["structure"].tolist() == ["s1", "s2", "s1", "s2"]
    # s1 per volume: |P∩T| = 4, |P| = 4, |T| = 6 → 0.8; s2: q: 2·1/(1+2) = 2/3, p: 0/(0+2) = 0
    assert df["dice"].tolist() == pytest.approx([0.8, 2 / 3, 0.8, 0.0])
    assert df["iou"].tolist() == pytest.approx([4 / 6, 1 / 2, 4 / 6, 0.0])


# --------------------------------------------------------------------------------------------
# summarize_clients
# --------------------------------------------------------------------------------------------


def test_summarize_clients_drops_nan_clients_from_every_number():
    scores = {"a": 0.2, "b": float("nan"), "c": 0.6}
    out = summarize_clients(scores, {"a": 1, "b": 100, "c": 3}, higher_is_better=True)
    assert out == {
        "client_macro": pytest.approx(0.4),
        "case_weighted": pytest.approx((0.2 * 1 + 0.6 * 3) / 4),
        "worst_client": 0.2,
        "best_client": 0.6,
        "spread": pytest.approx(0.2),
        "n_clients": 2,
    }
    # a client without a count is fine when its score is NaN (it is left out anyway)
    assert summarize_clients(scores, {"a": 1, "c": 1})["case_weighted"] == pytest.approx(0.4)


def test_summarize_clients_without_any_score_is_all_nan():
    for scores in ({}, {"a": float("nan")}, pd.Series([np.nan, np.nan], index=["x", "y"])):
        out = summarize_clients(scores, {"a": 1, "x": 1, "y": 1})
        assert set(out) == {
            "client_macro", "case_weighted", "worst_client", "best_client", "spread", "n_clients"
        }  # fmt: skip
        assert out["n_clients"] == 0
        assert all(math.isnan(out[k]) for k in out if k != "n_clients")


def test_summarize_clients_case_counts_checks():
    scores = {"a": 0.5, "b": 0.7}
    with pytest.raises(KeyError, match=r"case_counts has no entry for client\(s\) \['b'\]"):
        summarize_clients(scores, {"a": 2})
    with pytest.raises(ValueError, match="^case_counts must be non-negative$"):
        summarize_clients(scores, {"a": 2, "b": -1})
    # zero counts are allowed; all zero leaves the weighted mean undefined
    assert summarize_clients(scores, {"a": 0, "b": 3})["case_weighted"] == pytest.approx(0.7)
    assert summarize_clients(scores, {"a": 0, "b": 1})["case_weighted"] == pytest.approx(0.7)
    assert math.isnan(summarize_clients(scores, {"a": 0, "b": 0})["case_weighted"])
    low = summarize_clients({"a": 3.0, "b": 1.0, "c": 2.0}, higher_is_better=False)
    assert (low["worst_client"], low["best_client"]) == (3.0, 1.0)


def test_surface_metrics_accept_torch_masks():
    """Tensors are read as the same masks as numpy arrays (not as one empty voxel)."""
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[1:4, 1:3] = True
    b[2:5, 2:5] = True
    a_to_b, b_to_a = pooled_by_hand(a, b, (1.0, 1.0))
    pooled = np.concatenate([a_to_b, b_to_a])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert hd95(ta, tb) == pytest.approx(np.percentile(pooled, 95))
    assert assd(ta, tb) == pytest.approx(pooled.mean())
    m = case_metrics(ta, tb)
    # |A| = 6, |B| = 9, A∩B = rows 2..3 × col 2 = 2 pixels
    assert m["dice"] == pytest.approx(4 / 15) and m["iou"] == pytest.approx(2 / 13)
    np.testing.assert_array_equal(surface_distances(ta, tb), surface_distances(a, b))


def test_evaluate_cases_names_and_flags_single_pixel_cases():
    """Two images of one case id are named "id/slice"; a one-pixel mask against an empty one
    is a surface failure whichever side is empty; both empty is not."""
    pred = torch.zeros(3, 4, 4, dtype=torch.int64)
    true = torch.zeros(3, 4, 4, dtype=torch.int64)
    pred[0, 1, 1] = 1  # image 0: pred one pixel, true empty
    true[1, 2, 2] = 1  # image 1: pred empty, true one pixel
    df = evaluate_cases(pred, true, ["v", "v", "w"], [3, 7, 0], {"fg": [1]})
    assert df["case_id"].tolist() == ["v/3", "v/7", "w"]
    assert df["surface_failure"].tolist() == [True, True, False]
    assert df["dice"].tolist() == [0.0, 0.0, 1.0]
    assert df["hd95"].tolist() == [pytest.approx(4 * math.sqrt(2))] * 2 + [0.0]
