"""Localization scores in `caffast run --annotations`: each map scored by the CAM protocol
(caffast.eval.protocol) when its image is saved, and the run's table with bootstrap intervals.

The scores go into the image's index rows, so they are written, resumed, verified and merged across
torchrun ranks with the rest of its record; the summary is made from index.jsonl at the end of every
run, so a resumed run writes and prints the summary of an uninterrupted one.

Per done row, with annotations: ``"localization"`` (L2-CAF's protocol record; None for an image the
annotations do not cover), ``"objects"`` (the annotated boxes in model-input pixels, for pictures),
``"image_size"`` (the picture's upright width and height) and, with ``--baseline gradcam``,
``"gradcam_localization"`` (Grad-CAM's record at the same layer and target).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..eval.annotations import AnnotationError, Annotations, load_annotations
from ..eval.geometry import box_to_input, preprocessing_geometry
from ..eval.protocol import CAM_THRESHOLD, evaluate_image
from ..eval.summary import Estimate, format_table, summarize
from ..models.preprocessing import Preprocessing
from .atomic import write_text
from .common import CliError

SUMMARY = "summary.json"
BASELINES = ("gradcam",)
# the index row field that holds each method's protocol record, and the method's name in tables
METHOD_FIELDS = {"localization": "L2-CAF", "gradcam_localization": "Grad-CAM"}
BASELINE_FIELD = {"gradcam": "gradcam_localization"}
BASELINE_ARRAY = {"gradcam": "gradcam_maps"}  # the baseline's maps (T, H, W) in the image's result file
MISSING_SHOWN = 3  # images without an annotation named at the start


class LocalizationError(Exception):
    """An image whose annotation cannot be scored (a mask that is missing or of another size, a size
    that disagrees with the file): the image is recorded as failed with this message."""


@dataclass(frozen=True)
class ImageScores:
    """What the protocol says of one image: the annotated boxes in input pixels, and per row field
    (METHOD_FIELDS) one record per target."""

    objects: list[dict[str, Any]]
    records: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class RunLocalization:
    """The annotations a run scores its maps against, and the CAM protocol's threshold."""

    annotations: Annotations
    path: Path
    threshold: float = CAM_THRESHOLD

    @classmethod
    def load(cls, path: str, threshold: Optional[float]) -> "RunLocalization":
        """The annotations at `path` (any format caffast.eval.annotations reads), as a command error
        when they cannot be read."""
        threshold = CAM_THRESHOLD if threshold is None else threshold
        if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
            raise CliError(f"--threshold must be a fraction of the map's maximum in (0, 1], got {threshold}")
        try:
            annotations = load_annotations(path)
        except AnnotationError as error:
            raise CliError(f"--annotations: {error}") from None
        return cls(annotations, Path(path).resolve(), threshold)

    def record(self) -> dict[str, Any]:
        """The settings as the run's config.json holds them: scores of other annotations or another
        threshold are not mixed in one folder."""
        return {"path": os.fspath(self.path), "format": self.annotations.format, "threshold": self.threshold}

    def missing(self, images: Sequence[str]) -> list[str]:
        """The images the annotations do not cover.  None covered is an error: the keys do not match
        the image paths (file stems for ImageNet and VOC, paths relative to DATA_DIR for CUB and CSV)."""
        missing = [image for image in images if self.annotations.for_image(image) is None]
        if images and len(missing) == len(images):
            key = "file stems" if self.annotations.key == "stem" else "paths relative to DATA_DIR"
            example = next(iter(self.annotations.images), "")
            raise CliError(
                f"--annotations {os.fspath(self.path)} covers none of the {len(images)} images (its {len(self.annotations)} "
                f"{self.annotations.format} annotations are keyed by {key}, such as {example!r}; the first image is "
                f"{images[0]!r}): pass the annotations of this data, or DATA_DIR as the annotations name its images"
            )
        return missing

    def score(
        self, image: str, size: tuple[int, int], preprocessing: Preprocessing, maps: Mapping[str, np.ndarray],
        targets: Sequence[int], top1: Optional[int],
    ) -> Optional[ImageScores]:  # fmt: skip
        """The protocol's records of an image's maps (by row field, each (T, h, w)), or None when the
        annotations do not cover it.  `size` is the picture's upright (width, height)."""
        annotation = self.annotations.for_image(image)
        if annotation is None:
            return None
        if annotation.size is not None and tuple(annotation.size) != tuple(size):
            raise LocalizationError(
                f"its annotation is of a {annotation.size[0]} x {annotation.size[1]} picture but the file is "
                f"{size[0]} x {size[1]}: the boxes would not fit it; pass the annotation of this file"
            )
        geometry = preprocessing_geometry(size, preprocessing)
        try:
            records = {field: evaluate_image(values, targets, annotation, geometry, top1, self.threshold)
                       for field, values in maps.items()}  # fmt: skip
        except (OSError, ValueError) as error:  # a mask file that is missing, unreadable or of another size
            raise LocalizationError(f"its annotation cannot be scored: {error}") from None
        objects = []
        for obj in annotation.objects:
            box = box_to_input(obj.box, geometry)
            if box is not None:
                objects.append({"class": obj.class_index, "box": [round(value, 3) for value in box]})
        return ImageScores(objects, records)


def method_summaries(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Estimate]]:
    """Each method's metrics with bootstrap intervals over the scored rows of an index, by method name;
    only methods the rows have."""
    summaries = {}
    for field, method in METHOD_FIELDS.items():
        if any(field in row for row in rows):
            summaries[method] = summarize([row[field] for row in rows if row.get(field) is not None])
    return summaries


def summary_table(summaries: Mapping[str, Mapping[str, Estimate]]) -> str:
    """The methods side by side (caffast.eval.summary.format_table), or a line saying nothing was scored."""
    if not any(estimate.count for summary in summaries.values() for estimate in summary.values()):
        return "localization: no map was scored (no image of the run has an annotation)"
    return format_table(summaries)


def write_summary(root: Path, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """OUT/summary.json from the index rows, and the table to print.  The file holds no time or
    count of this process's work, so every run of a folder that ends with the same index writes the
    same bytes."""
    summaries = method_summaries(rows)
    scored = {row["image"] for row in rows if row.get("localization") is not None}
    done = {row["image"] for row in rows if row.get("status") == "done"}
    content = {
        "annotations": dict(settings),
        "images": len(done),
        "scored_images": len(scored),
        "unscored_images": len(done - scored),
        "methods": {
            method: {label: asdict(estimate) for label, estimate in summary.items() if estimate.count}
            for method, summary in summaries.items()
        },
    }
    write_text(root / SUMMARY, json.dumps(content, indent=2) + "\n")
    return summary_table(summaries)
