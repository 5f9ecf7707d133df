"""The `caffast` command line: the offline demo, explanations of image files, the reference scripts'
own flags, and a localization evaluation on synthetic scenes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..cam import GradCAM
from ..core.constraints import MAPS
from ..engine.explain import Explanation, explain
from ..engine.solvers import SOLVERS
from ..eval.localization import evaluate_scenes, scene_batch
from .distributed import DEFAULT_RANK_TIMEOUT
from .common import (
    CliError, check_arguments, check_output_folder, class_names, default_layer, explain_options, load_image, load_model,
    say, show_progress,
)  # fmt: skip


def _save_overlays(rgb: np.ndarray, exp: Explanation, index: int, paths: list[Path], gif: bool) -> None:
    """One overlay per target of image `index` (and a GIF of its convergence when asked)."""
    from ..viz import apply_heatmap, save_gif

    symmetric = exp.map == "signed"
    for column, path in enumerate(paths):
        apply_heatmap(rgb, exp.maps[index, column].cpu().numpy(), alpha=0.6, save=str(path), cmap="bwr", symmetric=symmetric)
        if gif and exp.history:
            frames = [apply_heatmap(rgb, maps[index, column].cpu().numpy(), alpha=0.6, cmap="bwr", symmetric=symmetric)
                      for _, maps in exp.history]
            save_gif(frames, str(path.with_suffix(".gif")), duration_ms=300)


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
    return list(dict.fromkeys(written))  # an image given twice writes its files once


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


def _command_run(args: argparse.Namespace) -> int:
    from .runner import RunStopped, run_dataset

    try:
        summary = run_dataset(args)
    except RunStopped as stopped:
        say(f"caffast: {stopped}")
        return stopped.exit_code
    if summary is not None:  # rank 0 of a torchrun run, or the only process
        print(summary)
    return 0


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

    from ..eval.demo_model import CLASS_NAMES, load_demo_model
    from ..viz import apply_heatmap

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model()
    scenes, images = scene_batch(1, args.seed)
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
                             help="gd: the reference loop; fast: tens of evaluations to a lower loss; exact: the "
                                  "minimizer (closed form for plain heads)")
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
    run.add_argument("--wait", action="store_true",
                     help="when another run uses OUT, wait for it to end instead of refusing")
    run.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT.total_seconds(), metavar="SECONDS",
                     help="under torchrun, how long a rank waits for the others before it names the one that did "
                          "not answer and stops (default: 1800)")

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
        check_arguments(args)
        for flag in ("out", "output_dir"):
            if getattr(args, flag, None) is not None:
                check_output_folder(getattr(args, flag), f"--{flag}")
        if args.command == "demo":
            _command_demo(args)
        elif args.command == "explain":
            _command_explain(args)
        elif args.command == "run":
            return _command_run(args)
        elif args.command in ("class_oblivious", "class_specific"):
            _command_reference(args, args.mode)
        else:
            _command_evaluate(args)
    except CliError as error:
        say(f"caffast: error: {error}")
        return 2
    return 0
