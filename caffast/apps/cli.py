"""The `caffast` command line: the offline demo, explanations of image files, the reference scripts'
own flags, files and log, a model's candidate breakpoints, and a localization evaluation on synthetic
scenes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections import Counter
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..cam import GradCAM
from ..core.settings import FLAG_SETTINGS, RELEASE_SETTINGS, TF_RELEASE_SETTINGS, Settings
from ..engine.explain import Explanation, explain
from ..engine.flat import quiet_trial
from ..engine.inputs import Targets
from ..engine.solvers import SOLVERS
from ..eval.localization import SCENE_METRICS, evaluate_scenes, scene_batch, scene_records
from ..eval.summary import format_table, summarize
from ..models.source import SHIPPED_DEMO, ModelSource
from ..models.zoo import RELEASE_WEIGHTS, feature_map_layers, release_labels
from ..viz import apply_heatmap, save_gif, save_mask
from .common import (
    CliError, Progress, add_setting_flags, check_arguments, check_output_folder, command_settings, flat_map_notes,
    load_image, model_errors, parse_classes, result_arrays, say, take_defaults,
)  # fmt: skip
from .atomic import fitting_name, write_npz
from .distributed import DEFAULT_RANK_TIMEOUT
from .imagefiles import EXPLAIN_MARKER

COMMAND_SETTINGS = Settings(mode="specific")  # the defaults of explain and run: class-specific maps
RELEASE_COMMANDS = ("class_oblivious", "class_specific")
# the release's own spellings of some flags, which its commands take too
RELEASE_ALIASES = {"lr": ["--learning-rate"], "constraint": ["--filter_type"], "end_lr": ["--end_learning_rate"]}
# what the release's scripts run when they are given no arguments at all
RELEASE_NO_ARGUMENTS = {
    "class_oblivious": ["--output_dir", "./output_heatmaps/", "--max_iter", "1000", "--lr", "0.5", "--arch", "densenet169",
                        "--input_img", "dog_butterfly.jpg"],
    "class_specific": ["--output_dir", "./output_heatmaps/", "--max_iter", "1000", "--lr", "0.5", "--input_img",
                       "dog_butterfly.jpg", "--cls_logits", "207, 323"],
}
RELEASE_IMAGES = Path("input_imgs")  # where the release reads --input_img
RELEASE_LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
GIF_ALPHA, GIF_FRAME_MS = 0.7, 1000  # the TensorFlow release's GIF: a frame per check, 1 s each



def _save_overlays(rgb: np.ndarray, exp: Explanation, index: int, paths: list[Path], gif: bool) -> list[Path]:
    """One overlay per target of image `index`, and with `gif` a GIF of its convergence where the
    history shows one (`convergence`); returns the files written."""
    symmetric = exp.map == "signed"
    written = []
    for column, path in enumerate(paths):
        apply_heatmap(rgb, exp.maps[index, column].cpu().numpy(), alpha=0.6, save=str(path), cmap="bwr", symmetric=symmetric)
        written.append(path)
        frames = convergence(exp, index, column) if gif else []
        if len(frames) > 1:
            save_gif([apply_heatmap(rgb, heat, alpha=0.6, cmap="bwr", symmetric=symmetric) for heat in frames],
                     str(path.with_suffix(".gif")), duration_ms=300)  # fmt: skip
            written.append(path.with_suffix(".gif"))
    return written


def convergence(exp: Explanation, index: int, column: int) -> list[np.ndarray]:
    """The maps of problem (index, column) at each check of the loop, ending with its final map (the
    loop records at checks, and may stop between two); one map where the solver left no history
    (the closed form of "fast" and "exact", the bundle steps of "fast"): no convergence to show."""
    frames = [maps[index, column].cpu().numpy() for _, maps in exp.history]
    last_recorded = exp.history[-1][0] if exp.history else -1
    if int(exp.iterations[index, column]) > last_recorded or not frames:
        frames.append(exp.maps[index, column].cpu().numpy())
    return frames


def _explain(model: torch.nn.Module, images: torch.Tensor, layer: str, targets: Targets, settings: Settings,
             progress: Optional[Callable[[float], None]] = None) -> Explanation:  # fmt: skip
    """explain, with its refusals as one-line errors and its flat-map warnings as lines."""
    try:
        with flat_map_notes(lambda message: say(f"caffast: warning: {message}")):
            return explain(model, images, layer, targets, settings=settings, progress=progress)
    except (ValueError, TypeError) as error:
        raise CliError(str(error)) from None


def output_stems(images: Sequence[str]) -> dict[str, str]:
    """A name per input for its output files, the same for one file given twice (by any path) and
    different for different files: the file's stem where no other file shares it (letter case aside,
    which some file systems ignore), else its path below the files' common folder with its suffix
    ("x_dog_png" for x/dog.png beside y/dog.png and x/dog.jpg), numbered on where even that is taken."""
    first_path = {}
    for path in images:
        first_path.setdefault(os.path.realpath(path), path)
    stem_counts = Counter(Path(path).stem.casefold() for path in first_path.values())
    common = os.path.commonpath([os.path.dirname(real) for real in first_path]) if first_path else ""
    taken: set[str] = set()
    stem_of_file = {}
    for real, path in first_path.items():
        stem = Path(path).stem
        if stem_counts[stem.casefold()] > 1:
            stem = re.sub(r"[^\w-]+", "_", os.path.relpath(real, common))
        name, number = stem, 2
        while name.casefold() in taken:
            name, number = f"{stem}_{number}", number + 1
        taken.add(name.casefold())
        stem_of_file[real] = name
    return {path: stem_of_file[os.path.realpath(path)] for path in images}


@dataclass
class ExplainOutputs:
    """The files `caffast explain` wrote, by kind."""

    overlays: list[Path] = field(default_factory=list)
    gifs: list[Path] = field(default_factory=list)
    results: list[Path] = field(default_factory=list)  # one .npz per input image

    def __str__(self) -> str:
        return f"{len(self.overlays)} overlays, {len(self.gifs)} GIFs and {len(self.results)} .npz files of maps"


def _explain_files(
    images: Sequence[str], source: ModelSource, layer: Optional[str], targets: Targets, settings: Settings,
    out: Path, gif: bool, device: str, name_of: Callable[[str, int, Optional[str]], str], quiet: bool,
) -> ExplainOutputs:
    """Explain each image file with caffast.explain; write its maps (.npz), its overlays and, with
    `gif`, the GIFs of their convergence (explain then records the history)."""
    with model_errors():
        loaded = source.explainable(layer, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPLAIN_MARKER).write_text("overlays written by caffast explain: caffast run leaves this folder out\n")
    settings = replace(settings, history=gif)
    record = {"arch": source.arch, "weights": source.weights_identity(), "layer": loaded.layer,
              "input": loaded.preprocessing.record(), "explain": {**settings.to_record(), "targets": targets}}  # fmt: skip
    written = ExplainOutputs()
    flat, stills = 0, 0
    stems = output_stems(images)
    progress = Progress(len(images), "explaining", quiet=quiet)
    for done, path in enumerate(images):
        rgb, tensor = load_image(path, loaded.preprocessing)
        exp = _explain(loaded.model, tensor[None].to(device), loaded.layer, targets, settings,
                       lambda share: progress.update(done, share))  # fmt: skip
        classes = exp.output.shape[1] if exp.output.dim() == 2 else 0
        paths = [out / name_of(stems[path], target, source.class_name(target, classes))
                 for target in exp.targets[0].tolist()]  # fmt: skip
        for saved in _save_overlays(rgb, exp, 0, paths, gif):
            (written.gifs if saved.suffix == ".gif" else written.overlays).append(saved)
        result = out / fitting_name(stems[path], f"_l2caf_{settings.mode}_{source.arch}.npz")
        write_npz(result, {**result_arrays(exp, 0), "flat": exp.flat[0].cpu().numpy(),
                           "settings": np.array(json.dumps({"image": path, **record}))})  # fmt: skip
        written.results.append(result)
        flat += int(exp.flat.sum())
        stills += gif and any(len(convergence(exp, 0, column)) < 2 for column in range(len(paths)))
        progress.update(done + 1)
    progress.end()
    if stills:
        why = ("one iteration shows no convergence" if settings.solver == "gd" else f"solver {settings.solver} keeps "
               "no history (a closed form or a few bundle steps); --solver gd draws the convergence")  # fmt: skip
        say(f"caffast: no GIF for the maps of {stills} images, which have one frame: {why}")
    if flat:
        say(f"caffast: {flat} of the maps are flat and show nothing (the warnings above say why and where to look instead)")
    for kind in ("overlays", "gifs", "results"):  # an image given twice writes its files once
        setattr(written, kind, list(dict.fromkeys(getattr(written, kind))))
    return written


def _command_explain(args: argparse.Namespace) -> None:
    mode = args.mode

    def name_of(stem: str, target: int, label: Optional[str]) -> str:
        """An overlay's name: the class once, with its name where the model has names."""
        if mode == "oblivious":
            return fitting_name(stem, f"_l2caf_oblivious_{args.arch}.png")
        named = f"_{label.replace(' ', '_')}" if label is not None else ""
        return fitting_name(stem, f"_l2caf_{target}{named}_{args.arch}.png")

    written = _explain_files(args.images, ModelSource(args.arch, args.weights), args.layer, parse_classes(args.classes),
                             command_settings(args), Path(args.out), args.gif, args.device, name_of, args.quiet)  # fmt: skip
    print(f"wrote {written} to {args.out}")


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
    """The release's class_oblivious.py / class_specific.py: its flags and defaults, file names, picture
    and log file; --tf-release runs with the TensorFlow release's settings (`_release_defaults`) and
    writes its files."""
    classes = parse_classes(args.cls_logits)
    targets = classes if mode == "specific" else None  # class_oblivious ignores them, as the release
    settings = replace(command_settings(args), mode=mode, history=args.gif)
    out = Path(args.output_dir)
    written: list[Path] = []
    with _release_log(out, args.log_file) as log:
        log.info(argparse.Namespace(output_dir=args.output_dir, log_file=args.log_file, input_img=args.input_img,
                                    arch=args.arch, max_iter=args.max_iter, lr=args.lr, min_error=args.min_error,
                                    cls_logits=classes, logger=log))  # fmt: skip
        extras = ("weights", "layer", "constraint", "optimizer", "init", "seed", "end_lr", "loss", "solver", "map", "backend",
                  "device", "tf_release")  # fmt: skip
        log.info("caffast: " + ", ".join(f"{key}={getattr(args, key)!r}" for key in extras))
        image = _release_image(args.input_img)
        with model_errors():
            loaded = ModelSource(args.arch, args.weights).explainable(args.layer, args.device)
        rgb, tensor = load_image(str(image), loaded.preprocessing)
        exp = _explain(loaded.model, tensor[None].to(args.device), loaded.layer, targets, settings)
        targets = exp.targets[0].tolist()
        labels = release_labels() if exp.output.dim() == 2 and exp.output.shape[1] == len(release_labels()) else None
        if mode == "specific":
            log.info("Top K={} {}".format(len(targets), [labels[t] if labels else str(t) for t in targets]))
        for column, target in enumerate(targets):
            names = _release_names(args, mode, Path(args.input_img).stem, target, loaded.layer, labels)
            written += _write_release_files(rgb, exp, column, out, *names, gif=args.gif)
            log.info(f"Done after {_release_count(int(exp.iterations[0, column]), args)} iterations")
    for path in written:
        print(f"saved {path}")


def _write_release_files(rgb: np.ndarray, exp: Explanation, column: int, out: Path, picture: str, mask: Optional[str],
                         gif_name: str, gif: bool) -> list[Path]:  # fmt: skip
    """The release's picture of target `column` (and its raw mask, and its GIF); returns the paths."""
    symmetric = exp.map == "signed"
    heat = exp.maps[0, column].cpu().numpy()
    apply_heatmap(rgb, heat, alpha=0.6, save=out / picture, cmap="bwr", axis="off", symmetric=symmetric, style="release")
    written = [out / picture]
    if mask is not None:
        save_mask(heat, out / mask)
        written.append(out / mask)
    if gif and len(exp.history) > 1:  # a frame per check, as the release's; a single frame shows no convergence
        frames = [apply_heatmap(rgb, maps[0, column].cpu().numpy(), alpha=GIF_ALPHA, cmap="bwr", symmetric=symmetric,
                                style="release") for _, maps in exp.history]  # fmt: skip
        save_gif(frames, out / gif_name, duration_ms=GIF_FRAME_MS)
        written.append(out / gif_name)
    return written


@contextlib.contextmanager
def _release_log(folder: Path, name: str) -> Iterator[logging.Logger]:
    """The release's log: logger "L2-CAF" into FOLDER/NAME (overwritten) and to stderr, in its format."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(folder / name, mode="w", encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot write the log file {folder / name}: {error.strerror or error}") from None
    screen = logging.StreamHandler(sys.stderr)
    screen.setLevel(logging.INFO)
    logger = logging.getLogger("L2-CAF")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in (file_handler, screen):
        handler.setFormatter(logging.Formatter(RELEASE_LOG_FORMAT))
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in (file_handler, screen):
            logger.removeHandler(handler)
            handler.close()


def _release_image(name: str) -> Path:
    """--input_img as the release reads it, ./input_imgs/NAME, or else as a path."""
    for candidate in (RELEASE_IMAGES / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise CliError(f"--input_img {name!r} is neither in ./{RELEASE_IMAGES}/ (where the release reads it) nor a file")


def _release_names(args: argparse.Namespace, mode: str, stem: str, target: int, layer: str,
                   labels: Optional[Sequence[str]]) -> tuple[str, Optional[str], str]:  # fmt: skip
    """File names of the picture, the raw mask (None: not written) and the GIF: the PyTorch release's
    (its label table, commas removed), or with --tf-release the TensorFlow release's; a stem too long
    for the file system is shortened."""
    if args.tf_release:
        position = f"{args.arch}_{layer}".replace(".", "_")
        if mode == "specific":
            kind = args.constraint
            return (fitting_name(stem, f"_cls_{target}_{kind}.png"), fitting_name(stem, f"_msk_cls_{target}_{kind}.png"),
                    fitting_name(stem, f"_cls_{target}_{position}.gif"))  # fmt: skip
        return fitting_name(stem, f"_{args.constraint}.png"), None, fitting_name(stem, f"_cls_{args.constraint}_{position}.gif")
    if mode == "specific":
        label = labels[target].replace(",", "") if labels else str(target)
        picture = fitting_name(stem, f"_cls_specific_{target}_{label}_{args.arch}.png")
    else:
        picture = fitting_name(stem, f"_cls_oblivious_{args.arch}.png")
    return picture, None, picture[: -len(".png")] + ".gif"


def _release_count(steps: int, args: argparse.Namespace) -> int:
    """The release's "Done after N iterations": its loop counter at the exit, max_iter when the loop ran
    out, else the check iteration that stopped it (whose update was taken: N + 1 steps)."""
    return steps if steps >= args.max_iter or args.solver != "gd" else steps - 1


def _command_layers(args: argparse.Namespace) -> None:
    """The candidate breakpoints of a model: every module whose output is a 4-D map, with its shape,
    the path explain takes there and whether the map comes back flat (on --image, or a noise image)."""
    source = ModelSource(args.arch, args.weights)
    if source.is_demo:  # listed with its shipped weights, whatever --weights says
        source = SHIPPED_DEMO
    with model_errors():
        model = source.load()
        preprocessing = source.preprocessing()
    default = source.default_layer()
    size = args.size or (preprocessing.size if source.is_demo else 224)
    if size < 1:
        raise CliError(f"--size must be a positive number of pixels, got {size}")
    try:
        found = feature_map_layers(model, size)
    except RuntimeError as error:
        raise CliError(f"{args.arch} does not run on a {size} x {size} input: {str(error).splitlines()[0]}") from None
    if args.image:
        if source.is_demo:
            raise CliError("--image needs a model with its preprocessing: not the demo model")
        images = load_image(args.image, replace(preprocessing, size=size))[1][None]
    else:  # noise: a blank image gives every cell the same features, hence flat maps everywhere
        images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    spatial = [name for name, shapes in found if min(shapes[0][1:]) >= 2]
    tried = set(spatial[-args.check :] if args.check > 0 else [])
    print(f"{args.arch} at {size} x {size}: {len(found)} modules output a 4-D map, shown as (C, H, W). The last "
          f"{len(tried)} with a grid are tried on {args.image or 'a noise image'} (--check sets how many): the grid, "
          "the path explain takes (fused: the head's closed form; generic: autograd through the tail), and FLAT "
          "where the map comes back flat. Pass a name as --layer")  # fmt: skip
    width = max((len(name) for name, _ in found), default=0)
    for name, shapes in found:
        text = ", ".join(str(shape) for shape in dict.fromkeys(shapes))
        calls = f"  ({len(shapes)} calls)" if len(shapes) > 1 else ""
        verdict = f"  {_layer_verdict(model, images, name)}" if name in tried else ""
        print(f"  {name:{width}s}  {text}{calls}{verdict}{'  <- default' if name == default else ''}", flush=True)


def _layer_verdict(model: torch.nn.Module, images: torch.Tensor, layer: str) -> str:
    """One step of explain at `layer`: its path, and FLAT where the map comes back flat."""
    trial = quiet_trial(lambda: explain(model, images, layer, mode="specific", max_iter=1, check_every=1))
    if trial is None:
        return "(cannot be explained)"
    grid = "x".join(map(str, trial.maps.shape[-2:]))
    if not bool(trial.flat.any()):
        return f"{grid} {trial.path}"
    cause = "its gradient is 0: the tail is saturated" if bool((trial.gradient_norm == 0).all()) else "uniform"
    return f"{grid} {trial.path}  FLAT ({cause})"


def _print_table(results: dict[str, dict[str, float]]) -> None:
    metrics = list(next(iter(results.values())))
    width = max(len(method) for method in results) + 2
    print(f"{'method':{width}s}" + "".join(f"{m:>15s}" for m in metrics))
    for method, values in results.items():
        print(f"{method:{width}s}" + "".join(f"{values[m]:15.3f}" for m in metrics))


def _command_evaluate(args: argparse.Namespace) -> None:
    """A table per solver, its three maps beside Grad-CAM, each metric with its bootstrap interval."""
    start = time.perf_counter()
    progress = Progress(args.scenes, "evaluating", unit="scenes", quiet=args.quiet)
    records = scene_records(args.scenes, args.max_iter, progress=progress.update)
    progress.end()
    print(f"{args.scenes} two-object scenes, class-specific maps scored against each class's mask "
          f"({time.perf_counter() - start:.1f} s)")
    summaries = {method: summarize(values, SCENE_METRICS) for method, values in records.items()}
    for solver in SOLVERS:
        shown = {method: summary for method, summary in summaries.items() if method.startswith(f"L2-CAF {solver} ")}
        print(f"\nsolver {solver}:\n{format_table({**shown, 'Grad-CAM': summaries['Grad-CAM']})}")


def _command_report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(f"report: {write_report(Path(args.run_folder))}")


def _command_real_demo(out: Path, quiet: bool) -> None:
    from ..eval.real_demo import demo_steps, write_real_demo

    try:
        progress = Progress(demo_steps(), "demo --real", unit="steps", quiet=quiet)
        path, rates = write_real_demo(out, progress.update)
    except ImportError as error:
        raise CliError(f"caffast demo --real: {error}") from None
    progress.end()
    print(f"class-specific maps of an ImageNet-trained EfficientNet-Lite0 on real photos: {path}")
    print("pointing game over the real tier (the map's peak inside the object's box):")
    for method, rate in rates.items():
        print(f"  {method:24s} {rate:.2f}")


def _command_demo(args: argparse.Namespace) -> None:
    if args.real:
        _command_real_demo(Path(args.out), args.quiet)
        return
    from PIL import Image

    from ..eval.demo_model import CLASS_NAMES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(1 + args.scenes, "demo", unit="scenes", quiet=args.quiet)  # its own scene, then the scored ones
    model = SHIPPED_DEMO.load()
    scenes, images = scene_batch(1, args.seed)
    scene = scenes[0]
    rgb = np.asarray(scene.image).transpose(1, 2, 0)
    big = np.kron(rgb, np.ones((4, 4, 1)))  # 4x larger pictures, pixels kept sharp
    Image.fromarray((big * 255).round().astype(np.uint8)).save(out / "scene.png")
    oblivious = explain(model, images, "features", max_iter=args.max_iter, history=True,
                        progress=lambda share: progress.update(0, share / 2))  # fmt: skip
    targets = torch.tensor([list(scene.labels)])
    specific = explain(model, images, "features", mode="specific", targets=targets, max_iter=args.max_iter, history=True,
                       progress=lambda share: progress.update(0, (1 + share) / 2))  # fmt: skip
    names = [CLASS_NAMES[k] for k in scene.labels]
    paths = [out / "l2caf_oblivious.png"] + [out / f"l2caf_{name}.png" for name in names]
    _save_overlays(big, oblivious, 0, paths[:1], gif=True)
    _save_overlays(big, specific, 0, paths[1:], gif=True)
    with GradCAM(model, target_layers=[model.features]) as cam:
        for k, name in enumerate(names):
            heat = cam(input_tensor=images, targets=[scene.labels[k]])[0]
            apply_heatmap(big, heat, alpha=0.6, save=str(out / f"gradcam_{name}.png"), cmap="bwr")
    progress.update(1)
    results = evaluate_scenes(args.scenes, args.max_iter, first_seed=args.seed + 1,
                              progress=lambda scored: progress.update(1 + scored))  # fmt: skip
    progress.end()
    print(f"scene with a {names[0]} and a {names[1]}: pictures and GIFs in {out}/")
    for path in sorted(out.iterdir()):
        print(f"  {path}")
    print(f"\nlocalization on {args.scenes} two-object scenes (each class against its own mask):")
    _print_table(results)


def _release_defaults(args: argparse.Namespace) -> None:
    """The settings a release command was not given: the PyTorch release's, or with --tf-release the
    TensorFlow release's."""
    take_defaults(args, TF_RELEASE_SETTINGS if args.tf_release else RELEASE_SETTINGS)


ARCH_HELP = ("a torchvision classifier name (resnet50, densenet169, ...), a timm one with timm installed "
             "(vit_tiny_patch16_224, resnet50.a1_in1k, ...), or demo for the shipped model (default: resnet50)")
WEIGHTS_HELP = ("a local state-dict file, DEFAULT (torchvision's or timm's pretrained weights; the shipped ones "
                "for demo), torchvision weights (IMAGENET1K_V1, ...) or a timm tag, downloaded into the hub cache "
                "when missing, or 'random' (seeded)")
LAYER_HELP = "the breakpoint: a dotted module name (default: the model's own, marked '<- default' by caffast layers)"


def add_quiet_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument("--quiet", action="store_true",
                         help="no progress on stderr (a bar on a terminal, else a line every 10 s); warnings and "
                              "errors are still said")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caffast", description="L2-CAF attention maps for CNNs")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline demo on the shipped model and synthetic scenes")
    demo.add_argument("--out", default="caffast-demo", help="output folder (default: caffast-demo)")
    demo.add_argument("--seed", type=int, default=7, help="the seed of the scene explained (default: 7)")
    demo.add_argument("--scenes", type=int, default=50,
                      help="synthetic scenes for the localization comparison with Grad-CAM (default: 50)")
    add_setting_flags(demo, ["max_iter"], COMMAND_SETTINGS)
    demo.add_argument("--real", action="store_true",
                      help="an ImageNet-trained network on real photos beside Grad-CAM (needs caffast[real])")
    add_quiet_flag(demo)

    def model_options(command: argparse.ArgumentParser, reference: bool) -> None:
        """Shared flags: the model, the device, and explain's settings (but the mode); the reference's
        (class_*) spell them with underscores, take the release's spellings too, and take the release's
        defaults (None where --tf-release changes them: filled in by `_release_defaults`)."""
        weights = RELEASE_WEIGHTS if reference else "DEFAULT"
        command.add_argument("--arch", default="resnet50", help=ARCH_HELP)
        command.add_argument("--weights", default=weights, help=f"{WEIGHTS_HELP} (default: {weights})")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        command.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default here: {device})")
        names = [name for name in FLAG_SETTINGS if name != "mode"]
        if reference:
            add_setting_flags(command, names, RELEASE_SETTINGS, dash="_", alternative=(TF_RELEASE_SETTINGS, "--tf-release"),
                              aliases=RELEASE_ALIASES)  # fmt: skip
        else:
            add_setting_flags(command, names, COMMAND_SETTINGS)

    def explain_settings(command: argparse.ArgumentParser) -> None:
        command.add_argument("--layer", help=LAYER_HELP)
        add_setting_flags(command, ["mode"], COMMAND_SETTINGS)
        command.add_argument("--classes", help="comma-separated class indices, class-specific (default: each image's "
                                               "top-1 class)")

    explain_command = commands.add_parser(
        "explain", help="explain image files",
        description="Explain each image file: a .npz of its maps (and targets, objectives, settings) and an "
        "overlay PNG per class into --out.",
    )  # fmt: skip
    explain_command.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    model_options(explain_command, reference=False)
    explain_settings(explain_command)
    explain_command.add_argument("--out", default="caffast-out", help="output folder (default: caffast-out)")
    explain_command.add_argument("--gif", action="store_true",
                                 help="also write a GIF of each map converging: the history is recorded, a frame per "
                                      "50 iterations and the final map (none where the solver leaves no history: "
                                      "fast, and exact in closed form)")  # fmt: skip
    add_quiet_flag(explain_command)

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
    run.add_argument("--batch-size", type=int, default=16,
                     help="images per explain call, halved on out-of-memory (default: 16)")
    run.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="the model's precision (the filters are float32 whatever it is; default: float32)")
    run.add_argument("--overlays", action="store_true", help="also write an overlay PNG per image and target")
    run.add_argument("--retry-failed", action="store_true", help="explain again the images that failed before")
    run.add_argument("--wait", action="store_true",
                     help="when another run uses OUT, wait for it to end instead of refusing")
    run.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT.total_seconds(), metavar="SECONDS",
                     help="under torchrun, how long a rank waits for the others before it names the one that did "
                          "not answer and stops (default: 1800)")
    run.add_argument("--annotations", metavar="PATH",
                     help="score every map by the CAM localization protocol against these boxes: ImageNet XML or "
                          "LOC_val_solution.csv, CUB-200-2011, Pascal VOC, or a CSV image,class,x0,y0,x1,y1; "
                          "writes OUT/summary.json")
    run.add_argument("--baseline", choices=["gradcam"],
                     help="also compute this method's maps at the same layer and targets, saved and scored beside L2-CAF's")
    run.add_argument("--threshold", type=float, metavar="FRACTION",
                     help="with --annotations: the protocol's box is the largest region of the map at or above this "
                          "fraction of its maximum (default: 0.2)")
    add_quiet_flag(run)

    for name, mode in (("class_oblivious", "oblivious"), ("class_specific", "specific")):
        command = commands.add_parser(
            name, help=f"the reference's {name}.py: its flags, defaults, file names, picture and log",
            description=f"As the official PyTorch release's {name}.py: --input_img is read from ./input_imgs/ "
            "(or as a path), the pictures and l2_caf_log.txt go to --output_dir. Without any arguments it runs "
            "as the release's script does without any.",
        )  # fmt: skip
        command.add_argument("--output_dir", default="./output_heatmaps/", help="pictures and the log file")
        command.add_argument("--log_file", default="l2_caf_log.txt", help="the log's name inside --output_dir")
        command.add_argument("--input_img", required=True, help="an image name in ./input_imgs/, or a path")
        model_options(command, reference=True)
        command.add_argument("--cls_logits", help="comma-separated classes (default: the top-1 class)"
                             + ("" if mode == "specific" else "; ignored here, as by the release"))
        command.add_argument("--layer", help=LAYER_HELP)
        command.add_argument("--gif", "--save_gif", dest="gif", action="store_true",
                             help="also write a GIF of the filter converging: a frame per 50 iterations, 1 s each, "
                                  "alpha 0.7, as the TensorFlow release's")  # fmt: skip
        command.add_argument("--tf-release", "--tf_release", dest="tf_release", action="store_true",
                             help="run as the TensorFlow release: lr 0.5, 1000 iterations, --optimizer adam_tf1, "
                                  "--init normal, --end_lr 0, and its file names (a raw mask PNG per class too)")  # fmt: skip
        command.set_defaults(mode=mode)

    layers = commands.add_parser("layers", help="list a model's candidate breakpoints (modules that output a 4-D map)")
    layers.add_argument("--arch", default="resnet50", help=ARCH_HELP)
    layers.add_argument("--size", type=int, help="input side in pixels (default: 224; 64 for demo)")
    layers.add_argument("--weights", default="random",
                        help="as for explain (demo: its shipped weights whatever this says); flat maps show on "
                             "trained weights (default: random)")  # fmt: skip
    layers.add_argument("--image", help="an image to try the layers on (default: a noise image, seeded: a blank "
                                        "one gives every cell the same features, so flat maps everywhere)")
    layers.add_argument("--check", type=int, default=12,
                        help="how many of the last layers with a grid to try with one step of explain (default: 12)")

    report = commands.add_parser(
        "report", help="a static HTML page to browse a run: OUT/report.html, thumbnails in OUT/report/",
        description="Write OUT/report.html, one self-contained page that opens offline: the run's settings and "
        "localization summary, per-class figures, the worst and best maps, and every map in a table that sorts "
        "and filters, with overlays (Grad-CAM's beside L2-CAF's where the run has them).",
    )  # fmt: skip
    report.add_argument("run_folder", metavar="OUT", help="the output folder of a caffast run")

    evaluate = commands.add_parser("evaluate", help="L2-CAF against Grad-CAM on synthetic scenes with masks")
    evaluate.add_argument("--scenes", type=int, default=2000, help="synthetic scenes to score (default: 2000)")
    add_setting_flags(evaluate, ["max_iter"], COMMAND_SETTINGS)
    add_quiet_flag(evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0] in RELEASE_NO_ARGUMENTS:  # the release's script without arguments
        print("Loading the default parameters")
        argv += RELEASE_NO_ARGUMENTS[argv[0]]
    args = build_parser().parse_args(argv)
    try:
        if args.command in RELEASE_COMMANDS:
            _release_defaults(args)
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
        elif args.command in RELEASE_COMMANDS:
            _command_reference(args, args.mode)
        elif args.command == "layers":
            _command_layers(args)
        elif args.command == "report":
            _command_report(args)
        else:
            _command_evaluate(args)
    except CliError as error:
        say(f"caffast: error: {error}")
        return 2
    return 0
