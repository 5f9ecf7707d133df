"""Localization metrics on hand-built maps and masks."""

import numpy as np
import pytest
import torch

from caffast.eval.metrics import iou_auc, iou_curve, mask_iou, pointing_game


def square_mask(size=8, top=2, left=2, side=3):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_pointing_game_hit_and_miss():
    mask = square_mask()
    heatmap = np.zeros((8, 8))
    heatmap[3, 3] = 1.0
    assert pointing_game(heatmap, mask) is True
    heatmap[7, 7] = 2.0
    assert pointing_game(heatmap, mask) is False
    assert pointing_game(torch.from_numpy(heatmap), torch.from_numpy(mask)) is False


def test_pointing_game_ties_take_the_first_maximum():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert pointing_game(np.ones((4, 4)), mask) is True  # row-major first: the top-left pixel
    mask = np.zeros((4, 4), dtype=bool)
    mask[3, 3] = True
    assert pointing_game(np.ones((4, 4)), mask) is False


def test_a_coarse_map_is_resized_to_the_mask():
    mask = np.zeros((64, 64), dtype=bool)
    mask[40:, 40:] = True
    coarse = np.zeros((8, 8))
    coarse[6, 6] = 1.0
    assert pointing_game(coarse, mask)
    assert mask_iou(coarse, mask, 0.5) > 0


def test_iou_of_identical_and_disjoint_masks():
    mask = square_mask()
    assert mask_iou(mask.astype(float), mask, 0.5) == 1.0
    assert mask_iou(torch.from_numpy(mask).float(), torch.from_numpy(mask), 0.5) == 1.0
    assert mask_iou((~mask).astype(float), mask, 0.5) == 0.0


def test_iou_counts_pixels_at_or_above_the_threshold():
    heatmap = np.array([[0.0, 0.25, 0.5, 1.0]])
    mask = np.array([[False, False, True, True]])
    np.testing.assert_allclose(iou_curve(heatmap, mask, [0.0, 0.25, 0.5, 0.75, 1.0]), [0.5, 2 / 3, 1.0, 0.5, 0.5])


def test_auc_of_a_perfect_map_misses_only_the_first_trapezoid():
    mask = square_mask()
    fraction = mask.mean()
    # IoU is 1 at every threshold but t = 0, where all pixels are selected: IoU = |mask| / N
    assert iou_auc(mask.astype(float), mask) == pytest.approx(1 - (1 - fraction) / 40)
    assert iou_auc(mask.astype(float), mask, np.linspace(0.01, 1, 12)) == pytest.approx(0.99)


def test_auc_ranks_a_good_map_above_a_poor_one():
    mask = square_mask()
    rows, cols = np.mgrid[0:8, 0:8]
    near = -np.hypot(rows - 3, cols - 3)  # peaks at the mask's centre
    far = -np.hypot(rows - 7, cols - 7)
    assert iou_auc(near, mask) > iou_auc(far, mask)
    with pytest.raises(ValueError, match="ascending"):
        iou_auc(near, mask, [0.5, 0.2])


def test_pointing_game_tolerance_counts_near_misses_only():
    from caffast.eval.metrics import pointing_game

    mask = np.zeros((20, 20), dtype=bool)
    mask[10:14, 10:14] = True
    heat = np.zeros((20, 20))
    heat[10, 6] = 1.0  # 4 pixels left of the object
    assert not pointing_game(heat, mask)
    assert not pointing_game(heat, mask, tolerance=3)
    assert pointing_game(heat, mask, tolerance=4)
