"""The CAM localization protocol (Zhou et al., 2016; followed by the L2-CAF paper), image by image.

A map is resized to the model input bilinearly and min-max scaled to [0, 1] (as Explanation.upsample
and caffast.viz do); the pixels at or above `threshold` (0.2: a fifth of the scaled maximum) are
split into connected components, 8-connected (diagonal neighbours touch); the bounding box of the
largest one (the first in row-major order on a tie) is the predicted box.  It hits when its IoU with
any box of the map's class reaches 0.5.

Per (image, target) :func:`evaluate_image` gives a record of plain values, ready for JSON:

- ``cam_box``: the predicted box ``[x0, y0, x1, y1]`` in input pixels (continuous corners: the box
  of pixel columns 3 to 5 is x0 = 3, x1 = 6), None when no pixel reaches the threshold (a flat map);
- ``best_iou``, ``box_hit``: the best IoU with the target class's boxes (0 when it has none), and
  whether it reaches 0.5;
- ``gt_known_loc``: the box hit, for a target that is one of the image's classes (else None);
- ``top1_loc``: for the map of the model's top-1 class, whether that class is one of the image's
  and the box hit (else None): the top-1 localization error is 1 - its mean;
- ``pointing``: whether the map's maximum lies within 15 pixels (at 224; scaled with the input
  height) of a box of the target class, for one of the image's classes (else None);
- ``mask_iou``: IoU of the thresholded map with the class's mask where the image has a mask that
  marks the class (else None).

An image's classes are the annotation's, whatever the crop leaves; a class whose boxes the crop cut
away entirely has no box to hit, so its map counts as a miss.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..viz import scale_map
from .annotations import Box, ImageAnnotation
from .geometry import InputGeometry, box_to_input, mask_to_input
from .metrics import mask_iou, pointing_game
from .real import box_mask

__all__ = ["CAM_THRESHOLD", "IOU_HIT", "POINTING_TOLERANCE", "box_iou", "cam_box", "evaluate_image",
           "largest_component_box", "read_mask"]  # fmt: skip

ArrayLike = Union[np.ndarray, torch.Tensor]

CAM_THRESHOLD = 0.2
IOU_HIT = 0.5
POINTING_TOLERANCE = 15  # pixels at a 224-pixel input
POINTING_REFERENCE = 224


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of True pixels: their rows, first columns and end columns (exclusive),
    in row-major order."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    return rows, starts, ends


def largest_component_box(mask: np.ndarray) -> Optional[Box]:
    """The bounding box (x0, y0, x1, y1; x1 and y1 one past the last pixel) of the largest
    8-connected component of a boolean (H, W) mask; on a tie, the component met first in row-major
    order.  None for an empty mask.

    Runs of pixels along rows are joined when runs of adjacent rows overlap or touch diagonally.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W); got {mask.shape}")
    rows, starts, ends = _runs(mask)
    if rows.size == 0:
        return None
    parent = list(range(rows.size))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for row in range(mask.shape[0] - 1):
        upper, lower = row_first[row], row_first[row + 1]
        upper_end, lower_end = lower, row_first[row + 2]
        while upper < upper_end and lower < lower_end:
            if starts[upper] <= ends[lower] and starts[lower] <= ends[upper]:  # 8-connected: touching corners count
                parent[root(lower)] = root(upper)
            if ends[upper] < ends[lower]:
                upper += 1
            else:
                lower += 1
    roots = np.array([root(run) for run in range(rows.size)])
    _, first_run, component = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(first_run)  # components numbered by their first run: row-major order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    component = rank[component.ravel()]
    sizes = np.bincount(component, weights=ends - starts)
    chosen = component == int(np.argmax(sizes))
    return (float(starts[chosen].min()), float(rows[chosen].min()), float(ends[chosen].max()),
            float(rows[chosen].max() + 1))  # fmt: skip


def cam_box(heatmap: ArrayLike, size: tuple[int, int], threshold: float = CAM_THRESHOLD) -> Optional[Box]:
    """The CAM protocol's box of a map at an input of `size` (height, width): the map resized and
    min-max scaled, the pixels >= threshold, the largest component's bounding box (None if none)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of the maximum in (0, 1]; got {threshold}")
    return largest_component_box(scale_map(heatmap, size) >= threshold)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes in continuous corners; 0 when either is empty."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def read_mask(path: str) -> np.ndarray:
    """A label image as an (H, W) integer array: a palette image's indices, a grey image's values."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask {path!r} does not exist: fix the annotation's mask path or leave it out")
    with Image.open(path) as image:
        labels = np.asarray(image)
    if labels.ndim != 2:
        raise ValueError(f"mask {path!r} has {labels.shape[2]} channels: a mask is a one-channel label image "
                         "(palette or greyscale) whose values mark the classes")  # fmt: skip
    return labels


def evaluate_image(
    maps: ArrayLike, targets: Sequence[int], annotation: ImageAnnotation, geometry: InputGeometry,
    top1: Optional[int] = None, threshold: float = CAM_THRESHOLD,
) -> list[dict[str, Any]]:  # fmt: skip
    """One record per map of an image (the module docstring lists the fields).

    `maps` is (T, h, w), one map per entry of `targets` (as a run's .npz holds them); `geometry` is
    how the image became the model input (caffast.eval.geometry); `top1` is the model's top-1 class
    for the image, None when unknown (then no record has a top-1 verdict).
    """
    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    targets = [int(t) for t in targets]
    if maps.ndim != 3 or maps.shape[0] != len(targets):
        raise ValueError(f"maps must be (T, h, w) with one map per target; got {maps.shape} for {len(targets)} targets")
    width, height = geometry.input_size
    boxes: dict[int, list[Box]] = {}
    for obj in annotation.objects:
        moved = box_to_input(obj.box, geometry)
        if moved is not None:
            boxes.setdefault(obj.class_index, []).append(moved)
    labels = mask_to_input(read_mask(annotation.mask), geometry) if annotation.mask is not None else None
    tolerance = round(POINTING_TOLERANCE * height / POINTING_REFERENCE)
    records = []
    for heatmap, target in zip(maps, targets):
        predicted = cam_box(heatmap, (height, width), threshold)
        ious = [box_iou(predicted, box) for box in boxes.get(target, [])] if predicted is not None else []
        best = max(ious, default=0.0)
        hit = best >= IOU_HIT
        known = target in annotation.classes
        class_area = np.zeros((height, width), dtype=bool)
        for box in boxes.get(target, []):
            class_area |= box_mask(box, height, width)
        value = annotation.mask_value(target)
        marked = labels == value if labels is not None and value is not None else None
        records.append({
            "target": target,
            "cam_box": list(predicted) if predicted is not None else None,
            "best_iou": best,
            "box_hit": hit,
            "gt_known_loc": hit if known else None,
            "top1_loc": (known and hit) if top1 is not None and target == int(top1) else None,
            "pointing": pointing_game(heatmap, class_area, tolerance) if known else None,
            "mask_iou": mask_iou(heatmap, marked, threshold) if marked is not None else None,
        })  # fmt: skip
    return records
