"""The CAM localization protocol: boxes through preprocessing, the predicted box, the per-image
verdicts and the bootstrap summary, each against a plain restatement."""

from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from caffast.eval.annotations import AnnotatedObject, ImageAnnotation
from caffast.eval.geometry import (
    box_to_input, mask_to_input, preprocessing_geometry, resize_crop_geometry, resize_geometry,
)  # fmt: skip
from caffast.eval.protocol import box_iou, cam_box, evaluate_image, largest_component_box
from caffast.eval.summary import Estimate, bootstrap_mean, format_table, summarize

# ----------------------------------------------------------------------------------------------
# boxes and masks through the preprocessing


def painted_extent(array):
    """(x0, y0, x1, y1) of the pixels brighter than half, continuous corners."""
    rows, columns = np.nonzero(array > 127)
    return columns.min(), rows.min(), columns.max() + 1, rows.max() + 1


CASES = [  # (image size, box, transform, geometry)
    ((300, 200), (40, 30, 200, 150), lambda im: TF.center_crop(TF.resize(im, 256), [224, 224]),
     lambda size: resize_crop_geometry(size, 256, 224)),
    ((203, 311), (20, 100, 190, 300), lambda im: TF.center_crop(TF.resize(im, 72), [64, 64]),
     lambda size: resize_crop_geometry(size, 72, 64)),
    ((120, 90), (10, 10, 110, 80), lambda im: TF.center_crop(TF.resize(im, 64), [80, 80]),  # the crop pads
     lambda size: resize_crop_geometry(size, 64, 80)),
    ((150, 100), (30, 20, 90, 70), lambda im: TF.resize(im, [64, 96]), lambda size: resize_geometry(size, (64, 96))),
]


@pytest.mark.parametrize("size, box, transform, geometry", CASES)
def test_a_box_lands_where_torchvision_moves_its_pixels(size, box, transform, geometry):
    pixels = np.zeros(size[::-1], dtype=np.uint8)
    pixels[box[1] : box[3], box[0] : box[2]] = 255
    moved = np.asarray(transform(Image.fromarray(pixels)))
    mapped = box_to_input(box, geometry(size))
    assert moved.shape == geometry(size).input_size[::-1]
    assert np.allclose(mapped, painted_extent(moved), atol=1.0)


def test_box_to_input_restated():
    rng = np.random.default_rng(3)
    for _ in range(200):
        width, height = (int(v) for v in rng.integers(20, 900, size=2))
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        geometry = resize_crop_geometry((width, height), 256, 224)
        new_w, new_h = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
        left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
        corners = [x0 * new_w / width - left, y0 * new_h / height - top, x1 * new_w / width - left,
                   y1 * new_h / height - top]  # fmt: skip
        clipped = [min(max(c, 0), 224) for c in corners]
        expected = None if clipped[2] <= clipped[0] or clipped[3] <= clipped[1] else tuple(clipped)
        got = box_to_input((x0, y0, x1, y1), geometry)
        assert (got is None) == (expected is None) and (got is None or np.allclose(got, expected))


def test_a_box_the_crop_cuts_away_is_dropped_and_a_partial_one_clipped():
    geometry = resize_crop_geometry((512, 256), 256, 224)  # resized 512 x 256, the crop from (144, 16)
    assert box_to_input((0, 10, 100, 50), geometry) is None
    assert box_to_input((100, 10, 200, 50), geometry) == (0.0, 0.0, 200 - 144.0, 50.0 - 16)  # the crop starts at y = 16


def test_caffast_preprocessing_settings_give_the_resize_and_crop():
    crop = SimpleNamespace(size=224, crop=True, crop_pct=224 / 256)
    assert preprocessing_geometry((640, 480), crop) == resize_crop_geometry((640, 480), 256, 224)
    plain = SimpleNamespace(size=64, crop=False, crop_pct=224 / 256)
    assert preprocessing_geometry((640, 480), plain) == resize_geometry((640, 480), (64, 64))


@pytest.mark.parametrize("size, resize, crop", [((300, 200), 256, 224), ((97, 131), 50, 48), ((60, 40), 30, 36)])
def test_a_mask_follows_torchvision_nearest(size, resize, crop):
    labels = np.random.default_rng(1).integers(0, 21, size=size[::-1], dtype=np.uint8)
    expected = TF.center_crop(TF.resize(Image.fromarray(labels), resize, InterpolationMode.NEAREST), [crop, crop])
    got = mask_to_input(labels, resize_crop_geometry(size, resize, crop))
    assert np.array_equal(got, np.asarray(expected))


# ----------------------------------------------------------------------------------------------
# the predicted box: largest 8-connected component


def flood_fill_boxes(mask):
    """Plain restatement: (size, first pixel in row-major order, box) of each 8-connected component."""
    seen = np.zeros_like(mask)
    found = []
    for row, col in zip(*np.nonzero(mask)):
        if seen[row, col]:
            continue
        queue, pixels = deque([(row, col)]), []
        seen[row, col] = True
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        rows, cols = zip(*pixels)
        found.append((len(pixels), (row, col), (min(cols), min(rows), max(cols) + 1, max(rows) + 1)))
    return found


@pytest.mark.parametrize("seed", range(12))
def test_largest_component_matches_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.uniform(0.2, 0.6)
    components = flood_fill_boxes(mask)
    if not components:
        assert largest_component_box(mask) is None
        return
    biggest = max(size for size, _, _ in components)
    expected = next(box for size, _, box in components if size == biggest)  # found in row-major order
    assert largest_component_box(mask) == expected


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((6, 6), dtype=bool)
    mask[[0, 1, 2], [0, 1, 2]] = True  # a diagonal: one component under 8-connectivity
    mask[0, 5] = mask[1, 5] = True
    assert largest_component_box(mask) == (0, 0, 3, 3)


def test_cam_box_thresholds_the_scaled_map():
    heat = np.full((10, 10), 5.0)
    heat[2:4, 3:8] = 7.0  # scaled: 1 there, 0 elsewhere
    heat[8, 0] = 5.3  # scaled 0.15: below a 0.2 threshold, above 0.1
    assert cam_box(heat, (10, 10)) == (3, 2, 8, 4)
    assert cam_box(heat, (10, 10), threshold=0.1) == (3, 2, 8, 4)  # (8, 0) stays a smaller component
    assert cam_box(np.ones((4, 4)), (8, 8)) is None  # a flat map selects nothing


# ----------------------------------------------------------------------------------------------
# per-image verdicts on hand-made maps


def pixel_iou(a, b, size):
    """Plain restatement on pixels: boxes with integer corners as masks."""
    masks = []
    for x0, y0, x1, y1 in (a, b):
        m = np.zeros(size, dtype=bool)
        m[int(y0) : int(y1), int(x0) : int(x1)] = True
        masks.append(m)
    return (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()


def block_map(size, *blocks):
    heat = np.zeros(size)
    for x0, y0, x1, y1 in blocks:
        heat[y0:y1, x0:x1] = 1.0
    return heat


SIZE = 224
IDENTITY = resize_geometry((SIZE, SIZE), (SIZE, SIZE))
TRUTH = (40, 40, 120, 120)


def annotation(*objects, mask=None, labels=()):
    return ImageAnnotation("img", tuple(AnnotatedObject(c, box) for c, box in objects), mask=mask, mask_labels=labels)


def test_a_clear_hit():
    record, = evaluate_image(block_map((SIZE, SIZE), TRUTH)[None], [5], annotation((5, TRUTH)), IDENTITY, top1=5)
    assert record["cam_box"] == list(TRUTH) and record["best_iou"] == 1.0
    assert record["box_hit"] and record["gt_known_loc"] and record["top1_loc"] and record["pointing"]
    assert record["mask_iou"] is None


@pytest.mark.parametrize("rows, hit", [(40, True), (39, False)])
def test_iou_at_and_just_below_one_half(rows, hit):
    predicted = (40, 40, 120, 40 + rows)  # 80 x rows inside the 80 x 80 truth: IoU rows / 80
    record, = evaluate_image(block_map((SIZE, SIZE), predicted)[None], [5], annotation((5, TRUTH)), IDENTITY)
    expected = pixel_iou(predicted, TRUTH, (SIZE, SIZE))
    assert record["best_iou"] == pytest.approx(expected) and (expected >= 0.5) == hit
    assert record["box_hit"] is hit and record["gt_known_loc"] is hit and record["top1_loc"] is None


def test_the_larger_component_decides():
    small_on_truth = (50, 50, 110, 110)  # 60 x 60, IoU 0.5625 with the truth
    large_elsewhere = (140, 130, 220, 220)  # 80 x 90
    heat = block_map((SIZE, SIZE), small_on_truth, large_elsewhere)
    record, = evaluate_image(heat[None], [5], annotation((5, TRUTH)), IDENTITY)
    assert record["cam_box"] == list(large_elsewhere) and not record["box_hit"]
    smaller_elsewhere = (160, 160, 200, 200)
    record, = evaluate_image(block_map((SIZE, SIZE), small_on_truth, smaller_elsewhere)[None], [5],
                             annotation((5, TRUTH)), IDENTITY)  # fmt: skip
    assert record["cam_box"] == list(small_on_truth) and record["box_hit"]
    assert record["best_iou"] == pytest.approx(pixel_iou(small_on_truth, TRUTH, (SIZE, SIZE)))


def test_any_box_of_the_class_counts_and_other_classes_do_not():
    other = (130, 130, 200, 200)
    heat = block_map((SIZE, SIZE), other)
    records = evaluate_image(np.stack([heat, heat]), [5, 9], annotation((5, TRUTH), (5, other), (7, other)),
                             IDENTITY, top1=9)  # fmt: skip
    assert records[0]["box_hit"] and records[0]["gt_known_loc"] and records[0]["top1_loc"] is None
    # 9 is not the image's class: no box to hit, no ground-truth-known verdict, a top-1 miss
    assert records[1]["best_iou"] == 0.0 and records[1]["gt_known_loc"] is None and records[1]["top1_loc"] is False
    assert records[1]["pointing"] is None


def test_pointing_tolerance_scales_with_the_input():
    heat = np.zeros((SIZE, SIZE))
    heat[60, 130] = 1.0  # 11 pixels right of the truth's last column (x = 119)
    record, = evaluate_image(heat[None], [5], annotation((5, TRUTH)), IDENTITY)
    assert record["pointing"] is True  # within 15 pixels
    small = resize_geometry((SIZE, SIZE), (64, 64))  # the same scene at 64 x 64: tolerance round(15 * 64 / 224) = 4
    heat = np.zeros((64, 64))
    heat[20, 40] = 1.0  # the truth spans x in [11.4, 34.3), pixel columns 11 to 33: 7 pixels away
    record, = evaluate_image(heat[None], [5], annotation((5, TRUTH)), small)
    assert record["pointing"] is False
    heat[20, 40], heat[20, 36] = 0.0, 1.0  # 3 pixels away
    assert evaluate_image(heat[None], [5], annotation((5, TRUTH)), small)[0]["pointing"] is True


def test_mask_iou_against_the_label_image(tmp_path):
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    labels[40:120, 40:100] = 6  # class 5 is marked 6, as VOC marks class index c with c + 1
    labels[0:10, 0:10] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(labels).save(path)
    heat = np.zeros((SIZE, SIZE))
    heat[40:120, 40:120] = 1.0
    heat[40:120, 100:120] = 0.1  # scaled 0.1: below the threshold
    record, = evaluate_image(heat[None], [5], annotation((5, TRUTH), mask=str(path), labels=((5, 6),)), IDENTITY)
    selected = heat >= 0.2
    assert record["mask_iou"] == pytest.approx((selected & (labels == 6)).sum() / (selected | (labels == 6)).sum())
    assert record["mask_iou"] == 1.0


def test_a_coarse_map_is_upsampled_bilinearly_before_the_threshold():
    coarse = np.zeros((7, 7))
    coarse[1:3, 1:3] = 1.0
    upsampled = F.interpolate(torch.from_numpy(coarse)[None, None], size=(SIZE, SIZE), mode="bilinear",
                              align_corners=False)[0, 0].numpy()  # fmt: skip
    scaled = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min())
    rows, cols = np.nonzero(scaled >= 0.2)
    expected = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    record, = evaluate_image(coarse[None], [5], annotation((5, TRUTH)), IDENTITY)
    assert record["cam_box"] == list(expected)
    assert record["best_iou"] == pytest.approx(pixel_iou(expected, TRUTH, (SIZE, SIZE)))


def test_box_iou_restated():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = (tuple(np.r_[np.sort(rng.integers(0, 30, 2)), np.sort(rng.integers(0, 30, 2))][[0, 2, 1, 3]])
                for _ in range(2))  # fmt: skip
        if a[2] > a[0] and a[3] > a[1] and b[2] > b[0] and b[3] > b[1]:
            assert box_iou(a, b) == pytest.approx(pixel_iou(a, b, (30, 30)))


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="one map per target"):
        evaluate_image(np.zeros((2, 7, 7)), [1], annotation((1, TRUTH)), IDENTITY)
    with pytest.raises(ValueError, match="threshold"):
        cam_box(np.zeros((7, 7)), (10, 10), threshold=0.0)


# ----------------------------------------------------------------------------------------------
# the summary


def test_bootstrap_restated_contains_the_mean_and_shrinks():
    rng = np.random.default_rng(7)
    widths = []
    for count in (40, 4000):
        values = (rng.random(count) < 0.3).astype(float)
        estimate = bootstrap_mean(values)
        means = values[np.random.default_rng(0).integers(0, count, size=(1000, count))].mean(axis=1)
        assert estimate.low == pytest.approx(np.quantile(means, 0.025))
        assert estimate.high == pytest.approx(np.quantile(means, 0.975))
        assert estimate.low <= estimate.mean <= estimate.high and estimate.count == count
        assert estimate.mean == pytest.approx(values.mean())
        widths.append(estimate.high - estimate.low)
    assert widths[1] < widths[0] / 4
    assert bootstrap_mean(values) == bootstrap_mean(values)  # a fixed seed


def test_summary_of_run_records_and_the_table():
    records = [
        {"image": "a.jpg", "target": 1, "status": "done", "top1_loc": True, "gt_known_loc": True, "pointing": True,
         "best_iou": 0.8, "mask_iou": None},
        {"image": "b.jpg", "target": 2, "status": "done", "top1_loc": False, "gt_known_loc": True,
         "pointing": False, "best_iou": 0.6, "mask_iou": None},
        {"image": "c.jpg", "target": 3, "status": "done", "top1_loc": None, "gt_known_loc": False,
         "pointing": True, "best_iou": 0.1, "mask_iou": None},
        {"image": "d.jpg", "target": None, "status": "failed", "error": "cannot read"},
    ]
    summary = summarize(records)
    assert summary["top-1 loc. error"].mean == pytest.approx(0.5) and summary["top-1 loc. error"].count == 2
    assert summary["GT-known loc. error"].mean == pytest.approx(1 / 3) and summary["GT-known loc. error"].count == 3
    assert summary["box IoU"].mean == pytest.approx(0.5) and summary["mask IoU"].count == 0
    other = summarize(records[:1])
    table = format_table({"L2-CAF": summary, "Grad-CAM": other})
    header, _, *rows = table.splitlines()
    assert header.split() == ["metric", "L2-CAF", "Grad-CAM"]
    assert not any(row.startswith("mask IoU") for row in rows)  # no method has values for it
    gt_row = next(row for row in rows if row.startswith("GT-known loc. error"))
    assert "0.333" in gt_row and "n=3" in gt_row and "0.000 [0.000, 0.000] n=1" in gt_row
    with pytest.raises(ValueError, match="record 0 has pointing='yes'"):
        summarize([{"pointing": "yes"}])


def test_an_empty_metric_is_nan():
    estimate = bootstrap_mean([])
    assert estimate.count == 0 and np.isnan(estimate.mean)
    assert isinstance(summarize([])["pointing game"], Estimate)
