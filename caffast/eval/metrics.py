"""Localization scores of an attention map against a ground-truth mask (numpy or torch inputs).

A map coarser than its mask (an 8 x 8 filter against a 64 x 64 mask) is first resized to the mask
bilinearly, as caffast.viz draws it, so the scores judge the picture a user would see.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from ..viz import resize_bilinear, scale_map

ArrayLike = Union[np.ndarray, torch.Tensor]
DEFAULT_THRESHOLDS = np.linspace(0.0, 1.0, 21)


def _mask(mask: ArrayLike) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must have shape (H, W); got {array.shape}")
    return array.astype(bool)


def pointing_game(heatmap: ArrayLike, mask: ArrayLike, tolerance: int = 0) -> bool:
    """Whether the map's maximum falls on the object: inside the mask, or within `tolerance` pixels
    of it (the original pointing game allows 15 pixels at 224 x 224).

    Ties go to the first maximum in row-major order (numpy's argmax), so a constant map points at
    the top-left pixel.
    """
    truth = _mask(mask)
    resized = resize_bilinear(heatmap, truth.shape)
    row, col = np.unravel_index(int(np.argmax(resized)), truth.shape)
    if tolerance <= 0:
        return bool(truth[row, col])
    rows, cols = np.nonzero(truth)
    return bool(rows.size and np.min((rows - row) ** 2 + (cols - col) ** 2) <= tolerance**2)


def _iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def iou_curve(heatmap: ArrayLike, mask: ArrayLike, thresholds: ArrayLike = DEFAULT_THRESHOLDS) -> np.ndarray:
    """IoU of {scaled map >= t} with the mask for each threshold t, the map min-max scaled to [0, 1].

    At t = 0 every pixel is selected, whatever the map; two empty sets count as IoU 1.
    """
    truth = _mask(mask)
    scaled = scale_map(heatmap, truth.shape)
    return np.array([_iou(scaled >= t, truth) for t in np.asarray(thresholds, dtype=np.float64).ravel()])


def mask_iou(heatmap: ArrayLike, mask: ArrayLike, threshold: float = 0.5) -> float:
    """IoU of the mask with the pixels whose min-max scaled map value is at least `threshold`."""
    return float(iou_curve(heatmap, mask, [threshold])[0])


def iou_auc(heatmap: ArrayLike, mask: ArrayLike, thresholds: ArrayLike = DEFAULT_THRESHOLDS) -> float:
    """Area under the IoU-vs-threshold curve by the trapezoid rule (thresholds ascending in [0, 1]).

    On the default grid a perfect binary map scores 1 - (1 - |mask| / N) / 40, not 1: the t = 0
    point selects every pixel.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if thresholds.size < 2 or np.any(np.diff(thresholds) <= 0) or thresholds[0] < 0 or thresholds[-1] > 1:
        raise ValueError("thresholds must be at least two ascending values in [0, 1]")
    return float(np.trapezoid(iou_curve(heatmap, mask, thresholds), thresholds))
