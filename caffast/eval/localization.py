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


def scene_batch(count: int, first_seed: int, objects: int = 2):
    scenes = [make_scene(first_seed + k, objects=objects) for k in range(count)]
    images = torch.stack([normalize(torch.as_tensor(scene.image)) for scene in scenes])
    return scenes, images


SCENES_PER_BATCH = 100  # scenes explained in one call: progress after each, and memory bounded whatever the count


def localization(maps: torch.Tensor, scenes, targets: torch.Tensor) -> dict[str, float]:
    """Pointing game, IoU at 0.5 and the IoU-curve area of (N, T, H, W) maps against each target's mask."""
    return {metric: float(np.mean(values)) for metric, values in _scores(maps, scenes, targets).items()}


def _scores(maps: torch.Tensor, scenes, targets: torch.Tensor) -> dict[str, list[float]]:
    """`localization`'s metrics for each (scene, target), in order."""
    hits, ious, aucs = [], [], []
    for n, scene in enumerate(scenes):
        for t, target in enumerate(targets[n].tolist()):
            mask = np.asarray(scene.masks[list(scene.labels).index(target)])
            heat = maps[n, t].cpu().numpy()
            hits.append(pointing_game(heat, mask, tolerance=round(15 * mask.shape[0] / 224)))
            ious.append(mask_iou(heat, mask, 0.5))
            aucs.append(iou_auc(heat, mask))
    return {"pointing game": hits, "IoU@0.5": ious, "IoU AUC": aucs}


def evaluate_scenes(
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, dict[str, float]]:
    """Class-specific L2-CAF with every solver and map, and Grad-CAM, on synthetic scenes: each class's
    map scored against that class's mask.

    The scenes are explained SCENES_PER_BATCH at a time (each problem is solved on its own, so the
    batches give what one call on every scene gives); `progress` is told after each batch how many
    scenes are scored.
    """
    model = load_demo_model()
    scores: dict[str, dict[str, list[float]]] = {}
    for start in range(0, count, SCENES_PER_BATCH):
        size = min(SCENES_PER_BATCH, count - start)
        for method, values in _batch_scores(model, size, first_seed + start, max_iter, objects).items():
            for metric, scored in values.items():
                scores.setdefault(method, {}).setdefault(metric, []).extend(scored)
        if progress is not None:
            progress(start + size)
    return {method: {metric: float(np.mean(values)) for metric, values in metrics.items()}
            for method, metrics in scores.items()}  # fmt: skip


def _batch_scores(
    model: torch.nn.Module, count: int, first_seed: int, max_iter: int, objects: int
) -> dict[str, dict[str, list[float]]]:
    """Every method's metrics on the scenes of seeds first_seed, first_seed + 1, ..., per (scene, target)."""
    scenes, images = scene_batch(count, first_seed, objects)
    targets = torch.tensor([list(scene.labels) for scene in scenes], dtype=torch.long)
    size = tuple(images.shape[-2:])
    results = {}
    for solver in SOLVERS:
        l2caf = explain(model, images, "features", mode="specific", targets=targets, max_iter=max_iter, solver=solver)
        for kind in MAPS:
            maps = normalize_filter(l2caf.filters, map=kind)
            results[f"L2-CAF {solver} {kind}"] = _scores(upsample_maps(maps, size), scenes, targets)
    gradcam = grad_cam(model, images, "features", targets).maps
    results["Grad-CAM"] = _scores(upsample_maps(gradcam, size), scenes, targets)
    return results
