"""`caffast run`: explain every image of a folder tree into an output folder that never loses work.

The output folder (caffast.apps.runfolder) records each image once it is fully written, so a run killed
at any moment and started again with the same command finishes the rest and ends with the outputs of
an uninterrupted run.  Under torchrun every rank explains its share of the unfinished images
(every world_size-th, from its rank on) and rank 0 writes the index once all are done.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .atomic import write_atomically
from .common import CliError, default_layer, explain_options, load_model, show_progress
from .distributed import Processes, start_processes
from ..engine.explain import Explanation, explain
from .imagefiles import DEMO, IMAGE_SUFFIXES, IMAGENET, ImageReadError, Preprocessing, find_images, read_image
from .runfolder import INDEX, ConfigMismatch, RunFolder
from ..viz import apply_heatmap

DEMO_ARCH = "demo"
# "--weights random" must give the same model in every process and in every rerun
RANDOM_WEIGHTS_SEED = 0


@dataclass
class RunModel:
    """The model to explain, its breakpoint, the input it expects, and what its weights are."""

    model: nn.Module
    layer: str
    preprocessing: Preprocessing
    weights: str  # a name ("DEFAULT", "random", ...) or the sha256 of a weights file

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def weights_identity(weights: str) -> str:
    """What the results depend on: the content of a weights file (its sha256), else the name."""
    if not os.path.isfile(weights):
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _demo_model(weights: str) -> nn.Module:
    from ..eval.demo_model import DemoCNN, load_demo_model
    from ..models.zoo import load_state_dict

    if weights == "DEFAULT":
        return load_demo_model()
    model = DemoCNN()
    if weights != "random":
        if not os.path.isfile(weights):
            raise CliError(
                f"--arch demo takes --weights DEFAULT (the shipped weights), random, or a state-dict file; "
                f"{weights!r} is none of these"
            )
        try:
            model.load_state_dict(load_state_dict(DEMO_ARCH, weights))
        except (RuntimeError, ValueError) as error:
            raise CliError(f"{weights!r} does not fit the demo model: {error}") from None
    return model.eval()


def load_run_model(arch: str, weights: str, layer: Optional[str], device: str, dtype: torch.dtype) -> RunModel:
    """The torchvision architecture `arch`, or the shipped demo model for arch 'demo', in `dtype`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        if arch == DEMO_ARCH:
            model, preprocessing, layer = _demo_model(weights), DEMO, layer or "features"
        else:
            model, preprocessing, layer = load_model(arch, weights, "cpu"), IMAGENET, layer or default_layer(arch)
    try:
        model = model.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as error:
        raise CliError(f"cannot use device {device!r}: {error}") from None
    return RunModel(model, layer, preprocessing, weights_identity(weights))


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
    rgb: np.ndarray  # (H, W, 3) in [0, 1], for overlays
    tensor: torch.Tensor  # (3, H, W), the model input


class Runner:
    """Explains images in batches and writes each one's outputs; one per process."""

    def __init__(
        self, folder: RunFolder, data_dir: Path, model: RunModel, options: dict[str, Any], backend: str,
        batch_size: int, overlays: bool,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.data_dir = data_dir
        self.model = model
        self.options = options
        self.backend = backend
        self.limit = batch_size  # the batch size, halved for good after an out-of-memory error
        self.overlays = overlays
        self.done = 0
        self.failed = 0
        self._report: Callable[[], None] = lambda: None

    def check_settings(self) -> None:
        """One iteration on a blank image, so settings explain rejects (a target beyond the classes,
        a mode the output does not allow) stop the run at once instead of failing every image."""
        size = self.model.preprocessing.size
        blank = torch.zeros(1, 3, size, size, dtype=self.model.dtype, device=self.model.device)
        try:
            explain(self.model.model, blank, self.model.layer, backend=self.backend, **{**self.options, "max_iter": 1})
        except (ValueError, TypeError, RuntimeError) as error:
            raise CliError(f"the model cannot be explained with these options ({error}): check --layer, --mode "
                           "and --classes") from None

    def explain_all(self, names: list[str], progress_bar: bool) -> None:
        """Explain and save `names` (paths relative to the data folder), with a progress bar on stderr."""
        if progress_bar:
            self._report = lambda: show_progress(self.done + self.failed, len(names), "explaining")
        position = 0
        while position < len(names):
            chunk = names[position : position + self.limit]
            batch = []
            for name in chunk:
                try:
                    rgb, tensor = read_image(self.data_dir / name, self.model.preprocessing)
                except ImageReadError as error:
                    self._fail(name, str(error))
                else:
                    batch.append(LoadedImage(name, rgb, tensor))
            if batch:
                self._explain_batch(batch)
            position += len(chunk)

    def _explain_batch(self, batch: list[LoadedImage]) -> None:
        """Explain and save a batch.  Out of memory: halve it (and every later batch), down to one
        image.  Another error: explain its images one by one, so only the image that causes it fails."""
        try:
            images = torch.stack([item.tensor for item in batch]).to(self.model.device, self.model.dtype)
            explanation = explain(self.model.model, images, self.model.layer, backend=self.backend, **self.options)
        except Exception as error:
            out_of_memory = is_out_of_memory(error)
            message = f"{type(error).__name__}: {error}"
        else:
            for index, item in enumerate(batch):
                try:
                    self._save(item, explanation, index)
                except OSError as error:
                    self._fail(item.name, f"cannot write its outputs: {error}")
            return
        # outside the except clause the traceback, and the tensors its frames hold, are released
        images = None
        _free_memory()
        if len(batch) == 1:
            self._fail(batch[0].name, ("out of memory with this image alone: " if out_of_memory else "") + message)
            return
        if out_of_memory:
            self.limit = min(self.limit, (len(batch) + 1) // 2)
        start = 0
        while start < len(batch):
            part = batch[start : start + (self.limit if out_of_memory else 1)]
            self._explain_batch(part)
            start += len(part)

    def _save(self, item: LoadedImage, explanation: Explanation, index: int) -> None:
        """The image's arrays, then its overlays, then its record: the record marks it finished."""
        folder = self.folder

        def array(tensor: torch.Tensor) -> np.ndarray:
            return tensor[index].detach().cpu().numpy()

        targets = array(explanation.targets)
        result = folder.write_result(item.name, {
            "filters": array(explanation.filters.float()),
            "maps": array(explanation.maps.float()),
            "iterations": array(explanation.iterations),
            "loss": array(explanation.loss.float()),
            "objective": array(explanation.objective),
            "gradient_norm": array(explanation.gradient_norm),
            "targets": targets,
        })  # fmt: skip
        rows = []
        for column, target in enumerate(targets.tolist()):
            row = {
                "image": item.name,
                "target": target,
                "status": "done",
                "iterations": int(explanation.iterations[index, column]),
                "loss": float(explanation.loss[index, column]),
                "objective": float(explanation.objective[index, column]),
                "result": folder.relative(result),
            }
            if self.overlays:
                specific = explanation.mode == "specific"
                path = folder.overlay_path(item.name, target if specific else None)
                heat = explanation.maps[index, column].float().cpu().numpy()
                picture = apply_heatmap(item.rgb, heat, alpha=0.6, symmetric=explanation.map == "signed")
                write_atomically(path, lambda file: picture.save(file, format="PNG"))
                row["overlay"] = folder.relative(path)
            rows.append(row)
        folder.write_record(item.name, rows)
        self.done += 1
        self._report()

    def _fail(self, name: str, error: str) -> None:
        try:
            self.folder.write_record(name, [{"image": name, "target": None, "status": "failed", "error": error}])
        except OSError as write_error:
            raise CliError(
                f"cannot record {name!r} in {self.folder.root} ({write_error}); {error}: rename or move that image"
            ) from None
        self.failed += 1
        self._report()


@dataclass
class RunSummary:
    done: int
    failed: int
    skipped: int  # finished by an earlier run
    seconds: float
    index: Path
    rows: int

    def __str__(self) -> str:
        rate = (self.done + self.failed) / max(self.seconds, 1e-9)
        return (
            f"{self.done} images done, {self.failed} failed, {self.skipped} skipped (finished before) "
            f"in {self.seconds:.1f} s ({rate:.2f} images/s)\nindex: {self.index} ({self.rows} rows)"
        )


def run_dataset(args: argparse.Namespace) -> Optional[RunSummary]:
    """The `caffast run` command; returns the summary on rank 0 (None on the other ranks)."""
    started = time.perf_counter()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        problem = "is not a folder" if data_dir.exists() else "does not exist"
        raise CliError(f"data folder {str(data_dir)!r} {problem}: pass the folder that holds the images")
    if Path(args.out).resolve() == data_dir.resolve():
        raise CliError("--out is the data folder itself: pass another folder for the outputs (a subfolder is fine)")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    processes = start_processes(args.device)
    try:
        return _run(args, data_dir, processes, started)
    finally:
        processes.stop()


def _plan(folder: RunFolder, data_dir: Path, config: dict[str, Any], retry_failed: bool) -> tuple[list[str], list[str]]:
    """All the images and the unfinished ones, after claiming the output folder for `config`."""
    images = find_images(data_dir, exclude=folder.root)
    if not images:
        raise CliError(
            f"no images in {str(data_dir)!r} or its subfolders (looked for {' '.join(IMAGE_SUFFIXES)}, any case)"
        )
    folder.claim(config)
    return images, folder.pending(images, retry_failed)


def _run(args: argparse.Namespace, data_dir: Path, processes: Processes, started: float) -> Optional[RunSummary]:
    options = explain_options(args)
    model = load_run_model(args.arch, args.weights, args.layer, processes.device(args.device), getattr(torch, args.dtype))
    runner = Runner(RunFolder(Path(args.out)), data_dir, model, options, args.backend, args.batch_size, args.overlays)
    runner.check_settings()
    folder = runner.folder
    config = {
        "data": str(data_dir.resolve()),
        "arch": args.arch,
        "weights": model.weights,
        "layer": model.layer,
        "dtype": args.dtype,
        "input": asdict(model.preprocessing),
        "explain": options,
        "overlays": args.overlays,
    }

    # rank 0 checks the folder; every rank gets its verdict, so a refusal stops all of them alike
    images: list[str] = []
    verdict: Any = None
    if processes.first:
        try:
            images, pending = _plan(folder, data_dir, config, args.retry_failed)
            verdict = (pending, len(images) - len(pending))
        except (CliError, ConfigMismatch) as error:
            verdict = str(error)
        except OSError as error:
            verdict = f"cannot use the output folder {str(folder.root)!r}: {error}"
    verdict = processes.share(verdict)
    if isinstance(verdict, str):
        raise CliError(verdict)
    pending, skipped = verdict
    if processes.first:
        on = f" on {processes.world_size} processes" if processes.world_size > 1 else ""
        print(f"{len(pending) + skipped} images: {skipped} finished before, {len(pending)} to explain{on}",
              file=sys.stderr)  # fmt: skip
    problem = ""
    try:
        runner.explain_all(pending[processes.rank :: processes.world_size], progress_bar=processes.first)
    except CliError as error:  # the others must not wait for this rank at the end
        problem = str(error)

    # a collective: past it, every rank has written its records, or stopped on a problem
    done, failed, stopped = processes.total([runner.done, runner.failed, int(bool(problem))])
    if problem:
        raise CliError(problem)
    if stopped:
        raise CliError(f"{stopped} of the {processes.world_size} processes stopped on an error (see their message); "
                       "run the same command again to finish")
    if not processes.first:
        return None
    rows = folder.write_index(images)
    return RunSummary(done, failed, skipped, time.perf_counter() - started, folder.root / INDEX, rows)
