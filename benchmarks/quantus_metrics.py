"""Quantus's metrics for L2-CAF (gd, fast, and each class-specific loss) against Grad-CAM at the same
layer, on the shipped model's two-object scenes and, where caffast[real] is installed, on the real
tier (a trained EfficientNet-Lite0 and photos with boxes).  A markdown table on stdout.

    python benchmarks/quantus_metrics.py [--scenes 16] [--skip-real]

Pointing game (higher is better): the map's peak lies in the object's mask or box.  Faithfulness
correlation (higher): how well the map's sum over random pixel subsets predicts the drop of the
class score when they are blacked out.  Random logit (lower): the SSIM between the map of the class
and that of another random class; a map that does not depend on the class scores 1.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

import quantus

import caffast.quantus
from caffast.engine.explain import upsample_maps
from caffast.eval.demo_model import load_demo_model
from caffast.eval.gradcam import grad_cam
from caffast.eval.scenes import NUM_CLASSES, make_scene, normalize

SETTINGS = {
    "L2-CAF gd, margin": dict(solver="gd"),
    "L2-CAF fast, margin": dict(solver="fast"),
    "L2-CAF fast, logit": dict(solver="fast", loss="logit"),
    "L2-CAF fast, log_softmax": dict(solver="fast", loss="log_softmax"),
    "L2-CAF fast, release": dict(solver="fast", loss="release"),
}


def grad_cam_maps(model, inputs, targets, layer, **_):
    """caffast's Grad-CAM baseline as an explain_func: (N, 1, H, W) in [0, 1] at the input's size."""
    images = torch.as_tensor(np.asarray(inputs))
    maps = grad_cam(model, images, layer, [[int(t)] for t in np.asarray(targets)]).maps
    return upsample_maps(maps, tuple(images.shape[-2:])).numpy()


def scene_batch(count: int):
    scenes = [make_scene(seed, objects=2) for seed in range(1_000_000, 1_000_000 + count)]
    x = normalize(np.stack([s.image for s in scenes for _ in s.labels])).numpy()
    y = np.array([label for s in scenes for label in s.labels])
    masks = np.stack([mask[None] for s in scenes for mask in s.masks]).astype(np.float32)
    return x, y, masks


def real_batch():
    from caffast.eval.real import prepare, real_tier

    images, labels, masks = [], [], []
    for photo in real_tier():
        image, objects = prepare(photo)
        for obj in objects:
            mask = np.zeros((1, *image.shape[1:]), dtype=np.float32)
            x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
            mask[:, y0:y1, x0:x1] = 1
            images.append(image.numpy())
            labels.append(obj.class_index)
            masks.append(mask)
    return np.stack(images), np.array(labels), np.stack(masks)


def scores(model, batch, layer: str, classes: int) -> dict[str, tuple[float, float, float]]:
    x, y, masks = batch
    metrics = (
        quantus.PointingGame(disable_warnings=True),
        quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=x.shape[-1] * x.shape[-2] // 16,
                                        perturb_baseline="black", disable_warnings=True, display_progressbar=False),
        quantus.RandomLogit(num_classes=classes, similarity_func=quantus.similarity_func.ssim, disable_warnings=True),
    )  # fmt: skip
    methods = {name: (caffast.quantus.explain, {"layer": layer, **settings}) for name, settings in SETTINGS.items()}
    methods["Grad-CAM"] = (grad_cam_maps, {"layer": layer})
    table = {}
    for name, (explain_func, kwargs) in methods.items():
        torch.manual_seed(0)
        np.random.seed(0)
        table[name] = tuple(
            float(np.mean(metric(model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=masks, device="cpu",
                                 explain_func=explain_func, explain_func_kwargs=kwargs)))  # fmt: skip
            for metric in metrics
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=16, help="two-object scenes of the shipped model (2 objects each)")
    parser.add_argument("--skip-real", action="store_true", help="leave out the real tier")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    scene_x = scene_batch(options.scenes)
    for name, values in scores(load_demo_model(), scene_x, "features", NUM_CLASSES).items():
        rows.append((f"demo scenes ({len(scene_x[1])} objects)", name, values))
    if not options.skip_real:
        try:
            from caffast.eval.real import efficientnet_lite0

            model = efficientnet_lite0()
        except ImportError as error:
            print(f"(real tier left out: {error})")
        else:
            real = real_batch()
            for name, values in scores(model, real, "bn2", 1000).items():
                rows.append((f"real tier, bn2 ({len(real[1])} objects)", name, values))
    print("| data | method | pointing game (higher) | faithfulness correlation (higher) | random logit SSIM (lower) |")
    print("|---|---|---|---|---|")
    for data, name, (pointing, faithful, random_logit) in rows:
        print(f"| {data} | {name} | {pointing:.3f} | {faithful:.3f} | {random_logit:.3f} |")


if __name__ == "__main__":
    main()
