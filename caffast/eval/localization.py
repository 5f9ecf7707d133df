"""Class-specific L2-CAF against Grad-CAM on synthetic scenes: how well each map hits its object."""

from __future__ import annotations

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
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2
) -> dict[str, list[dict[str, float]]]:
    """Class-specific L2-CAF with every solver and map, and Grad-CAM, on synthetic scenes: each class's
    map scored against that class's mask, one record per map (`localization_records`), by method."""
    model = load_demo_model()
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
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2
) -> dict[str, dict[str, float]]:
    """The means of `scene_records`' metrics, by method."""
    return {
        method: {metric.label: float(np.mean([record[metric.field] for record in records])) for metric in SCENE_METRICS}
        for method, records in scene_records(count, max_iter, first_seed, objects).items()
    }
