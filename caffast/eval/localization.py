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


def scene_batch(count: int, first_seed: int, objects: int = 2):
    scenes = [make_scene(first_seed + k, objects=objects) for k in range(count)]
    images = torch.stack([normalize(torch.as_tensor(scene.image)) for scene in scenes])
    return scenes, images


def localization(maps: torch.Tensor, scenes, targets: torch.Tensor) -> dict[str, float]:
    """Pointing game, IoU at 0.5 and the IoU-curve area of (N, T, H, W) maps against each target's mask."""
    hits, ious, aucs = [], [], []
    for n, scene in enumerate(scenes):
        for t, target in enumerate(targets[n].tolist()):
            mask = np.asarray(scene.masks[list(scene.labels).index(target)])
            heat = maps[n, t].cpu().numpy()
            hits.append(pointing_game(heat, mask, tolerance=round(15 * mask.shape[0] / 224)))
            ious.append(mask_iou(heat, mask, 0.5))
            aucs.append(iou_auc(heat, mask))
    return {"pointing game": float(np.mean(hits)), "IoU@0.5": float(np.mean(ious)), "IoU AUC": float(np.mean(aucs))}


def evaluate_scenes(
    count: int, max_iter: int = 1000, first_seed: int = 1_000_000, objects: int = 2
) -> dict[str, dict[str, float]]:
    """Class-specific L2-CAF with every solver and map, and Grad-CAM, on synthetic scenes: each class's
    map scored against that class's mask."""
    model = load_demo_model()
    scenes, images = scene_batch(count, first_seed, objects)
    targets = torch.tensor([list(scene.labels) for scene in scenes], dtype=torch.long)
    size = tuple(images.shape[-2:])
    results = {}
    for solver in SOLVERS:
        l2caf = explain(model, images, "features", mode="specific", targets=targets, max_iter=max_iter, solver=solver)
        for kind in MAPS:
            maps = normalize_filter(l2caf.filters, map=kind)
            results[f"L2-CAF {solver} {kind}"] = localization(upsample_maps(maps, size), scenes, targets)
    gradcam = grad_cam(model, images, "features", targets).maps
    results["Grad-CAM"] = localization(upsample_maps(gradcam, size), scenes, targets)
    return results
