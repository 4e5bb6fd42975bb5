"""Tests of pflbench.metrics: hand-computed answers, empty conventions, case levels, properties."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pflbench.metrics import (
    assd,
    case_metrics,
    dice_iou,
    evaluate_cases,
    failure_distance,
    hd95,
    predict_labels,
    structure_masks,
    summarize_clients,
    surface_distances,
)

# --------------------------------------------------------------------------------------------
# Hand-computed known answers
# --------------------------------------------------------------------------------------------


def two_squares() -> tuple[np.ndarray, np.ndarray]:
    """A = rows 10..19 × cols 10..19, B = the same square shifted right by k = 2 columns.

    Borders (mask minus 4-connected erosion) are the 36-pixel outer rings.
    Directed distances A→B, per A border pixel (unit spacing):
      top row r=10:    c=12..19 lie on B's top row → 0 (8×); c=10 → 2, c=11 → 1
      bottom row r=19: same as top → 8×0, 2, 1
      left col c=10, r=11..18: nearest is B's left col c=12 → 8×2
      right col c=19, r=11..18: min(2 [B's right col c=21], r-10 [B top row], 19-r [B bottom
        row]) → r=11,18: 1; r=12..17: 2 → 2×1, 6×2
    So A→B = 16×0, 4×1, 16×2 (36 values), and B→A is the mirror image (same multiset).
    Pooled (72 values): 32×0, 8×1, 32×2 → sum 72 → ASSD = 1.0.
    HD95 = numpy percentile at position 0.95·71 = 67.45 → indices 67, 68, both in the 2s
    (indices 40..71) → HD95 = 2.0.
    Dice: |A∩B| = 10×8 = 80, |A|+|B| = 200 → 0.8; IoU = 80 / 120 = 2/3.
    """
    a = np.zeros((30, 30), bool)
    b = np.zeros((30, 30), bool)
    a[10:20, 10:20] = True
    b[10:20, 12:22] = True
    return a, b


def test_two_squares_known_answers():
    a, b = two_squares()
    d = surface_distances(a, b, (1.0, 1.0))
    assert sorted(d.tolist()) == [0.0] * 32 + [1.0] * 8 + [2.0] * 32
    assert hd95(a, b) == pytest.approx(2.0)
    assert assd(a, b) == pytest.approx(1.0)
    m = case_metrics(a, b)
    assert m["dice"] == pytest.approx(0.8, abs=1e-15)
    assert m["iou"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["assd"] == pytest.approx(1.0)
    dice, iou = dice_iou(torch.from_numpy(a)[None], torch.from_numpy(b)[None])
    assert dice.dtype == torch.float64 and iou.dtype == torch.float64
    assert dice.item() == pytest.approx(0.8, abs=1e-15)
    assert iou.item() == pytest.approx(2 / 3, abs=1e-15)


def test_hd95_is_pooled_not_max_of_directed():
    """Pooled HD95 differs from MONAI-style max of directed percentiles on the same masks.

    A = 10×10 square, B = A plus a 1-pixel-wide spur 10 pixels long. B→A has few large distances
    (only the spur), which the pooled 95th percentile dilutes but the directed one does not fully.
    """
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b = a.copy()
    b[14, 20:30] = True
    d = surface_distances(a, b)
    n_a = int((a & ~ndimage.binary_erosion(a, ndimage.generate_binary_structure(2, 1))).sum())
    a_to_b, b_to_a = d[:n_a], d[n_a:]
    pooled = float(np.percentile(d, 95))
    monai_like = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    assert hd95(a, b) == pytest.approx(pooled)
    assert monai_like > pooled


def test_spacing_scales_distances():
    a, b = two_squares()
    # Isotropic spacing 0.5 halves every distance.
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(1.0)
    assert assd(a, b, (0.5, 0.5)) == pytest.approx(0.5)
    # Anisotropic (row 1, col 3): the shift is along columns, so column steps cost 3.
    # A→B: top/bottom c=10 → 6, c=11 → 3 (2× each); left col → 8×6;
    #      right col r=11..18 → min(6, r-10, 19-r) = 1,2,3,4,4,3,2,1 (sum 20); 16 zeros.
    # A→B sum = 2·(6+3) + 48 + 20 = 86; B→A is the mirror image → pooled sum 172 over 72 values.
    # ASSD = 172/72 = 43/18. Pooled sorted: 32×0, 4×1, 4×2, 8×3, 4×4, 20×6 → index 67.45 lies in
    # the 6s (indices 52..71) → HD95 = 6.
    assert hd95(a, b, (1.0, 3.0)) == pytest.approx(6.0)
    assert assd(a, b, (1.0, 3.0)) == pytest.approx(43 / 18)
    # Dice/IoU do not depend on spacing.
    assert case_metrics(a, b, (1.0, 3.0))["dice"] == pytest.approx(0.8)


def test_3d_cubes_known_answers():
    """A = 3×3×3 cube, B = A shifted by one along axis 0 (the slice axis).

    Border = every voxel but the cube's centre (26 voxels). A→B, unit spacing:
      A's z=0 layer (9 voxels): nearest B border is B's bottom face one slice up → 9×1
      A's z=1 ring (8 voxels): lies in B's bottom face → 0
      A's z=2 layer: the 8 ring voxels are on B's border → 0; the centre is B's centre (not a
        border voxel) → 1 (a neighbour in any direction)
    A→B = 10×1, 16×0; B→A by symmetry the same. Pooled 52 values: 32×0, 20×1.
    ASSD = 20/52 = 5/13; HD95 at position 0.95·51 = 48.45 → in the 1s → 1.0.
    Dice = 2·18/54 = 2/3 (overlap 2 layers of 9), IoU = 18/36 = 1/2.
    Spacing (2, 1, 1): the 9 slice-direction distances become 2, the centre keeps an in-plane
    neighbour at 1 → A→B = 9×2, 1×1 → pooled sum 38 → ASSD = 38/52 = 19/26; HD95 = 2.
    """
    a = np.zeros((7, 6, 6), bool)
    b = np.zeros((7, 6, 6), bool)
    a[1:4, 1:4, 1:4] = True
    b[2:5, 1:4, 1:4] = True
    m = case_metrics(a, b)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(1 / 2)
    assert m["hd95"] == pytest.approx(1.0)
    assert m["assd"] == pytest.approx(5 / 13)
    m = case_metrics(a, b, spacing=(2.0, 1.0, 1.0))
    assert m["hd95"] == pytest.approx(2.0)
    assert m["assd"] == pytest.approx(19 / 26)


def test_mask_touching_array_edge_has_border_there():
    # A fills the first 3 columns (touches the top, bottom and left array edges).
    a = np.zeros((5, 8), bool)
    a[:, :3] = True
    assert hd95(a, a) == 0.0 and assd(a, a) == 0.0
    # Outside the array counts as background, so only the 3 pixels (rows 1..3, col 1) are
    # interior and the border has 12 pixels. B = A shifted right by one column (also 12).
    # A→B: col 0 (5 px) → 1 (B's left column); col 1 rows 0, 4 → 0 (B's top/bottom row);
    # col 2 rows 0, 4 → 0; col 2 rows 1..3 (B's interior) → 1 (B's col 1). So 8×1, 4×0.
    b = np.zeros((5, 8), bool)
    b[:, 1:4] = True
    d = surface_distances(a, b)
    assert sorted(d[:12].tolist()) == [0.0] * 4 + [1.0] * 8
    assert d.size == 24
    assert assd(a, b) == pytest.approx(16 / 24)


def test_border_uses_connectivity_1():
    """A plus sign (3×3 block without corners): under 4-connected erosion its centre survives
    (all 4 neighbours are in the mask), so the border is the 4 arm pixels; an 8-connected erosion
    would also remove the centre (5 border pixels). In 3-D a 3×3×3 "ball" (the 7-voxel cross)
    keeps its centre under 6-connectivity.
    B = A shifted down one row. Relative to A's centre (0,0): A's border is (-1,0), (0,-1),
    (0,1), (1,0); B's border is (0,0), (1,-1), (1,1), (2,0) (its centre (1,0) is interior).
    Each A border pixel has a B border pixel one step away ((-1,0)→(0,0), (0,±1)→(1,±1),
    (1,0)→(0,0)), and symmetrically, so all 8 pooled distances are 1.
    """
    a = np.zeros((9, 9), bool)
    a[3:6, 4] = True
    a[4, 3:6] = True
    d = surface_distances(a, a)
    assert d.size == 8 and (d == 0).all()
    b = np.roll(a, 1, axis=0)
    d = surface_distances(a, b)
    assert d.size == 8 and d.tolist() == [1.0] * 8
    c = np.zeros((5, 5, 5), bool)
    c[1:4, 2, 2] = c[2, 1:4, 2] = c[2, 2, 1:4] = True
    assert surface_distances(c, c).size == 2 * 6


def test_spacing_length_checked():
    a, b = two_squares()
    with pytest.raises(ValueError):
        hd95(a, b, (1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Empty conventions
# --------------------------------------------------------------------------------------------


def test_both_empty():
    z = np.zeros((8, 8), bool)
    assert case_metrics(z, z) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0}
    dice, iou = dice_iou(
        torch.zeros(3, 8, 8, dtype=torch.bool), torch.zeros(3, 8, 8, dtype=torch.bool)
    )
    assert dice.tolist() == [1.0, 1.0, 1.0] and iou.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("which", ["pred", "true"])
def test_exactly_one_empty(which):
    z = np.zeros((8, 8), bool)
    m = np.zeros((8, 8), bool)
    m[2:5, 2:5] = True
    p, t = (z, m) if which == "pred" else (m, z)
    out = case_metrics(p, t)
    assert out["dice"] == 0.0 and out["iou"] == 0.0
    # the declared failure value: the 8×8 image's diagonal, in spacing units
    assert out["hd95"] == out["assd"] == pytest.approx(8 * math.sqrt(2))
    assert hd95(p, t, (0.5, 2.0)) == assd(p, t, (0.5, 2.0)) == pytest.approx(math.hypot(4, 16))
    dice, iou = dice_iou(torch.from_numpy(p)[None], torch.from_numpy(t)[None])
    assert dice.item() == 0.0 and iou.item() == 0.0
    with pytest.raises(ValueError):
        surface_distances(p, t, (1.0, 1.0))


def test_failure_distance_known_answers():
    # BraTS: 240×240×155 voxels of 1 mm → the 373.13 mm its evaluation gives an empty prediction
    assert failure_distance((155, 240, 240), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.005)
    assert failure_distance((32, 32)) == pytest.approx(45.2548, abs=1e-4)
    assert failure_distance((3, 4), (2.0, 1.5)) == pytest.approx(math.hypot(6, 6))
    with pytest.raises(ValueError, match="spacing"):
        failure_distance((3, 4), (1.0, 1.0, 1.0))


def test_failure_value_is_worse_than_any_real_distance():
    """No prediction can score worse than predicting nothing: every real HD95 is below it."""
    rng = np.random.default_rng(0)
    worst = failure_distance((16, 16))
    for _ in range(50):
        a, b = rng.random((16, 16)) < 0.05, rng.random((16, 16)) < 0.05
        if a.any() and b.any():
            assert hd95(a, b) < worst and assd(a, b) < worst


def test_surface_false_gives_nan():
    a, b = two_squares()
    m = case_metrics(a, b, surface=False)
    assert m["dice"] == pytest.approx(0.8)
    assert math.isnan(m["hd95"]) and math.isnan(m["assd"])


# --------------------------------------------------------------------------------------------
# Binarisation and structures
# --------------------------------------------------------------------------------------------


def test_predict_labels_binary():
    logits = torch.tensor([[-3.0, -1e-6], [0.0, 1e-6], [2.0, 5.0]]).reshape(1, 1, 3, 2)
    out = predict_labels(logits)
    assert out.dtype == torch.int64 and out.shape == (1, 3, 2)
    # sigmoid(0) = 0.5 is not > 0.5 → background.
    assert out[0].tolist() == [[0, 0], [0, 1], [1, 1]]


def test_predict_labels_multiclass():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 2, 0, 0] = 1.0
    logits[0, 1, 1, 1] = 5.0
    logits[1, 0] = -1.0  # class 0 worst; classes 1 and 2 tie → argmax picks the first (1)
    logits[1, 2, 0, 1] = 0.5
    out = predict_labels(logits)
    assert out.dtype == torch.int64 and out.shape == (2, 2, 2)
    assert out[0].tolist() == [[2, 0], [0, 1]]
    assert out[1].tolist() == [[1, 2], [1, 1]]


def test_structure_masks_nested_torch_and_numpy():
    labels = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    structures = {"disc": [1, 2], "cup": [2]}
    m = structure_masks(labels, structures)
    assert m["disc"].dtype == torch.bool
    assert m["disc"].tolist() == [[[False, True, True], [True, True, False]]]
    assert m["cup"].tolist() == [[[False, False, True], [True, False, False]]]
    mn = structure_masks(labels.numpy(), structures)
    assert isinstance(mn["disc"], np.ndarray) and mn["disc"].dtype == bool
    np.testing.assert_array_equal(mn["disc"], m["disc"].numpy())
    np.testing.assert_array_equal(mn["cup"], m["cup"].numpy())


# --------------------------------------------------------------------------------------------
# evaluate_cases
# --------------------------------------------------------------------------------------------


def _volume_example():
    """Case "a": 3 slices given out of order (slice_index 2, 0, 1); case "b": one image.

    Structure "fg" = class 1. Per slice of "a" (4×4 images, true = 2×2 block at rows/cols 1..2):
      slice 0: pred == true → Dice 1
      slice 1: pred empty   → Dice 0
      slice 2: pred = true's top row only (2 px) → Dice 2·2/(2+4) = 2/3
    Mean slice Dice = 5/9, but volume Dice = 2·(4+0+2)/((4+0+2)+(4+4+4)) = 12/18 = 2/3.
    """
    true = torch.zeros(4, 4, 4, dtype=torch.int64)
    pred = torch.zeros(4, 4, 4, dtype=torch.int64)
    true[:3, 1:3, 1:3] = 1
    # image order: idx0 = slice 2, idx1 = slice 0, idx2 = slice 1
    pred[1, 1:3, 1:3] = 1  # slice 0 perfect
    pred[0, 1, 1:3] = 1  # slice 2 half
    # case b: perfect
    true[3, 0:2, 0:2] = 1
    pred[3, 0:2, 0:2] = 1
    case_ids = ["a", "a", "a", "b"]
    slice_index = [2, 0, 1, 0]
    return pred, true, case_ids, slice_index


def test_evaluate_cases_image_level():
    pred, true, case_ids, slice_index = _volume_example()
    df = evaluate_cases(pred, true, case_ids, slice_index, {"fg": [1]}, case_level="image")
    assert list(df.columns) == [
        "case_id", "structure", "dice", "iou", "hd95", "assd", "surface_failure"
    ]  # fmt: skip
    assert df["case_id"].tolist() == ["a/2", "a/0", "a/1", "b"]
    assert df["surface_failure"].tolist() == [False, False, True, False]
    assert df["structure"].tolist() == ["fg"] * 4
    np.testing.assert_allclose(df["dice"], [2 / 3, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(df["iou"], [0.5, 1.0, 0.0, 1.0])
    assert df["hd95"].iloc[2] == df["assd"].iloc[2] == pytest.approx(4 * math.sqrt(2))  # 4×4
    assert df["hd95"].iloc[1] == 0.0
    # slice 2: pred top row vs 2×2 true → each row-2 border pixel of true is 1 away.
    assert df["hd95"].iloc[0] == pytest.approx(hd95(pred[0].numpy() == 1, true[0].numpy() == 1))
    assert df.loc[df.case_id.str.startswith("a/"), "dice"].mean() == pytest.approx(5 / 9)


def test_evaluate_cases_volume_level_differs_from_image_mean():
    pred, true, case_ids, slice_index = _volume_example()
    df = evaluate_cases(pred, true, case_ids, slice_index, {"fg": [1]}, case_level="volume")
    assert df["case_id"].tolist() == ["a", "b"]
    assert df["dice"].tolist() == pytest.approx([2 / 3, 1.0])
    assert df["iou"].iloc[0] == pytest.approx(6 / 12)
    assert df["dice"].iloc[0] != pytest.approx(5 / 9)
    # Surface metrics on the volume stacked in slice_index order (idx 1, 2, 0), spacing (1, 1, 1).
    order = [1, 2, 0]
    p3 = pred[order].numpy() == 1
    t3 = true[order].numpy() == 1
    exp = case_metrics(p3, t3, (1.0, 1.0, 1.0))
    assert df["hd95"].iloc[0] == pytest.approx(exp["hd95"])
    assert df["assd"].iloc[0] == pytest.approx(exp["assd"])
    # Slice spacing: a 2-tuple is extended with 1.0 for the slice axis; a 3-tuple is used as is.
    df2 = evaluate_cases(
        pred, true, case_ids, slice_index, {"fg": [1]}, spacing=(1.0, 1.0), case_level="volume"
    )
    assert df2["assd"].iloc[0] == pytest.approx(exp["assd"])
    df3 = evaluate_cases(
        pred, true, case_ids, slice_index, {"fg": [1]}, spacing=(5.0, 1.0, 1.0), case_level="volume"
    )
    assert df3["assd"].iloc[0] == pytest.approx(case_metrics(p3, t3, (5.0, 1.0, 1.0))["assd"])
    assert df3["assd"].iloc[0] != pytest.approx(exp["assd"])


def test_evaluate_cases_volume_stacks_in_slice_order():
    """The 3-D cubes of test_3d_cubes_known_answers, with the 7 slices given shuffled.

    Stacked in slice_index order the volume is the hand-computed one: Dice 2/3, HD95 1,
    ASSD 5/13 (default spacing (1, 1) extended to (1, 1, 1)); the 3-tuple (2, 1, 1) puts 2 on
    the slice axis → HD95 2, ASSD 19/26.
    """
    a = np.zeros((7, 6, 6), np.int64)
    b = np.zeros((7, 6, 6), np.int64)
    a[1:4, 1:4, 1:4] = 1
    b[2:5, 1:4, 1:4] = 1
    perm = [4, 0, 6, 2, 5, 1, 3]  # image i holds slice perm[i]
    pred = torch.from_numpy(a[perm])
    true = torch.from_numpy(b[perm])
    ids = ["v"] * 7
    df = evaluate_cases(pred, true, ids, perm, {"fg": [1]}, case_level="volume")
    assert df["case_id"].tolist() == ["v"]
    assert df["dice"].iloc[0] == pytest.approx(2 / 3)
    assert df["hd95"].iloc[0] == pytest.approx(1.0)
    assert df["assd"].iloc[0] == pytest.approx(5 / 13)
    # Stacked in input order the volume is different (same Dice, other distances).
    wrong = case_metrics(a[perm] == 1, b[perm] == 1)
    assert wrong["assd"] != pytest.approx(5 / 13)
    df3 = evaluate_cases(
        pred, true, ids, perm, {"fg": [1]}, spacing=(2.0, 1.0, 1.0), case_level="volume"
    )
    assert df3["hd95"].iloc[0] == pytest.approx(2.0)
    assert df3["assd"].iloc[0] == pytest.approx(19 / 26)


def test_evaluate_cases_nested_structures_and_surface_flag():
    true = torch.zeros(2, 6, 6, dtype=torch.int64)
    true[:, 1:5, 1:5] = 1
    true[:, 2:4, 2:4] = 2
    pred = true.clone()
    pred[1, 2:4, 2:4] = 1  # image 1: cup missed, disc still right
    df = evaluate_cases(pred, true, ["x", "y"], [0, 0], {"disc": [1, 2], "cup": [2]}, surface=False)
    assert df["case_id"].tolist() == ["x", "x", "y", "y"]
    assert df["structure"].tolist() == ["disc", "cup", "disc", "cup"]
    assert df["dice"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert df["hd95"].isna().all() and df["assd"].isna().all()


def test_evaluate_cases_spacing_image_level():
    a, b = two_squares()
    pred = torch.from_numpy(a.astype(np.int64))[None]
    true = torch.from_numpy(b.astype(np.int64))[None]
    df = evaluate_cases(pred, true, ["c"], [0], {"fg": [1]}, spacing=(1.0, 3.0))
    assert df["hd95"].iloc[0] == pytest.approx(6.0)
    assert df["assd"].iloc[0] == pytest.approx(43 / 18)


# --------------------------------------------------------------------------------------------
# summarize_clients
# --------------------------------------------------------------------------------------------


def test_summarize_clients():
    scores = {"s1": 0.9, "s2": 0.6, "s3": 0.75}
    out = summarize_clients(scores, {"s1": 10, "s2": 30, "s3": 60})
    assert out["client_macro"] == pytest.approx(0.75)
    assert out["case_weighted"] == pytest.approx((9 + 18 + 45) / 100)
    assert out["worst_client"] == 0.6 and out["best_client"] == 0.9
    assert out["spread"] == pytest.approx(np.std([0.9, 0.6, 0.75]))
    assert out["spread"] == pytest.approx(math.sqrt(0.045 / 3))  # ddof = 0
    assert out["n_clients"] == 3
    s = summarize_clients(pd.Series(scores))
    assert math.isnan(s["case_weighted"]) and s["client_macro"] == pytest.approx(0.75)
    low = summarize_clients({"s1": 2.0, "s2": 7.0}, higher_is_better=False)
    assert low["worst_client"] == 7.0 and low["best_client"] == 2.0
    with pytest.raises(KeyError):
        summarize_clients(scores, {"s1": 1})


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------


def random_blob(seed: int, shape: tuple[int, ...], sigma: float, level: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


blob_params = st.tuples(
    st.integers(0, 2**31 - 1),
    st.floats(0.5, 3.0),
    st.floats(-0.5, 1.5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(16, 16), (24, 19), (6, 12, 10)]),
    p=blob_params,
    t=blob_params,
    spacing_scale=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0), st.floats(0.3, 3.0)),
)
def test_surface_metrics_match_medpy(shape, p, t, spacing_scale):
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    from importlib.metadata import version

    if int(version("medpy").split(".")[0]) == 0 and int(version("medpy").split(".")[1]) < 5:
        pytest.skip("MedPy < 0.5 averages directed means for ASSD instead of pooling")
    a = random_blob(p[0], shape, p[1], p[2])
    b = random_blob(t[0], shape, t[1], t[2])
    assume(a.any() and b.any())  # empty masks have their own test (NaN distances)
    spacing = spacing_scale[: len(shape)]
    assert hd95(a, b, spacing) == pytest.approx(
        medpy_binary.hd95(a, b, voxelspacing=spacing), rel=1e-12, abs=1e-12
    )
    assert assd(a, b, spacing) == pytest.approx(
        medpy_binary.assd(a, b, voxelspacing=spacing), rel=1e-12, abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    seeds=st.integers(0, 2**31 - 1),
    density=st.floats(0.0, 1.0),
)
def test_dice_iou_matches_case_metrics(n, seeds, density):
    rng = np.random.default_rng(seeds)
    # Mix of random masks, with some all-empty items to cover the convention.
    pred = rng.random((n, 7, 9)) < density
    true = rng.random((n, 7, 9)) < rng.random()
    if n > 1:
        pred[0] = False
        if rng.random() < 0.5:
            true[0] = False  # both empty; otherwise pred-only empty
    dice, iou = dice_iou(torch.from_numpy(pred), torch.from_numpy(true))
    assert dice.shape == (n,) and iou.shape == (n,)
    for i in range(n):
        m = case_metrics(pred[i], true[i], surface=False)
        assert dice[i].item() == pytest.approx(m["dice"], abs=1e-12)
        assert iou[i].item() == pytest.approx(m["iou"], abs=1e-12)
    np.testing.assert_allclose(dice.numpy(), 2 * iou.numpy() / (1 + iou.numpy()), atol=1e-12)
    assert ((dice >= 0) & (dice <= 1)).all()
