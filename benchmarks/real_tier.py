"""The real tier (caffast.eval.real: an ImageNet-trained EfficientNet-Lite0 and shipped photos with
boxes): how often each class-specific loss points at the named object, against Grad-CAM at the same
layer, and how solver="fast" compares with the reference's runs.  Markdown tables on stdout.

    python benchmarks/real_tier.py [--layers bn2,blocks.5,blocks.4] [--solvers] [--max-iter 1000]

Pointing game: the map's peak (bilinear to 224 x 224) lies in the object's box; box IoU: the map
thresholded at 0.5 of its range against the box.  "top-5 correlation": the mean correlation between
the maps of each picture's five top classes (1: one map whatever the class).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import caffast
from caffast.engine.explain import upsample_maps
from caffast.eval.gradcam import grad_cam
from caffast.eval.metrics import mask_iou, pointing_game
from caffast.eval.real import box_mask, efficientnet_lite0, prepare, real_tier

LOSSES = ("margin", "logit", "log_softmax", "release")


def pictures() -> list[tuple[str, torch.Tensor, list[int], list[np.ndarray]]]:
    """(name, images (1, 3, 224, 224), classes, box masks) for every picture of the tier."""
    found = []
    for photo in real_tier():
        images, objects = prepare(photo)
        masks = [box_mask(obj.box, *images.shape[1:]) for obj in objects]
        if objects:
            found.append((photo.name, images[None], [o.class_index for o in objects], masks))
    return found


def scores(maps: torch.Tensor, masks: list[np.ndarray]) -> tuple[list[bool], list[float]]:
    heat = upsample_maps(maps.float(), 224)[0]
    return ([pointing_game(heat[k].numpy(), m) for k, m in enumerate(masks)],
            [mask_iou(heat[k].numpy(), m) for k, m in enumerate(masks)])  # fmt: skip


def correlation(maps: torch.Tensor) -> float:
    flat = maps[0].flatten(1).double()
    matrix = torch.corrcoef(flat)
    return float(matrix[~torch.eye(len(flat), dtype=torch.bool)].mean())


def localization(model: torch.nn.Module, data: list, layers: list[str]) -> None:
    print("| layer | method | pointing game | box IoU | top-5 correlation | seconds per picture |")
    print("|---|---|---|---|---|---|")
    for layer in layers:
        methods = {"Grad-CAM": lambda x, c: grad_cam(model, x, layer, [c]).maps}
        for loss in LOSSES:
            methods[f"L2-CAF {loss} (fast)"] = (
                lambda x, c, loss=loss: caffast.explain(model, x, layer, mode="specific", targets=[c], solver="fast",
                                                        loss=loss).maps)  # fmt: skip
        for name, method in methods.items():
            hits, ious, correlations, seconds = [], [], [], []
            for _, images, classes, masks in data:
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", caffast.FlatMapWarning)
                    maps = method(images, classes)
                    seconds.append(time.perf_counter() - started)
                    with torch.no_grad():
                        top = model(images).topk(5).indices[0].tolist()
                    correlations.append(correlation(method(images, top)))
                h, i = scores(maps, masks)
                hits += h
                ious += i
            print(f"| {layer} | {name} | {np.mean(hits):.2f} ({sum(hits)}/{len(hits)}) | {np.mean(ious):.2f} | "
                  f"{np.mean(correlations):.2f} | {statistics.median(seconds):.3f} |", flush=True)  # fmt: skip


def solvers(model: torch.nn.Module, data: list, layers: list[str], max_iter: int) -> None:
    """fast against gd with the reference's stopping rule (min_error 1e-6) and against max_iter full
    iterations (min_error 0), every picture in one batch per mode."""
    images = torch.cat([x for _, x, _, _ in data])
    classes = [[c[0]] for _, _, c, _ in data]
    print("| layer | mode | loss | fast <= gd default | fast <= gd full | median fast evaluations | "
          "fast s | gd default s | gd full s | Grad-CAM s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer in layers:
        for mode, loss in (("oblivious", None), ("specific", "margin"), ("specific", "release")):
            settings = dict(mode=mode, targets=classes if mode == "specific" else None, max_iter=max_iter)
            if loss:
                settings["loss"] = loss
            runs, seconds = {}, {}
            for name, extra in (("fast", dict(solver="fast")), ("default", dict(min_error=1e-6)),
                                ("full", dict(min_error=0.0))):  # fmt: skip
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", caffast.FlatMapWarning)
                    runs[name] = caffast.explain(model, images, layer, **settings, **extra)
                seconds[name] = time.perf_counter() - started
            started = time.perf_counter()
            grad_cam(model, images, layer, classes if mode == "specific" else None)
            cam_seconds = time.perf_counter() - started
            fast = runs["fast"].objective.flatten()
            slack = 1e-9 * fast.abs().clamp_min(1)  # float rounding of equal answers

            def share(other: str) -> str:
                below = fast <= runs[other].objective.flatten() + slack
                return f"{int(below.sum())}/{below.numel()}"

            evaluations = statistics.median(runs["fast"].evaluations.flatten().tolist())
            print(f"| {layer} | {mode} | {loss or '-'} | {share('default')} | {share('full')} | {evaluations:g} | "
                  f"{seconds['fast']:.2f} | {seconds['default']:.1f} | {seconds['full']:.1f} | {cam_seconds:.2f} |",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="bn2,blocks.5,blocks.4")
    parser.add_argument("--solvers", action="store_true", help="also compare fast with gd (minutes on a CPU)")
    parser.add_argument("--max-iter", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = efficientnet_lite0()
    data = pictures()
    layers = args.layers.split(",")
    print(f"{len(data)} pictures, {sum(len(c) for _, _, c, _ in data)} objects\n")
    localization(model, data, layers)
    if args.solvers:
        print()
        solvers(model, data, layers, args.max_iter)


if __name__ == "__main__":
    main()
