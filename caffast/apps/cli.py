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
from ..models.source import SHIPPED_DEMO, ModelSource, first_conv_channels
from ..models.zoo import RELEASE_WEIGHTS, feature_map_layers, release_labels
from ..viz import (
    CLIP_FRAME_MS, VideoEncoderError, apply_heatmap, montage, save_clip_gif, save_clip_video, save_gif, save_mask,
    video_encoder,
)  # fmt: skip
from .clipfiles import input_kind, model_input_problem
from .common import (
    CliError, Progress, add_input_flags, add_setting_flags, check_arguments, check_output_folder, command_settings,
    flat_map_notes, input_preprocessing, load_input, model_errors, parse_classes, result_arrays, say, take_defaults,
)  # fmt: skip
from .atomic import PathTooLong, check_path_length, fitting_name, write_npz, write_text
from .distributed import DEFAULT_RANK_TIMEOUT
from .imagefiles import EXPLAIN_MARKER, ImageReadError

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


def save_volume_pictures(picture: np.ndarray, exp: Explanation, index: int, paths: list[Path], clip: bool,
                         axis: str = "axial", video: bool = False) -> list[Path]:  # fmt: skip
    """The pictures of a clip's or a volume's maps: per target a montage of its frames or slices
    (along `axis` for a volume) and, for a clip, a GIF of the map over its frames and with `video` the
    same frames as an MP4 (an encoder that cannot write one is a warning: the GIF shows them too);
    returns the files."""
    symmetric = exp.map == "signed"
    written = []
    for column, path in enumerate(paths):
        heat = exp.maps[index, column].float().cpu().numpy()
        montage(picture, heat, axis="axial" if clip else axis, symmetric=symmetric, save=path)
        written.append(path)
        if clip:
            save_clip_gif(picture, heat, path.with_suffix(".gif"), duration_ms=CLIP_FRAME_MS, symmetric=symmetric)
            written.append(path.with_suffix(".gif"))
        if clip and video:
            try:
                save_clip_video(picture, heat, path.with_suffix(".mp4"), duration_ms=CLIP_FRAME_MS, symmetric=symmetric)
            except VideoEncoderError as error:
                say(f"caffast: warning: {error}; the GIF beside it shows the same frames")
            else:
                written.append(path.with_suffix(".mp4"))
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
    videos: list[Path] = field(default_factory=list)  # a clip's MP4s, where an encoder is installed
    results: list[Path] = field(default_factory=list)  # one .npz per input image

    def __str__(self) -> str:
        videos = f", {len(self.videos)} MP4 videos" if self.videos else ""
        return f"{len(self.overlays)} overlays, {len(self.gifs)} GIFs{videos} and {len(self.results)} .npz files of maps"


EXPLAIN_NOTE = "overlays written by caffast explain: caffast run leaves this folder out"


def _explained_here(out: Path) -> set[str]:
    """The names of the files earlier `caffast explain` runs wrote into `out`, as its marker lists them
    (the marker's second line, a JSON list); an older or unreadable marker lists none."""
    try:
        lines = (out / EXPLAIN_MARKER).read_text(encoding="utf-8").splitlines()
        names = json.loads(lines[1]) if len(lines) > 1 else []
    except (OSError, ValueError):
        return set()
    return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()


def _mark_explained(out: Path, names: set[str]) -> None:
    """The marker, listing the files explain wrote here: a later run may write over these, and only these."""
    write_text(out / EXPLAIN_MARKER, f"{EXPLAIN_NOTE}\n{json.dumps(sorted(names))}\n", durable=False)


def _not_ours(out: Path, ours: set[str]) -> set[str]:
    """The casefolded names in `out` that explain must neither write over nor into: folders, links and
    files it did not write.  Casefolded, since Dog.png and dog.png are one file on the disks of macOS
    and Windows."""
    with os.scandir(out) as entries:
        mine = {entry.name for entry in entries if entry.name in ours and entry.is_file(follow_symlinks=False)}
    return {name.casefold() for name in os.listdir(out) if name != EXPLAIN_MARKER and name not in mine}


def _free_names(stem: str, names_of: Callable[[str], list[str]], taken: set[str], claimed: dict[str, str],
                image: str) -> list[str]:  # fmt: skip
    """The output names of one image from `stem`, or from stem_2, stem_3, ... where one of them is
    taken (`taken`: casefolded names in the folder that are not ours) or claimed by another image
    (`claimed`: casefolded name -> the real path of the image it belongs to)."""
    variant, number = stem, 2
    while True:
        names = names_of(variant)
        folded = [name.casefold() for name in names]
        if len(set(folded)) == len(folded) and all(
            name not in taken and claimed.get(name, image) == image for name in folded
        ):
            return names
        variant, number = f"{stem}_{number}", number + 1


def _explain_files(
    images: Sequence[str], source: ModelSource, layer: Optional[str], targets: Targets, settings: Settings,
    out: Path, gif: bool, device: str, name_of: Callable[[str, int, Optional[str]], str], quiet: bool,
    inputs: argparse.Namespace,
) -> ExplainOutputs:
    """Explain each input (image file, clip or volume; `inputs` holds the input flags) with
    caffast.explain; write its maps (.npz) and its pictures: an overlay per target of an image (with
    `gif` the GIFs of their convergence, explain then recording the history), a montage per target
    of a clip or a volume and, for a clip, a GIF of the map over its frames (and an MP4 of them where
    OpenCV or PyAV is installed).  The names are unique
    per input regardless of letter case, and never those of a folder or a file explain did not write."""
    try:
        kinds = {path: input_kind(path, inputs.input_kind) for path in images}
    except ImageReadError as error:
        raise CliError(str(error)) from None
    for path, kind in kinds.items():  # before the model is loaded
        problem = model_input_problem(path, kind, source.takes_clips, f"--arch {source.arch}")
        if problem is not None:
            raise CliError(problem)
    if gif and source.takes_clips:
        raise CliError("--gif draws an image's map converging; a clip's GIF (its map over the frames) is written "
                       "anyway: leave --gif out")  # fmt: skip
    with model_errors():
        loaded = source.explainable(layer, device)
    preprocessing = input_preprocessing(inputs, loaded.preprocessing)
    out.mkdir(parents=True, exist_ok=True)
    ours = _explained_here(out)
    taken = _not_ours(out, ours)
    _mark_explained(out, ours)
    claimed: dict[str, str] = {}
    videos = source.takes_clips and video_encoder() is not None
    settings = replace(settings, history=gif)
    record = {"arch": source.arch, "weights": source.weights_identity(), "layer": loaded.layer,
              "input": preprocessing.record(), "explain": {**settings.to_record(), "targets": targets}}  # fmt: skip
    written = ExplainOutputs()
    flat, stills = 0, 0
    stems = output_stems(images)
    progress = Progress(len(images), "explaining", "inputs" if source.takes_clips else "images", quiet=quiet)
    for done, path in enumerate(images):
        picture, tensor = load_input(path, preprocessing, kinds[path], loaded.in_channels)
        exp = _explain(loaded.model, tensor[None].to(device), loaded.layer, targets, settings,
                       lambda share: progress.update(done, share))  # fmt: skip
        classes = exp.output.shape[1] if exp.output.dim() == 2 else 0
        labels = [(target, source.class_name(target, classes)) for target in exp.targets[0].tolist()]
        kind = kinds[path]
        with_gifs = gif if kind == "image" else kind != "volume"
        with_videos = videos and kind not in ("image", "volume")

        def names_of(stem: str) -> list[str]:
            """The input's .npz, then its pictures (overlays or montages), then their GIFs and MP4s."""
            pictures = [name_of(stem, target, label) for target, label in labels]
            gifs = [str(Path(name).with_suffix(".gif")) for name in pictures] if with_gifs else []
            mp4s = [str(Path(name).with_suffix(".mp4")) for name in pictures] if with_videos else []
            return [fitting_name(stem, f"_l2caf_{settings.mode}_{source.arch}.npz"), *pictures, *gifs, *mp4s]

        real = os.path.realpath(path)
        names = _free_names(stems[path], names_of, taken, claimed, real)
        for name in names:  # the pictures are not written through write_atomically, which checks this
            check_path_length(out / name)
        claimed.update({name.casefold(): real for name in names})
        ours.update(names)
        _mark_explained(out, ours)  # before the files: a killed run leaves them listed as ours
        paths = [out / name for name in names[1 : 1 + len(labels)]]
        if kind == "image":
            saved_files = _save_overlays(picture, exp, 0, paths, gif)
        else:
            saved_files = save_volume_pictures(picture, exp, 0, paths, kind != "volume", inputs.axis, with_videos)
        for saved in saved_files:
            {".gif": written.gifs, ".mp4": written.videos}.get(saved.suffix, written.overlays).append(saved)
        result = out / names[0]
        described = {"image": path} if kind == "image" else {"image": path, "kind": kind}
        write_npz(result, {**result_arrays(exp, 0), "flat": exp.flat[0].cpu().numpy(),
                           "settings": np.array(json.dumps({**described, **record}))})  # fmt: skip
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
    for kind in ("overlays", "gifs", "videos", "results"):  # an image given twice writes its files once
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

    try:
        written = _explain_files(args.images, ModelSource(args.arch, args.weights), args.layer,
                                 parse_classes(args.classes), command_settings(args), Path(args.out), args.gif,
                                 args.device, name_of, args.quiet, args)  # fmt: skip
    except PathTooLong as error:
        raise CliError(f"cannot write the outputs: {error.strerror}") from None
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
        rgb, tensor = load_input(str(image), loaded.preprocessing)
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


def layers_grid(size: Optional[str], arch: str, takes_clips: bool, default_side: int, frames: int) -> tuple[int, ...]:
    """The input grid `caffast layers` runs on, from --size: (side, side) for an image; for a clip or a
    volume "D,H,W", or one side with the preprocessing's `frames` frames."""
    if size is None:
        return (frames, default_side, default_side) if takes_clips else (default_side, default_side)
    form = "one side, or D,H,W (frames, height, width)" if takes_clips else "one side in pixels"
    try:
        sides = tuple(int(part) for part in size.replace("x", ",").split(","))
    except ValueError:
        raise CliError(f"--size takes {form}; got {size!r}") from None
    if len(sides) not in ((1, 3) if takes_clips else (1,)):
        why = "" if takes_clips else f" (--arch {arch} takes images; D,H,W is for models that take clips)"
        raise CliError(f"--size takes {form}{why}; got {size!r}")
    if min(sides) < 1:
        raise CliError(f"--size must be positive numbers of pixels (and frames), got {size!r}")
    if len(sides) == 1:
        return (frames, sides[0], sides[0]) if takes_clips else (sides[0], sides[0])
    return sides


def _layers_input(path: Optional[str], source: ModelSource, model: torch.nn.Module,
                  grid: tuple[int, ...]) -> torch.Tensor:  # fmt: skip
    """What `caffast layers` tries the layers on: the input at `path` prepared as explain prepares it
    (an image at the grid's side; a clip with the grid's frames and side; a volume as it is), or seeded
    noise of the grid's shape: a blank input gives every cell the same features, hence flat maps."""
    if path is None:
        channels = (first_conv_channels(model) or 3) if source.takes_clips else 3
        return torch.randn(1, channels, *grid, generator=torch.Generator().manual_seed(0))
    if source.is_demo:
        raise CliError("--image needs a model with its preprocessing: not the demo model")
    preprocessing = replace(source.preprocessing(), size=grid[-1])
    if not source.takes_clips:
        return load_input(path, preprocessing)[1][None]
    if grid[-1] != grid[-2]:
        raise CliError(f"a clip is centre-cropped to a square: --size {grid[0]},{grid[1]},{grid[2]} with --image needs "
                       "height = width")  # fmt: skip
    try:
        kind = input_kind(path, "frames" if os.path.isdir(path) else None)
    except ImageReadError as error:
        raise CliError(str(error)) from None
    problem = model_input_problem(path, kind, True, f"--arch {source.arch}")
    if problem is not None:
        raise CliError(problem)
    return load_input(path, replace(preprocessing, frames=grid[0]), kind, first_conv_channels(model))[1][None]


def _command_layers(args: argparse.Namespace) -> None:
    """The candidate breakpoints of a model: every module whose output is a map (4-D, or 5-D for a
    model that takes clips), with its shape, the path explain takes there and whether the map comes
    back flat (on --image, or a noise input)."""
    source = ModelSource(args.arch, args.weights)
    if source.is_demo:  # listed with its shipped weights, whatever --weights says
        source = SHIPPED_DEMO
    with model_errors():
        model = source.load()
        preprocessing = source.preprocessing()
    default = source.default_layer()
    side = preprocessing.size if source.is_demo or source.takes_clips else 224
    grid = layers_grid(args.size, args.arch, source.takes_clips, side, preprocessing.frames or 1)
    images = _layers_input(args.image, source, model, grid)
    grid = tuple(images.shape[2:])  # a volume keeps its own shape
    shown = " x ".join(map(str, grid))
    try:
        found = feature_map_layers(model, grid, images.shape[1])
    except RuntimeError as error:
        raise CliError(f"{args.arch} does not run on a {shown} input: {str(error).splitlines()[0]}") from None
    spatial = [name for name, shapes in found if min(shapes[0][-2:]) >= 2]
    tried = set(spatial[-args.check :] if args.check > 0 else [])
    axes, what = ("(C, D, H, W)", "5-D") if source.takes_clips else ("(C, H, W)", "4-D")
    noise = "a noise clip" if source.takes_clips else "a noise image"
    print(f"{args.arch} at {shown}: {len(found)} modules output a {what} map, shown as {axes}. The last "
          f"{len(tried)} with a grid are tried on {args.image or noise} (--check sets how many): the grid, "
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
    grid = "x".join(map(str, trial.maps.shape[2:]))  # (h, w), or (d, h, w) on clips
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
        "explain", help="explain image files, clips and volumes",
        description="Explain each input: a .npz of its maps (and targets, objectives, settings) and, per class, an "
        "overlay PNG of an image, or a montage of a clip's frames (with a GIF of the map over the clip) or of a "
        "volume's slices, into --out.",
    )  # fmt: skip
    explain_command.add_argument("images", nargs="+", metavar="INPUT",
                                 help="image files; with a model that takes clips (--arch r3d_18, ...) videos, .npy "
                                      "volumes or folders of frames (with --input-kind frames)")  # fmt: skip
    model_options(explain_command, reference=False)
    explain_settings(explain_command)
    add_input_flags(explain_command)
    explain_command.add_argument("--out", default="caffast-out", help="output folder (default: caffast-out)")
    explain_command.add_argument("--gif", action="store_true",
                                 help="also write a GIF of each map converging: the history is recorded, a frame per "
                                      "50 iterations and the final map (none where the solver leaves no history: "
                                      "fast, and exact in closed form)")  # fmt: skip
    add_quiet_flag(explain_command)

    run = commands.add_parser(
        "run", help="explain every image (or clip, or volume) of a folder tree; resumable, and split over processes "
        "under torchrun",
        description="Explain every image under DATA_DIR into OUT (with a model that takes clips, every video and .npy "
        "volume, or with --input-kind frames every folder of frames): a .npz per input, optional overlays and "
        "OUT/index.jsonl. Rerun the same command after an interruption to finish the rest. --arch demo "
        "runs the shipped demo model (64 x 64 inputs, layer 'features').",
    )  # fmt: skip
    run.add_argument("data_dir", metavar="DATA_DIR", help="folder of images, videos, volumes or folders of frames "
                                                         "(searched recursively)")
    run.add_argument("--out", required=True, help="output folder; rerunning into it finishes an interrupted run")
    model_options(run, reference=False)
    explain_settings(run)
    add_input_flags(run)
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

    layers = commands.add_parser("layers", help="list a model's candidate breakpoints (modules that output a 4-D map, "
                                                "or 5-D for a model that takes clips)")  # fmt: skip
    layers.add_argument("--arch", default="resnet50", help=ARCH_HELP)
    layers.add_argument("--size", help="input side in pixels (default: 224; 64 for demo); for a model that takes "
                                       "clips D,H,W or one side (default: its preprocessing's, 16,112,112 for r3d_18)")
    layers.add_argument("--weights", default="random",
                        help="as for explain (demo: its shipped weights whatever this says); flat maps show on "
                             "trained weights (default: random)")  # fmt: skip
    layers.add_argument("--image", help="an image to try the layers on (for a model that takes clips: a video, a "
                                        ".npy volume or a folder of frames; default: seeded noise: a blank input gives "
                                        "every cell the same features, so flat maps everywhere)")
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
