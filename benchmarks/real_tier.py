"""The real tier (caffast.eval.real: an ImageNet-trained EfficientNet-Lite0 and shipped photos with
boxes): how often each class-specific loss points at the named object, against Grad-CAM at the same
layer, and how solver="fast" compares with the reference's runs.  Markdown tables on stdout.

    python benchmarks/real_tier.py [--layers bn2,blocks.5,blocks.4] [--no-localization] [--solvers] [--max-iter 1000]
                                   [--budgets 10,20,30,60] [--timing]

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


def solvers(model: torch.nn.Module, data: list, layers: list[str], max_iter: int, budgets: list[int]) -> None:
    """fast against gd with the reference's stopping rule (min_error 1e-6) and against max_iter full
    iterations (min_error 0), every picture in one batch per mode; "worst excess": the largest
    relative excess of fast's objective over gd's default run (0 where fast is never above it).
    Then, for each of `budgets` (fast's max_evaluations), the same comparison with gd's default run."""
    images = torch.cat([x for _, x, _, _ in data])
    classes = [[c[0]] for _, _, c, _ in data]
    print("| layer | mode | loss | fast <= gd default | fast <= gd full | worst excess | median fast evaluations | "
          "fast s | gd default s | gd full s | Grad-CAM s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    budget_rows = []
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
            default, full = runs["default"].objective.flatten(), runs["full"].objective.flatten()
            evaluations = statistics.median(runs["fast"].evaluations.flatten().tolist())
            print(f"| {layer} | {mode} | {loss or '-'} | {against(fast, default)} | {against(fast, full)} | "
                  f"{100 * excess(fast, default):.2g}% | {evaluations:g} | "
                  f"{seconds['fast']:.2f} | {seconds['default']:.1f} | {seconds['full']:.1f} | {cam_seconds:.2f} |",
                  flush=True)  # fmt: skip
            cells = []
            for budget in budgets:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", caffast.FlatMapWarning)
                    run = caffast.explain(model, images, layer, **settings, solver="fast", max_evaluations=budget)
                objective = run.objective.flatten()
                median = statistics.median(run.evaluations.flatten().tolist())
                cells.append(f"{against(objective, default)}, {100 * excess(objective, default):.2g}%, {median:g}")
            budget_rows.append(f"| {layer} | {mode}{', ' + loss if loss else ''} | " + " | ".join(cells) + " |")
    if budgets:
        print("\nfast at max_evaluations " + ", ".join(map(str, budgets)) + " (each cell: fast <= gd default, worst "
              "excess, median evaluations)\n")
        print("| layer | mode | " + " | ".join(map(str, budgets)) + " |")
        print("|---|---|" + "---|" * len(budgets))
        print("\n".join(budget_rows))


def timing(model: torch.nn.Module, data: list, layers: list[str], rounds: int = 3) -> None:
    """End to end at batch 1: explain(solver="fast"), class-specific with the default loss for the
    top class, against pytorch-grad-cam's GradCAM at the same layer, picture by picture (each the
    median of `rounds` interleaved rounds after a warm-up)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    print("| layer | median fast evaluations | median fast / GradCAM | worst fast / GradCAM | median GradCAM ms |")
    print("|---|---|---|---|---|")
    for layer in layers:
        ratios, evaluations, cam_seconds = [], [], []
        with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            for _, images, _, _ in data:
                with torch.no_grad():
                    top = model(images).argmax(1, keepdim=True)

                def fast() -> caffast.Explanation:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", caffast.FlatMapWarning)
                        return caffast.explain(model, images, layer, mode="specific", targets=top, solver="fast")

                def gradcam() -> None:
                    cam(input_tensor=images, targets=[ClassifierOutputTarget(int(top))])

                fast(), gradcam()
                seconds = {fast: [], gradcam: []}
                for _ in range(rounds):
                    for method in seconds:
                        started = time.perf_counter()
                        method()
                        seconds[method].append(time.perf_counter() - started)
                ratios.append(statistics.median(seconds[fast]) / statistics.median(seconds[gradcam]))
                cam_seconds.append(statistics.median(seconds[gradcam]))
                evaluations.append(int(fast().evaluations.flatten()[0]))
        print(f"| {layer} | {statistics.median(evaluations):g} | {statistics.median(ratios):.2f} | {max(ratios):.2f} | "
              f"{1000 * statistics.median(cam_seconds):.0f} |", flush=True)  # fmt: skip


def at_or_below(fast: torch.Tensor, gd: torch.Tensor) -> torch.Tensor:
    """Where fast's objective is at or below gd's, within 1e-9 relative (float rounding of equal answers)."""
    return fast <= gd + 1e-9 * fast.abs().clamp_min(1)


def against(fast: torch.Tensor, gd: torch.Tensor) -> str:
    below = at_or_below(fast, gd)
    return f"{int(below.sum())}/{below.numel()}"


def excess(fast: torch.Tensor, gd: torch.Tensor) -> float:
    """The largest relative excess of fast's objective over gd's (0 where it is never above)."""
    relative = (fast - gd) / gd.abs().clamp_min(1e-12)
    return float(torch.where(at_or_below(fast, gd), 0.0, relative).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="bn2,blocks.5,blocks.4")
    parser.add_argument("--solvers", action="store_true", help="also compare fast with gd (minutes on a CPU)")
    parser.add_argument("--no-localization", action="store_true", help="skip the pointing game and box IoU")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--budgets", default="", help="fast's max_evaluations to compare too, e.g. 10,20,30,60")
    parser.add_argument("--timing", action="store_true", help="fast against pytorch-grad-cam's GradCAM at batch 1")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = efficientnet_lite0()
    data = pictures()
    layers = args.layers.split(",")
    print(f"{len(data)} pictures, {sum(len(c) for _, _, c, _ in data)} objects\n")
    if not args.no_localization:
        localization(model, data, layers)
        print()
    if args.solvers:
        solvers(model, data, layers, args.max_iter, [int(b) for b in args.budgets.split(",") if b])
        print()
    if args.timing:
        timing(model, data, layers)


if __name__ == "__main__":
    main()
