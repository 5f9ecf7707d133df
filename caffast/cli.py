"""The `caffast` command line: the offline demo, explanations of image files, the reference scripts'
own flags, and a localization evaluation on synthetic scenes."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .cam import GradCAM
from .engine import Explanation, explain, upsample_maps
from .exact import SOLVERS
from .filters import MAPS, normalize_filter
from .gradcam import grad_cam
from .imagefiles import IMAGENET, ImageReadError, read_image
from .zoo import build_model

DEFAULT_LAYERS = {"resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4", "googlenet": "inception5b",
                  "inception_v3": "Mixed_7c", "densenet": "features", "mobilenet": "features", "efficientnet": "features",
                  "vgg": "features", "regnet": "trunk_output", "shufflenet": "conv5", "mnasnet": "layers"}


class CliError(Exception):
    """A problem with the command's input: printed as one line, exit code 2."""


def show_progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def load_image(path: str, size: int = 224) -> tuple[np.ndarray, torch.Tensor]:
    """The reference's preprocessing: shorter side to 256, centre crop 224, ImageNet normalization.
    Returns the crop as an (H, W, 3) float array in [0, 1] and the normalized (3, H, W) tensor."""
    try:
        return read_image(path, replace(IMAGENET, size=size))
    except ImageReadError as error:
        raise CliError(str(error)) from None


def default_layer(arch: str) -> str:
    for family, layer in DEFAULT_LAYERS.items():
        if arch.startswith(family):
            return layer
    raise CliError(f"no default breakpoint for {arch!r}: pass --layer (a dotted module name)")


def class_names(arch: str, classes: int) -> list[str]:
    """ImageNet category names for 1000-class torchvision models (offline, from torchvision's metadata)."""
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"]
    except (ValueError, KeyError, AttributeError):
        categories = []
    return list(categories) if len(categories) == classes else [str(k) for k in range(classes)]


def load_model(arch: str, weights: Optional[str], device: str) -> torch.nn.Module:
    try:
        return build_model(arch, None if weights == "random" else weights).to(device)
    except FileNotFoundError as error:
        raise CliError(f"{error} (or pass --weights random for an untrained model)") from None
    except ValueError as error:
        raise CliError(str(error)) from None


def _parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"classes must be comma-separated integers, e.g. 207,323; got {text!r}") from None


def _save_overlays(rgb: np.ndarray, exp: Explanation, index: int, paths: list[Path], gif: bool) -> None:
    """One overlay per target of image `index` (and a GIF of its convergence when asked)."""
    from .viz import apply_heatmap, save_gif

    symmetric = exp.map == "signed"
    for column, path in enumerate(paths):
        apply_heatmap(rgb, exp.maps[index, column].cpu().numpy(), alpha=0.6, save=str(path), cmap="bwr", symmetric=symmetric)
        if gif and exp.history:
            frames = [apply_heatmap(rgb, maps[index, column].cpu().numpy(), alpha=0.6, cmap="bwr", symmetric=symmetric)
                      for _, maps in exp.history]
            save_gif(frames, str(path.with_suffix(".gif")), duration_ms=300)


def explain_options(args: argparse.Namespace) -> dict:
    """caffast.explain's keyword arguments that shape the results, from the command's flags.

    The one place they are built: an option added here reaches every command, and `caffast run`'s
    config.json (which refuses to mix results of different values).  The backend is not among them:
    every backend gives the same results.
    """
    return {"mode": args.mode, "targets": _parse_classes(getattr(args, "classes", None)), "max_iter": args.max_iter,
            "lr": args.lr, "min_error": args.min_error, "map": args.map, "solver": args.solver}


def _explain_files(
    images: Sequence[str], arch: str, weights: Optional[str], layer: Optional[str], options: dict, out: Path,
    gif: bool, device: str, name_of,
) -> list[Path]:
    """Explain each image file with caffast.explain(**options) and write its overlays; returns the files written."""
    model = load_model(arch, weights, device)
    layer = layer or default_layer(arch)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for done, path in enumerate(images):
        show_progress(done, len(images), "explaining")
        rgb, tensor = load_image(path)
        try:
            exp = explain(model, tensor[None].to(device), layer, history=gif, **options)
        except (ValueError, TypeError) as error:
            raise CliError(str(error)) from None
        names = class_names(arch, exp.output.shape[1]) if exp.output.dim() == 2 else []
        paths = [out / name_of(Path(path).stem, int(target), names) for target in exp.targets[0].tolist()]
        _save_overlays(rgb, exp, 0, paths, gif)
        written += paths
    show_progress(len(images), len(images), "explaining")
    return written


def _command_explain(args: argparse.Namespace) -> None:
    mode = args.mode

    def name_of(stem: str, target: int, names: list[str]) -> str:
        if mode == "oblivious":
            return f"{stem}_l2caf_oblivious_{args.arch}.png"
        label = names[target] if target < len(names) else str(target)
        return f"{stem}_l2caf_{target}_{label.replace(' ', '_')}_{args.arch}.png"

    options = {**explain_options(args), "backend": args.backend}
    written = _explain_files(args.images, args.arch, args.weights, args.layer, options, Path(args.out), args.gif,
                             args.device, name_of)
    print(f"wrote {len(written)} overlays to {args.out}")


def _command_run(args: argparse.Namespace) -> None:
    from .runner import run_dataset

    summary = run_dataset(args)
    if summary is not None:  # rank 0 of a torchrun run, or the only process
        print(summary)


def _command_reference(args: argparse.Namespace, mode: str) -> None:
    """The reference scripts' flags and file names (class_oblivious.py / class_specific.py)."""

    def name_of(stem: str, target: int, names: list[str]) -> str:
        if mode == "oblivious":
            return f"{stem}_cls_oblivious_{args.arch}.png"
        return f"{stem}_cls_specific_{target}_{names[target]}_{args.arch}.png"

    args.classes = getattr(args, "cls_logits", None)
    options = {**explain_options(args), "backend": args.backend}
    written = _explain_files([args.input_img], args.arch, args.weights, None, options, Path(args.output_dir), False,
                             args.device, name_of)
    for path in written:
        print(f"saved {path}")


def _scene_batch(count: int, first_seed: int, objects: int = 2):
    from .data import make_scene, normalize

    scenes = [make_scene(first_seed + k, objects=objects) for k in range(count)]
    images = torch.stack([normalize(torch.as_tensor(scene.image)) for scene in scenes])
    return scenes, images


def _localization(maps: torch.Tensor, scenes, targets: torch.Tensor) -> dict[str, float]:
    """Pointing game, IoU at 0.5 and the IoU-curve area of (N, T, H, W) maps against each target's mask."""
    from .metrics import iou_auc, mask_iou, pointing_game

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
    from .demo_model import load_demo_model

    model = load_demo_model()
    scenes, images = _scene_batch(count, first_seed, objects)
    targets = torch.tensor([list(scene.labels) for scene in scenes], dtype=torch.long)
    size = tuple(images.shape[-2:])
    results = {}
    for solver in SOLVERS:
        l2caf = explain(model, images, "features", mode="specific", targets=targets, max_iter=max_iter, solver=solver)
        for kind in MAPS:
            maps = normalize_filter(l2caf.filters, map=kind)
            results[f"L2-CAF {solver} {kind}"] = _localization(upsample_maps(maps, size), scenes, targets)
    gradcam = grad_cam(model, images, "features", targets).maps
    results["Grad-CAM"] = _localization(upsample_maps(gradcam, size), scenes, targets)
    return results


def _print_table(results: dict[str, dict[str, float]]) -> None:
    metrics = list(next(iter(results.values())))
    width = max(len(method) for method in results) + 2
    print(f"{'method':{width}s}" + "".join(f"{m:>15s}" for m in metrics))
    for method, values in results.items():
        print(f"{method:{width}s}" + "".join(f"{values[m]:15.3f}" for m in metrics))


def _command_evaluate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    results = evaluate_scenes(args.scenes, args.max_iter)
    print(f"{args.scenes} two-object scenes, class-specific maps scored against each class's mask "
          f"({time.perf_counter() - start:.1f} s)")
    _print_table(results)


def _command_demo(args: argparse.Namespace) -> None:
    from PIL import Image

    from .demo_model import CLASS_NAMES, load_demo_model
    from .viz import apply_heatmap

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model()
    scenes, images = _scene_batch(1, args.seed)
    scene = scenes[0]
    rgb = np.asarray(scene.image).transpose(1, 2, 0)
    big = np.kron(rgb, np.ones((4, 4, 1)))  # 4x larger pictures, pixels kept sharp
    Image.fromarray((big * 255).round().astype(np.uint8)).save(out / "scene.png")
    oblivious = explain(model, images, "features", max_iter=args.max_iter, history=True)
    targets = torch.tensor([list(scene.labels)])
    specific = explain(model, images, "features", mode="specific", targets=targets, max_iter=args.max_iter, history=True)
    names = [CLASS_NAMES[k] for k in scene.labels]
    paths = [out / "l2caf_oblivious.png"] + [out / f"l2caf_{name}.png" for name in names]
    _save_overlays(big, oblivious, 0, paths[:1], gif=True)
    _save_overlays(big, specific, 0, paths[1:], gif=True)
    with GradCAM(model, target_layers=[model.features]) as cam:
        for k, name in enumerate(names):
            heat = cam(input_tensor=images, targets=[scene.labels[k]])[0]
            apply_heatmap(big, heat, alpha=0.6, save=str(out / f"gradcam_{name}.png"), cmap="bwr")
    print(f"scene with a {names[0]} and a {names[1]}: pictures and GIFs in {out}/")
    for path in sorted(out.iterdir()):
        print(f"  {path}")
    results = evaluate_scenes(args.scenes, args.max_iter, first_seed=args.seed + 1)
    print(f"\nlocalization on {args.scenes} two-object scenes (each class against its own mask):")
    _print_table(results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffast", description="L2-CAF attention maps for CNNs")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline demo on the shipped model and synthetic scenes")
    demo.add_argument("--out", default="caffast-demo", help="output folder (default: caffast-demo)")
    demo.add_argument("--seed", type=int, default=7, help="scene seed")
    demo.add_argument("--scenes", type=int, default=50, help="scenes for the localization comparison")
    demo.add_argument("--max-iter", type=int, default=1000)

    def model_options(command: argparse.ArgumentParser, reference: bool) -> None:
        dash = "_" if reference else "-"
        command.add_argument("--arch", default="resnet50", help="a torchvision classification architecture")
        command.add_argument("--weights", default="DEFAULT",
                             help="a local state-dict file, torchvision weights in the cache (DEFAULT, IMAGENET1K_V1, ...), "
                                  "or 'random'")
        command.add_argument(f"--max{dash}iter", dest="max_iter", type=int, default=1000)
        command.add_argument("--lr", type=float, default=0.5)
        command.add_argument(f"--min{dash}error", dest="min_error", type=float, default=1e-6)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--map", default="abs", choices=MAPS,
                             help="abs: |f| (the reference); positive: the cells that raise the class; signed: f, "
                                  "drawn around zero")
        command.add_argument("--solver", default="gd", choices=SOLVERS,
                             help="gd: the reference loop; exact: the minimizer (closed form for plain heads)")
        command.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"])

    def explain_settings(command: argparse.ArgumentParser) -> None:
        command.add_argument("--layer", help="breakpoint: a dotted module name (default: the last block)")
        command.add_argument("--mode", choices=["oblivious", "specific"], default="specific")
        command.add_argument("--classes", help="comma-separated class indices (default: the top-1 class)")

    explain_command = commands.add_parser("explain", help="explain image files")
    explain_command.add_argument("images", nargs="+")
    model_options(explain_command, reference=False)
    explain_settings(explain_command)
    explain_command.add_argument("--out", default="caffast-out")
    explain_command.add_argument("--gif", action="store_true", help="also write a GIF of the filter converging")

    run = commands.add_parser(
        "run", help="explain every image of a folder tree; resumable, and split over processes under torchrun",
        description="Explain every image under DATA_DIR into OUT: a .npz per image, optional overlays and "
        "OUT/index.jsonl. Rerun the same command after an interruption to finish the rest. --arch demo "
        "runs the shipped demo model (64 x 64 inputs, layer 'features').",
    )  # fmt: skip
    run.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (searched recursively)")
    run.add_argument("--out", required=True, help="output folder; rerunning into it finishes an interrupted run")
    model_options(run, reference=False)
    explain_settings(run)
    run.add_argument("--batch-size", type=int, default=16, help="images per explain call (halved on out-of-memory)")
    run.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="the model's precision (the filters are float32 whatever it is)")
    run.add_argument("--overlays", action="store_true", help="also write an overlay PNG per image and target")
    run.add_argument("--retry-failed", action="store_true", help="explain again the images that failed before")

    for name, mode in (("class_oblivious", "oblivious"), ("class_specific", "specific")):
        command = commands.add_parser(name, help=f"the reference's {name}.py, same flags and file names")
        command.add_argument("--input_img", required=True)
        model_options(command, reference=True)
        command.add_argument("--output_dir", default="./output_heatmaps/")
        if mode == "specific":
            command.add_argument("--cls_logits", help="comma-separated classes (default: the top-1 class)")
        command.set_defaults(mode=mode)

    evaluate = commands.add_parser("evaluate", help="L2-CAF against Grad-CAM on synthetic scenes with masks")
    evaluate.add_argument("--scenes", type=int, default=2000)
    evaluate.add_argument("--max-iter", type=int, default=1000)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            _command_demo(args)
        elif args.command == "explain":
            _command_explain(args)
        elif args.command == "run":
            _command_run(args)
        elif args.command in ("class_oblivious", "class_specific"):
            _command_reference(args, args.mode)
        else:
            _command_evaluate(args)
    except CliError as error:
        print(f"caffast: error: {error}", file=sys.stderr)
        return 2
    return 0
