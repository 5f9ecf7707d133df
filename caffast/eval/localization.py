"""Class-specific L2-CAF against Grad-CAM on synthetic scenes: how well each map hits its object."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..core.constraints import MAPS, normalize_filter
from ..engine.explain import explain, upsample_maps
from ..engine.solvers import SOLVERS
from .demo_model import load_demo_model
from .gradcam import grad_cam
from .metrics import iou_auc, mask_iou, pointing_game
from .scenes import make_scene, normalize
from .summary import Metric


# the record fields of scene_records, as rows of caffast.eval.summary's tables
SCENE_METRICS = (Metric("pointing game", "pointing"), Metric("IoU@0.5", "iou"), Metric("IoU AUC", "iou_auc"))
SCENES_PER_BATCH = 100  # scenes explained in one call: progress after each, and memory bounded whatever the count


def scene_batch(count: int, first_seed: int, objects: int = 2):
    scenes = [make_scene(first_seed + k, objects=objects) for k in range(count)]
    images = torch.stack([normalize(torch.as_tensor(scene.image)) for scene in scenes])
    return scenes, images


def localization_records(maps: torch.Tensor, scenes, targets: torch.Tensor) -> list[dict[str, float]]:
    """Per map of (N, T, H, W) maps, its pointing game, IoU at 0.5 and IoU-curve area against its
    target's mask: one record per (scene, target), as caffast.eval.summary takes them."""
    records = []
    for n, scene in enumerate(scenes):
        for t, target in enumerate(targets[n].tolist()):
            mask = np.asarray(scene.masks[list(scene.labels).index(target)])
            heat = maps[n, t].cpu().numpy()
            records.append({
                "pointing": pointing_game(heat, mask, tolerance=round(15 * mask.shape[0] / 224)),
                "iou": mask_iou(heat, mask, 0.5),
                "iou_auc": iou_auc(heat, mask),
            })  # fmt: skip
    return records


def scene_records(
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, list[dict[str, float]]]:
    """Class-specific L2-CAF with every solver and map, and Grad-CAM, on synthetic scenes: each class's
    map scored against that class's mask, one record per map (`localization_records`), by method.

    The scenes are explained SCENES_PER_BATCH at a time (each problem is solved on its own, so the
    batches give what one call on every scene gives); `progress` is told after each batch how many
    scenes are scored.
    """
    model = load_demo_model()
    records: dict[str, list[dict[str, float]]] = {}
    for start in range(0, count, SCENES_PER_BATCH):
        size = min(SCENES_PER_BATCH, count - start)
        for method, batch in _batch_records(model, size, first_seed + start, max_iter, objects).items():
            records.setdefault(method, []).extend(batch)
        if progress is not None:
            progress(start + size)
    return records


def _batch_records(
    model: torch.nn.Module, count: int, first_seed: int, max_iter: int, objects: int
) -> dict[str, list[dict[str, float]]]:
    """Every method's records on the scenes of seeds first_seed, first_seed + 1, ..., per (scene, target)."""
    scenes, images = scene_batch(count, first_seed, objects)
    targets = torch.tensor([list(scene.labels) for scene in scenes], dtype=torch.long)
    size = tuple(images.shape[-2:])
    results = {}
    for solver in SOLVERS:
        l2caf = explain(model, images, "features", mode="specific", targets=targets, max_iter=max_iter, solver=solver)
        for kind in MAPS:
            maps = normalize_filter(l2caf.filters, map=kind)
            results[f"L2-CAF {solver} {kind}"] = localization_records(upsample_maps(maps, size), scenes, targets)
    gradcam = grad_cam(model, images, "features", targets).maps
    results["Grad-CAM"] = localization_records(upsample_maps(gradcam, size), scenes, targets)
    return results


def evaluate_scenes(
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, dict[str, float]]:
    """The means of `scene_records`' metrics, by method."""
    return {
        method: {metric.label: float(np.mean([record[metric.field] for record in records])) for metric in SCENE_METRICS}
        for method, records in scene_records(count, max_iter, first_seed, objects, progress).items()
    }
