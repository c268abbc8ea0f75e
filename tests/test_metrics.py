"""Metric values on hand-made masks, including the empty-target conventions."""
import math

import numpy as np
import pytest
import torch

import metrics


def masks(*rows: str) -> torch.Tensor:
    """A (1, H, W) boolean mask from strings of '.' and '#'."""
    return torch.tensor([[c == "#" for c in r] for r in rows])[None]


def test_dice_and_iou_exact_values():
    pred = masks("##..", "##..", "....")
    target = masks(".##.", ".##.", "....")
    # |A| = 4, |B| = 4, |A∩B| = 2 → Dice 4/8, IoU 2/6
    assert metrics.dice_score(pred, target).tolist() == [0.5]
    assert metrics.iou_score(pred, target).item() == pytest.approx(1 / 3)


def test_perfect_and_disjoint():
    a = masks("#..", "...")
    b = masks("..#", "...")
    assert metrics.dice_score(a, a).item() == 1.0
    assert metrics.iou_score(a, a).item() == 1.0
    assert metrics.dice_score(a, b).item() == 0.0
    assert metrics.iou_score(a, b).item() == 0.0


def test_empty_target_is_nan_and_counted_as_false_positive_slice():
    empty = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred = empty.clone()
    pred[1, 0, 0] = True  # one stray pixel on an empty slice
    d, j = metrics.dice_score(pred, empty), metrics.iou_score(pred, empty)
    assert d.shape == (3,) and torch.isnan(d).all() and torch.isnan(j).all()
    assert metrics.false_positive_slices(pred, empty) == 1
    assert metrics.false_positive_slices(empty, empty) == 0


def test_batch_mixes_values_and_nan_means_skip_nan():
    target = torch.zeros(2, 2, 2, dtype=torch.bool)
    target[0, 0, 0] = True
    pred = target.clone()
    d = metrics.dice_score(pred, target)
    assert d[0].item() == 1.0 and math.isnan(d[1].item())
    assert metrics.nanmean(d.tolist()) == 1.0
    assert math.isnan(metrics.nanmean([math.nan]))


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(1, 3, 3\)"):
        metrics.dice_score(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 3, dtype=torch.bool))


def test_recall_per_label_exact_values():
    """A 3 x 4 label with each BraTS label and a mask that covers part of each: the share found and the count."""
    label = np.array([[1, 1, 2, 2],
                      [2, 2, 4, 0],
                      [0, 0, 4, 4]])[None]
    pred = np.array([[1, 0, 1, 0],
                     [0, 0, 1, 1],
                     [0, 1, 1, 1]], bool)[None]  # core 1 of 2, oedema 1 of 4, enhancing 3 of 3; 2 false positives
    found = metrics.recall_per_label(pred, label)
    assert list(found) == [1, 2, 4]
    assert found[1] == (0.5, 2) and found[2] == (0.25, 4) and found[4] == (1.0, 3)
    absent = metrics.recall_per_label(pred, np.where(label == 4, 0, label))
    assert math.isnan(absent[4][0]) and absent[4][1] == 0 and absent[2] == (0.25, 4)
    with pytest.raises(ValueError, match=r"\(1, 3, 4\) and \(3, 4\)"):
        metrics.recall_per_label(pred, label[0])


def test_hd95_of_shifted_cube_is_the_shift_in_mm():
    target = np.zeros((20, 20, 20), bool)
    target[5:12, 5:12, 5:12] = True
    pred = np.roll(target, 2, axis=2)
    assert metrics.hd95(target, target) == 0.0
    assert metrics.hd95(pred, target) == pytest.approx(2.0)
    # anisotropic voxels: a shift of 2 voxels along an axis of 1.5 mm spacing is 3 mm
    assert metrics.hd95(pred, target, spacing=(1.0, 1.0, 1.5)) == pytest.approx(3.0)


def test_hd95_empty_conventions():
    empty = np.zeros((4, 6, 8), bool)
    some = empty.copy()
    some[1, 2, 3] = True
    assert math.isnan(metrics.hd95(some, empty))
    assert metrics.hd95(empty, some) == pytest.approx(math.sqrt(4**2 + 6**2 + 8**2))
    # an empty prediction is the volume's diagonal in mm: each axis's voxels times its own spacing
    assert metrics.hd95(empty, some, spacing=(3.0, 1.0, 1.0)) == pytest.approx(math.sqrt(12**2 + 6**2 + 8**2))


def test_remove_small_components_per_slice():
    m = np.zeros((2, 8, 8), bool)
    m[0, :3, :3] = True      # 9 pixels
    m[0, 6, 6] = True        # 1 pixel
    m[1, 4:6, 4:6] = True    # 4 pixels
    out = metrics.remove_small_components(m, 4)
    assert out[0, :3, :3].all() and not out[0, 6, 6] and out[1, 4:6, 4:6].all()
    assert out.sum() == 13
    assert (metrics.remove_small_components(m, 0) == m).all()


def test_keep_largest_component_in_3d():
    m = np.zeros((4, 10, 10), bool)
    m[0:3, 1:4, 1:4] = True   # 27 voxels, one component across three slices
    m[3, 8, 8] = True         # a stray voxel
    m[1, 7:9, 1:3] = True     # 4 voxels, separate
    out = metrics.keep_largest_component(m)
    assert out.sum() == 27 and out[0:3, 1:4, 1:4].all()
    assert not metrics.keep_largest_component(np.zeros((2, 3, 3), bool)).any()


def directed_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile of the distances (mm) from each surface voxel of a to the nearest of b's, brute force in
    float64: every pair of surface points."""
    from scipy import ndimage

    def surface_points(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.array(spacing, np.float64)

    pa, pb = surface_points(a), surface_points(b)
    return float(np.percentile(np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1), 95))


def test_hd95_matches_brute_force_surface_distances():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(3):
        a = ndimage.binary_dilation(rng.random((12, 16, 14)) > 0.97, iterations=2)
        b = ndimage.binary_dilation(rng.random((12, 16, 14)) > 0.97, iterations=2)
        spacing = (2.0, 1.0, 0.5)
        expected = max(directed_hd95(a, b, spacing), directed_hd95(b, a, spacing))
        assert metrics.hd95(a, b, spacing) == pytest.approx(expected)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 0.5)])
def test_hd95_takes_both_directions_on_nested_shapes(spacing):
    """A small cube inside a large one: every voxel of the small cube's surface is 3 voxels from the large one's, but
    the large one's corners are far from the small one, so the two directions differ and the symmetric HD95 is the
    larger, whichever mask is the prediction."""
    big, small = np.zeros((13, 13, 13), bool), np.zeros((13, 13, 13), bool)
    big[2:11, 2:11, 2:11] = True
    small[5:8, 5:8, 5:8] = True
    inward, outward = directed_hd95(small, big, spacing), directed_hd95(big, small, spacing)
    assert outward > inward + 0.5  # the input tells a one-directional distance apart
    assert metrics.hd95(small, big, spacing) == pytest.approx(outward)
    assert metrics.hd95(big, small, spacing) == pytest.approx(outward)


def test_region_scores_follow_the_brats_conventions_for_an_empty_region():
    """A 2 x 3 x 4 volume at 2 x 1 x 1 mm (diagonal sqrt(16 + 9 + 16) mm). Absent in both: Dice = IoU = 1, HD95 0.
    Absent from the label only, or from the prediction only: 0, 0 and the diagonal. Present in both: 2 voxels
    predicted, 1 of them the 1-voxel label: Dice 2/3, IoU 1/2, HD95 the 95th percentile of the distances 0 and 1
    mm (numpy's linear interpolation: 0.95)."""
    shape, spacing = (2, 3, 4), (2.0, 1.0, 1.0)
    empty, one, two = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    one[0, 0, 0] = two[0, 0, 0] = two[0, 0, 1] = True
    diagonal = math.sqrt(41)
    assert metrics.region_scores(empty, empty, spacing) == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}
    assert metrics.region_scores(one, empty, spacing) == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal)}
    assert metrics.region_scores(empty, one, spacing) == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal)}
    both = metrics.region_scores(two, one, spacing)
    assert both["dice"] == pytest.approx(2 / 3, abs=1e-6) and both["iou"] == pytest.approx(1 / 2)
    assert both["hd95_mm"] == pytest.approx(0.95)
    assert metrics.region_dice(empty, empty) == 1.0 and metrics.region_dice(one, empty) == 0.0
