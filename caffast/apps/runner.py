"""`caffast run`: explain every image of a folder tree into an output folder that a kill or a crash
never leaves wrong, and that the same command finishes.

The output folder (caffast.apps.runfolder) records each image once its files are durable, committing
the images of the last second or so at once (a batch at least), so a run killed at any moment, or a
machine that crashed, loses at most those; started again with the same command, it finishes the rest
and ends with the outputs of an uninterrupted run, bit for bit: batch k always holds images
[k B, (k + 1) B) of the sorted list, and a batch with any image left to do is computed whole (only its
unfinished images are written).  Under torchrun the ranks take those batches in turn (rank r the
r-th, the (r + W)-th, ...), checking in with each other after every batch, and rank 0 writes the index
once all are done and committed.  SIGINT and SIGTERM stop a run between two writes, committing what
was written, with what was done and how to finish.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import signal
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from .atomic import PathTooLong
from .clipfiles import NO_DECODER, VIDEO_SUFFIXES, VOLUME_SUFFIXES, find_inputs, input_kind, read_input, video_decoder
from .common import (
    CliError, Progress, command_settings, flat_map_notes, input_preprocessing, model_errors, parse_classes,
    result_arrays, say,
)  # fmt: skip
from .distributed import Processes, start_processes
from ..core.loop import ProgressCallback
from ..core.settings import Settings
from ..engine.explain import Explanation, explain
from ..engine.flat import unwarned
from ..engine.inputs import Targets
from ..eval.gradcam import grad_cam
from ..models.source import ExplainableModel, ModelSource
from .imagefiles import IMAGE_SUFFIXES, ImageReadError, upright_size
from .runfolder import INDEX, ConfigMismatch, FolderBusy, RunFolder, image_source, is_run_folder, output_clash
from .runlocalization import (
    BASELINE_ARRAY, BASELINE_FIELD, MISSING_SHOWN, LocalizationError, RunLocalization, write_summary,
)  # fmt: skip
from ..viz import CLIP_FRAME_MS, apply_heatmap, montage, save_clip_gif

# a write that fails for want of space: the run stops (every later write would fail alike)
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
KILLED_READS = 2  # an image that killed the process this often while it was read fails (a kill -9 may be one)
BROKEN_SHOWN = 3  # broken images named at the start; the rest are counted
RUN_FOLDERS_SHOWN = 3  # other runs' output folders left out of the data, named at the start
CHECKS_SHOWN_AFTER = 2.0  # seconds: checking the records of finished images shows progress when it takes longer
# the records of finished images are written together, after a batch, once this long since the last
# commit or this many images: a crash loses at most their work, and the durable writes cost once a
# second instead of several milliseconds an image
COMMIT_SECONDS = 1.0
COMMIT_IMAGES = 256


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure, on a GPU or the CPU: a smaller batch may fit."""
    kinds = tuple(
        kind for kind in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if kind
    )
    if isinstance(error, kinds):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class LoadedImage:
    name: str  # the path relative to the data folder
    rgb: np.ndarray  # (H, W, 3) in [0, 1], for overlays; (D, H, W, 3) for a clip or a volume
    tensor: torch.Tensor  # (3, H, W), the model input; (C, D, H, W) for a clip or a volume
    save: bool  # False: finished before, in the batch only so that the batch is the same as ever
    source: Optional[dict[str, Any]] = None  # what the image file was when read (runfolder.image_source)
    size: Optional[tuple[int, int]] = None  # the picture's upright (width, height), read to score its maps


@dataclass
class Tally:
    """What this process did so far."""

    done: int = 0
    failed: int = 0
    planned: int = 0  # images this process was to explain
    uncommitted: int = 0  # images written whose records wait for the next commit (not in done or failed)
    flat: int = 0  # maps that came back flat (each also marked in its index row)
    flat_note: Optional[str] = None  # the first flat-map warning, shown once

    @property
    def left(self) -> int:
        return self.planned - self.done - self.failed

    @property
    def finished(self) -> int:
        """The images explained so far, committed or not: what the progress shows."""
        return self.done + self.failed + self.uncommitted


class Runner:
    """Explains batches of images and writes each one's outputs; one per process."""

    def __init__(
        self, folder: RunFolder, data_dir: Path, model: ExplainableModel, targets: Targets, settings: Settings,
        batch_size: int, overlays: bool, tally: Tally, localization: Optional[RunLocalization] = None,
        baseline: Optional[str] = None, kind: Optional[str] = "image", axis: str = "axial",
    ) -> None:  # fmt: skip
        self.folder = folder
        self.data_dir = data_dir
        self.model = model
        self.targets = targets
        self.settings = settings
        self.limit = batch_size  # the batch size, halved for good after an out-of-memory error
        self.overlays = overlays
        self.tally = tally
        self.localization = localization  # score each map against these annotations
        self.baseline = baseline  # "gradcam": its maps beside L2-CAF's, at the same layer and targets
        self.progress: Optional[Progress] = None  # images finished of this process's, once it has some
        self.kind = kind  # the inputs' --input-kind (None: videos and volumes by suffix)
        self.axis = axis  # the slices of a volume's overlay montage
        self.committed_at = time.monotonic()

    def check_settings(self) -> None:
        """One iteration on a blank image, so settings explain rejects (a target beyond the classes,
        a mode the output does not allow) stop the run at once instead of failing every image."""
        preprocessing = self.model.preprocessing
        size, depth = preprocessing.size, (preprocessing.frames,) if preprocessing.takes_clips else ()
        channels = (self.model.in_channels or 3) if preprocessing.takes_clips else 3
        blank = torch.zeros(1, channels, *depth, size, size, dtype=self.model.dtype, device=self.model.device)
        try:
            with unwarned():  # a blank image gives a flat map: no warning, and no search for a better layer
                explain(self.model.model, blank, self.model.layer, self.targets, settings=replace(self.settings, max_iter=1))
        except (ValueError, TypeError, RuntimeError) as error:
            raise CliError(f"the model cannot be explained with these options ({error}): check --layer, --mode "
                           "and --classes") from None
        if self.baseline is not None:
            try:
                self._baseline_maps(blank, None)
            except (ValueError, TypeError, RuntimeError) as error:
                raise CliError(f"--baseline {self.baseline} does not run at layer {self.model.layer!r} ({error}): "
                               "pick a convolutional --layer, or leave --baseline out") from None

    def explain_batch(self, names: list[str], unfinished: set[str]) -> None:
        """Explain a batch of images (paths relative to the data folder) and save those in `unfinished`."""
        batch = []
        for name in names:
            source = image_source(self.data_dir / name) if name in unfinished else None  # before it is read
            try:
                rgb, tensor = self._read(name, name in unfinished)
                scored = self.localization is not None and name in unfinished
                size = upright_size(self.data_dir / name) if scored else None
            except ImageReadError as error:
                if name in unfinished:
                    self._fail(name, str(error), source)
            else:
                batch.append(LoadedImage(name, rgb, tensor, save=name in unfinished, source=source, size=size))
        start = 0
        while start < len(batch):  # after an out-of-memory error, in smaller parts
            part = batch[start : start + self.limit]
            self._explain_part(part)
            start += len(part)

    def _read(self, name: str, unfinished: bool) -> tuple[np.ndarray, torch.Tensor]:
        """Decode and resize an input.  One to save is marked meanwhile: an input that twice killed the
        process there (out of memory) fails at once instead of killing every rerun."""
        if not unfinished:
            return self._read_input(name)
        if self.folder.killed_reads(name) >= KILLED_READS:
            self.folder.reading_path(name).unlink(missing_ok=True)  # --retry-failed starts the count again
            raise ImageReadError(
                f"the process was killed {KILLED_READS} times while it read and resized image {name!r} (out of "
                "memory?); --retry-failed tries it again"
            )
        try:
            with self.folder.reading(name):
                return self._read_input(name)
        except OSError as error:  # writing or removing the marker: the output folder's storage
            raise _cannot_write(error, self.folder.root) from None

    def _read_input(self, name: str) -> tuple[np.ndarray, torch.Tensor]:
        return read_input(self.data_dir / name, self.model.preprocessing, self.kind, self.model.in_channels)

    def _explain_part(self, batch: list[LoadedImage]) -> None:
        """Explain and save a batch.  Out of memory: halve it (and every later batch), down to one
        image.  Another error: explain its images one by one, so only the image that causes it fails."""
        if not any(item.save for item in batch):
            return
        try:
            images = torch.stack([item.tensor for item in batch]).to(self.model.device, self.model.dtype)
            with flat_map_notes(self._note_flat):
                explanation = explain(self.model.model, images, self.model.layer, self.targets, settings=self.settings,
                                      progress=self._under_way(batch))  # fmt: skip
            baseline = self._baseline_maps(images, explanation.targets) if self.baseline is not None else None
        except Exception as error:
            out_of_memory = is_out_of_memory(error)
            message = f"{type(error).__name__}: {error}"
        else:
            for index, item in enumerate(batch):
                if item.save:
                    self._save_or_stop(item, explanation, index, baseline)
            return
        # outside the except clause the traceback, and the tensors its frames hold, are released
        images = None
        _free_memory()
        if len(batch) == 1:
            reason = ("out of memory with this image alone: " if out_of_memory else "") + message
            self._fail(batch[0].name, reason, batch[0].source)
            return
        if out_of_memory:
            self.limit = min(self.limit, (len(batch) + 1) // 2)
            say(f"out of memory with a batch of {len(batch)} images: going on with batches of {self.limit}")
        start = 0
        while start < len(batch):
            part = batch[start : start + (self.limit if out_of_memory else 1)]
            self._explain_part(part)
            start += len(part)

    def _baseline_maps(self, images: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
        """The baseline's (N, T, H, W) maps at the run's layer, for L2-CAF's targets."""
        return grad_cam(self.model.model, images, self.model.layer, targets).maps.float()

    def _under_way(self, batch: list[LoadedImage]) -> Optional[ProgressCallback]:
        """What the solver's share of the batch's work moves: the progress of the images it will save."""
        if self.progress is None:
            return None
        progress, finished, saved = self.progress, self.tally.finished, sum(item.save for item in batch)
        return lambda share: progress.update(finished, share * saved)

    def _note_flat(self, message: str) -> None:
        if self.tally.flat_note is None:
            self.tally.flat_note = message
            say(f"caffast: warning: {message} (such maps are marked \"flat\" in index.jsonl)")

    def _save_or_stop(
        self, item: LoadedImage, explanation: Explanation, index: int, baseline: Optional[torch.Tensor]
    ) -> None:
        try:
            self._save(item, explanation, index, baseline)
        except OSError as error:  # the output folder's storage, not the image: the run stops
            raise _cannot_write(error, self.folder.root) from None

    def _save(self, item: LoadedImage, explanation: Explanation, index: int, baseline: Optional[torch.Tensor]) -> None:
        """The image's arrays, then its overlays, then its record (written by the next commit), which
        marks it finished."""
        folder = self.folder
        arrays = result_arrays(explanation, index)
        targets = arrays["targets"]
        if baseline is not None:
            arrays[BASELINE_ARRAY[self.baseline]] = baseline[index].detach().cpu().numpy()
        top1, probabilities = _prediction(explanation.output, index)
        try:
            scores = self._score(item, arrays, targets.tolist(), top1)
        except LocalizationError as error:
            self._fail(item.name, str(error), item.source)
            return
        result = folder.write_result(item.name, arrays)
        rows = []
        for column, target in enumerate(targets.tolist()):
            row = {
                "image": item.name,
                "target": target,
                "status": "done",
                "iterations": int(explanation.iterations[index, column]),
                "loss": float(explanation.loss[index, column]),
                "objective": float(explanation.objective[index, column]),
                "gradient_norm": float(explanation.gradient_norm[index, column]),
                "flat": bool(explanation.flat[index, column]),
                "result": folder.relative(result),
            }
            if top1 is not None:
                row["top1"] = top1
                row["probability"] = float(probabilities[target]) if 0 <= target < len(probabilities) else None
            row.update(scores[column])
            if self.overlays:
                specific = explanation.mode == "specific"
                path = folder.overlay_path(item.name, target if specific else None)
                heat = explanation.maps[index, column].float().cpu().numpy()
                symmetric = explanation.map == "signed"
                clip = False
                if item.rgb.ndim == 3:
                    picture = apply_heatmap(item.rgb, heat, alpha=0.6, symmetric=symmetric)
                else:  # a clip's frames, or a volume's slices along the run's axis
                    clip = input_kind(self.data_dir / item.name, self.kind) != "volume"
                    picture = montage(item.rgb, heat, "axial" if clip else self.axis, symmetric=symmetric)
                folder.write_output(path, lambda file: picture.save(file, format="PNG"))
                row["overlay"] = folder.relative(path)
                if clip:  # and the map over the clip, as caffast explain animates it
                    gif = path.with_suffix(".gif")
                    draw = lambda file: save_clip_gif(item.rgb, heat, file, CLIP_FRAME_MS, symmetric=symmetric)  # noqa: E731
                    folder.write_output(gif, draw)
                    row["overlay_gif"] = folder.relative(gif)
            rows.append(row)
        folder.write_record(item.name, rows, item.source)
        self.tally.uncommitted += 1
        self._report()

    def _score(
        self, item: LoadedImage, arrays: dict[str, np.ndarray], targets: list[int], top1: Optional[int]
    ) -> list[dict[str, Any]]:
        """Per target, the index row fields of the protocol's records of its maps, L2-CAF's and the
        baseline's (runlocalization's docstring lists them); none without annotations."""
        if self.localization is None or item.size is None:
            return [{} for _ in targets]
        maps = {"localization": arrays["maps"]}
        if self.baseline is not None:
            maps[BASELINE_FIELD[self.baseline]] = arrays[BASELINE_ARRAY[self.baseline]]
        scores = self.localization.score(item.name, item.size, self.model.preprocessing, maps, targets, top1)
        if scores is None:  # the annotations do not cover the image
            return [dict.fromkeys(maps) for _ in targets]
        shared = {"image_size": list(item.size), "objects": scores.objects}
        return [{**shared, **{field: records[column] for field, records in scores.records.items()}}
                for column in range(len(targets))]  # fmt: skip

    def _fail(self, name: str, error: str, source: Optional[dict[str, Any]]) -> None:
        """Record the image as failed (by the next commit); its `source` lets a rerun explain it again
        once the file is replaced."""
        self.folder.write_record(name, [{"image": name, "target": None, "status": "failed", "error": error}], source)
        self.tally.uncommitted += 1
        self._report()

    def commit(self, due: bool = False) -> None:
        """Write the records of the images explained since the last commit, once their files are
        durable (RunFolder.commit), and count them; with `due`, only when COMMIT_SECONDS or
        COMMIT_IMAGES have passed since the last one."""
        waited = time.monotonic() - self.committed_at
        if due and waited < COMMIT_SECONDS and self.tally.uncommitted < COMMIT_IMAGES:
            return
        try:
            with STOP_SIGNALS.held():  # records written are images counted
                for rows in self.folder.commit():
                    if rows[0]["status"] == "done":
                        self.tally.done += 1
                    else:
                        self.tally.failed += 1
                    self.tally.flat += sum(row.get("flat", False) for row in rows)
                    self.tally.uncommitted -= 1
        except OSError as error:
            raise _cannot_write(error, self.folder.root) from None
        self.committed_at = time.monotonic()

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Commit when the block ends, also on an error or a signal: the files written so far are
        whole and need not be redone.  A commit that fails then leaves the error that ended the block.
        No image is read after it: the reading marker's file goes too."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(CliError):
                self.commit()
            raise
        finally:
            self.folder.end_reads()
        self.commit()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress.update(self.tally.finished)


def _prediction(output: torch.Tensor, index: int) -> tuple[Optional[int], np.ndarray]:
    """The model's top-1 class for image `index` and its class probabilities (softmax); (None, empty)
    when the output is not one score per class."""
    if output.dim() != 2:
        return None, np.zeros(0)
    scores = output[index].detach().float().cpu()
    return int(scores.argmax()), torch.softmax(scores.double(), dim=0).numpy()


def _cannot_write(error: OSError, root: Path) -> CliError:
    """The error that stops the run when the output folder cannot be written: every later write
    would fail alike, and the images are not to blame."""
    full = _disk_full(error, root)
    if full is not None:
        return full
    if isinstance(error, PathTooLong):
        return CliError(f"cannot write the outputs of an image: {error.strerror}; nothing is recorded for it")
    blocked = error.errno in (errno.EEXIST, errno.ENOTDIR)  # a file where a folder goes
    fix = "move away the file that stands where a folder goes" if blocked else f"make {root} writable"
    return CliError(f"cannot write {error.filename or root} ({error.strerror or error}); nothing is recorded for "
                    f"the image: {fix} and run the same command again to finish")  # fmt: skip


def _disk_full(error: OSError, root: Path) -> Optional[CliError]:
    """The error that stops the run when a write failed for want of space, else None."""
    if error.errno not in DISK_FULL:
        return None
    return CliError(f"the disk is full: cannot write {error.filename or root} ({error.strerror}); free space on "
                    f"the disk that holds {root} and run the same command again to finish")  # fmt: skip


@dataclass
class RunSummary:
    done: int
    failed: int
    skipped: int  # finished by an earlier run
    seconds: float
    index: Path
    rows: int
    flat: int = 0  # maps of this run that came back flat
    localization: Optional[str] = None  # with --annotations: the table of the whole folder's scores
    unit: str = "images"  # "inputs" for clips and volumes

    def __str__(self) -> str:
        rate = (self.done + self.failed) / max(self.seconds, 1e-9)
        flat = f", {self.flat} of their maps flat (marked \"flat\" in the index)" if self.flat else ""
        table = f"\n{self.localization}" if self.localization else ""
        return (
            f"{self.done} {self.unit} done{flat}, {self.failed} failed, {self.skipped} skipped (finished before) "
            f"in {self.seconds:.1f} s ({rate:.2f} {self.unit}/s)\nindex: {self.index} ({self.rows} rows){table}"
        )


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run (a KeyboardInterrupt, so nothing takes it for a failure)."""

    def __init__(self, number: int) -> None:
        super().__init__(signal.Signals(number).name)
        self.number = number


class RunStopped(Exception):
    """The run stopped on a signal: the message says what was done and how to finish; exit 128 + signal."""

    def __init__(self, message: str, number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + number


class StopSignals:
    """SIGINT and SIGTERM raise Stop in the main thread while `installed`; a second one acts as before.
    Within `held` (a record and its count) a signal waits for the end of the block."""

    NUMBERS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._holding = False
        self._waiting: Optional[int] = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in self.NUMBERS}

        def stop(number: int, frame: Any) -> None:
            for each, handler in previous.items():
                signal.signal(each, handler)
            if self._holding:
                self._waiting = number
            else:
                raise Stop(number)

        for number in self.NUMBERS:
            signal.signal(number, stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                raise Stop(waiting)


STOP_SIGNALS = StopSignals()


def run_dataset(args: argparse.Namespace) -> Optional[RunSummary]:
    """The `caffast run` command; returns the summary on rank 0 (None on the other ranks)."""
    started = time.perf_counter()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        problem = "is not a folder" if data_dir.exists() else "does not exist"
        raise CliError(f"data folder {str(data_dir)!r} {problem}: pass the folder that holds the images")
    if Path(args.out).resolve() == data_dir.resolve():
        raise CliError("--out is the data folder itself: pass another folder for the outputs (a subfolder is fine)")
    if is_run_folder(data_dir):
        raise CliError(f"data folder {str(data_dir)!r} holds the outputs of a caffast run, not images to explain: "
                       "pass the folder of the images")
    tally = Tally()
    rank = ""
    with STOP_SIGNALS.installed():
        try:
            processes = start_processes(args.device, timedelta(seconds=args.rank_timeout))
            rank = f" on rank {processes.rank}" if processes.world_size > 1 else ""
            try:
                return _run(args, data_dir, processes, started, tally)
            finally:
                processes.stop()
        except Stop as stop:
            seconds = time.perf_counter() - started
            raise RunStopped(
                f"interrupted by {stop}{rank} after {seconds:.1f} s: {tally.done} images done, {tally.failed} "
                f"failed, {tally.left} left (finished images are kept); run the same command again to finish",
                stop.number,
            ) from None


def _images(data_dir: Path, folder: RunFolder, kind: Optional[str] = "image") -> list[str]:
    """The inputs of `kind` under the data folder (clipfiles.find_inputs), sorted; none is an error,
    and so are videos without a decoder to read them."""
    earlier_runs: list[str] = []
    images = find_inputs(data_dir, kind, exclude=folder.root, run_folders=earlier_runs)
    if earlier_runs:
        shown = ", ".join(earlier_runs[:RUN_FOLDERS_SHOWN]) + (" ..." if len(earlier_runs) > RUN_FOLDERS_SHOWN else "")
        say(f"left out {len(earlier_runs)} caffast output folders inside {data_dir}: {shown}")
    if not images:
        sought = {
            "image": f"looked for {' '.join(IMAGE_SUFFIXES)}, any case",
            "frames": f"looked for subfolders holding {' '.join(IMAGE_SUFFIXES)} files, each one clip",
            "video": f"looked for {' '.join(VIDEO_SUFFIXES)}, any case",
            "volume": f"looked for {' '.join(VOLUME_SUFFIXES)}, any case",
        }.get(kind or "", f"looked for videos ({' '.join(VIDEO_SUFFIXES)}) and volumes ({' '.join(VOLUME_SUFFIXES)}); "
                           "a folder of frame folders needs --input-kind frames")  # fmt: skip
        what = "images" if kind == "image" else "inputs"
        raise CliError(f"no {what} in {str(data_dir)!r} or its subfolders ({sought})")
    if kind != "frames" and video_decoder() is None and any(name.lower().endswith(VIDEO_SUFFIXES) for name in images):
        raise CliError(f"{str(data_dir)!r} holds videos and {NO_DECODER}")
    return images


def _say_missing(missing: list[str]) -> None:
    """Name the images the annotations do not cover: they are explained, not scored."""
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN]) + (" ..." if len(missing) > MISSING_SHOWN else "")
        say(f"{len(missing)} images have no annotation and are explained but not scored: {shown}")


def _plan(
    folder: RunFolder, images: list[str], config: dict[str, Any], retry_failed: bool, quiet: bool
) -> tuple[list[str], list[str]]:
    """All the images and the unfinished ones, after claiming the output folder for `config` (call it
    holding the folder's lock).  Says which images had broken outputs or changed, and are explained again."""
    folder.claim(config)
    clash = output_clash(images, folder.folds_case())
    if clash is not None:
        first, second, output = clash
        raise CliError(
            f"images {first!r} and {second!r} would both write {str(folder.root / output)!r} (letter case aside, "
            "where the disk ignores it, or as a file and as a folder): rename one of them, or move it to "
            "another folder"
        )
    checking = Progress(len(images), "checking earlier outputs", quiet=quiet, delay=CHECKS_SHOWN_AFTER)
    pending, broken = folder.pending(images, retry_failed, checking.update)
    checking.end()
    if broken:
        named = [f"{image} ({problem})" for image, problem in list(broken.items())[:BROKEN_SHOWN]]
        more = f" and {len(broken) - BROKEN_SHOWN} more" if len(broken) > BROKEN_SHOWN else ""
        say(f"{len(broken)} images had broken outputs or changed, and are explained again: {', '.join(named)}{more}")
    return images, pending


def _batches(images: list[str], pending: list[str], size: int) -> list[list[str]]:
    """Batch k holds images [k size, (k + 1) size) of the sorted list, whatever is finished: a resumed
    run computes the batches of an uninterrupted one.  Batches with nothing left to do are left out."""
    unfinished = set(pending)
    batches = [images[start : start + size] for start in range(0, len(images), size)]
    return [batch for batch in batches if not unfinished.isdisjoint(batch)]


def _run(
    args: argparse.Namespace, data_dir: Path, processes: Processes, started: float, tally: Tally
) -> Optional[RunSummary]:
    settings, targets = command_settings(args), parse_classes(args.classes)
    source = ModelSource(args.arch, args.weights)
    kind = _input_kind(args, source)
    with model_errors():
        model = source.explainable(args.layer, processes.device(args.device), getattr(torch, args.dtype))
    model = replace(model, preprocessing=input_preprocessing(args, model.preprocessing))
    localization = RunLocalization.load(args.annotations, args.threshold) if args.annotations else None
    if args.threshold is not None and localization is None:
        raise CliError("--threshold sets where the CAM protocol cuts the maps of --annotations: pass --annotations "
                       "PATH too, or leave --threshold out")
    baseline_arrays = (BASELINE_ARRAY[args.baseline],) if args.baseline else ()
    folder = RunFolder(Path(args.out), data_dir, baseline_arrays)
    runner = Runner(folder, data_dir, model, targets, settings, args.batch_size, args.overlays, tally, localization,
                    args.baseline, kind, args.axis)  # fmt: skip
    runner.check_settings()
    config = {
        "data": str(data_dir.resolve()),
        "arch": args.arch,
        "weights": model.source.weights_identity(),
        "weights_source": model.source.weights_origin(),
        "layer": model.layer,
        "dtype": args.dtype,
        "input": model.preprocessing.record(),
        "explain": {**settings.to_record(), "targets": targets},
        "overlays": args.overlays,
    }
    # written only when used, so that the folders of runs without them still resume
    if source.takes_clips:
        config["inputs"] = kind  # None: videos and volumes, each by its suffix
        config["axis"] = args.axis
    if localization is not None:
        config["annotations"] = localization.record()
    if args.baseline:
        config["baseline"] = args.baseline
    with contextlib.ExitStack() as lock:
        # rank 0 locks and checks the folder; every rank gets its verdict, so a refusal stops all alike
        verdict: Any = None
        if processes.first:
            try:
                images = _images(data_dir, folder, kind)
                if localization is not None:
                    _say_missing(localization.missing(images))
                lock.enter_context(folder.locked(args.wait, say))  # held until the run ends
                verdict = _plan(folder, images, config, args.retry_failed, args.quiet)
            except (CliError, ConfigMismatch, FolderBusy) as error:
                verdict = str(error)
            except OSError as error:
                verdict = f"cannot use the output folder {str(folder.root)!r}: {error}"
        verdict = processes.share(verdict)
        if isinstance(verdict, str):
            raise CliError(verdict)
        return _explain_plan(args, runner, processes, *verdict, started)


@contextlib.contextmanager
def _collector_skips_the_start() -> Iterator[None]:
    """Leave the objects made before the images are explained (torch's, the model, its fx plan) out of
    the cyclic garbage collector's scans meanwhile: they live as long as the run, and rescanning them
    took a third of each explain call on a small model.  Objects someone else froze stay frozen."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _explain_plan(
    args: argparse.Namespace, runner: Runner, processes: Processes, images: list[str], pending: list[str],
    started: float,
) -> Optional[RunSummary]:  # fmt: skip
    """Explain the unfinished images in the batches of the plan, in turns with the other ranks."""
    folder, tally = runner.folder, runner.tally
    skipped = len(images) - len(pending)
    unfinished = set(pending)
    batches = _batches(images, pending, args.batch_size)
    mine = batches[processes.rank :: processes.world_size]
    tally.planned = sum(name in unfinished for batch in mine for name in batch)
    if processes.first and not args.quiet:
        on = f" on {processes.world_size} processes" if processes.world_size > 1 else ""
        say(f"{len(images)} {_unit(runner.kind)}: {skipped} finished before, {len(pending)} to explain{on}")
    if tally.planned:
        rank = processes.rank if processes.world_size > 1 else None
        runner.progress = Progress(tally.planned, "explaining", _unit(runner.kind), quiet=args.quiet, rank=rank)

    # every rank takes part in every round, so that each waits for the others one batch at most; each
    # commits its last images before the last check-in, so that rank 0 indexes them
    problem, stopped = "", 0
    turns = -(-len(batches) // processes.world_size)
    with runner.committing(), _collector_skips_the_start():
        for turn in range(turns):
            try:
                if turn < len(mine):
                    runner.explain_batch(mine[turn], unfinished)
                runner.commit(due=turn < turns - 1)
            except CliError as error:
                problem = str(error)
            stopped = processes.check_in(bool(problem))
            if stopped:
                break
    if runner.progress is not None:
        runner.progress.end()
    if problem:
        raise CliError(problem)
    if stopped:
        raise CliError(f"{stopped} of the {processes.world_size} processes stopped on an error (see their message); "
                       "run the same command again to finish")
    done, failed, flat = processes.total([tally.done, tally.failed, tally.flat])
    if not processes.first:
        return None
    indexing = Progress(len(images), "writing the index", quiet=args.quiet, delay=CHECKS_SHOWN_AFTER)
    rows, unfinished_now = folder.write_index(images, indexing.update)
    indexing.end()
    if unfinished_now:
        say(
            f"{len(unfinished_now)} images have no whole outputs (removed or damaged while the run went on?), "
            f"e.g. {unfinished_now[0]}: run the same command again to explain them"
        )
    table = None
    if runner.localization is not None:
        try:
            table = write_summary(folder.root, folder.read_index(), runner.localization.record())
        except OSError as error:
            raise _cannot_write(error, folder.root) from None
    seconds = time.perf_counter() - started
    return RunSummary(done, failed, skipped, seconds, folder.root / INDEX, rows, flat, table, _unit(runner.kind))


def _unit(kind: Optional[str]) -> str:
    return "images" if kind == "image" else "inputs"


def _input_kind(args: argparse.Namespace, source: ModelSource) -> Optional[str]:
    """What the run's inputs are: --input-kind, else images for a model that takes images and videos
    and volumes (each by its suffix, None) for one that takes clips; refused where the model cannot
    take them, and so are annotations (boxes on images) with clips."""
    kind = getattr(args, "input_kind", None)
    if kind is None:
        kind = None if source.takes_clips else "image"
    if source.takes_clips and kind == "image":
        raise CliError(f"--input-kind image: --arch {args.arch} takes clips; pass videos, .npy volumes or folders "
                       "of frames (--input-kind frames), or a model that takes images (--arch resnet50, ...)")  # fmt: skip
    if not source.takes_clips and kind != "image":
        raise CliError(f"--input-kind {kind}: --arch {args.arch} takes images; pass a model that takes clips "
                       "(--arch r3d_18, mc3_18 or r2plus1d_18), or leave --input-kind out for images")  # fmt: skip
    if source.takes_clips and getattr(args, "annotations", None):
        raise CliError("--annotations scores maps against boxes on images; clips and volumes have none: leave "
                       "--annotations out")  # fmt: skip
    return kind
