"""What the commands share: the one-line error, progress reports, model errors, images, and the
flags of explain's settings with the Settings they give.

The commands (caffast.apps.cli) and dataset runs (caffast.apps.runner) both build on this module,
and neither imports the other.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TextIO, get_args

import numpy as np
import torch

from ..core.settings import CHOICES, SETTINGS_FIELDS, TYPES, SettingError, Settings
from ..engine.explain import Explanation
from ..engine.flat import FlatMapWarning
from ..models.preprocessing import IMAGENET, Preprocessing
from ..models.source import ModelSourceError, WeightsError
from .imagefiles import ImageReadError, read_image

SETTING_FLAGS = "setting_flags"  # a command's arguments hold its settings' flags by setting under this name


class CliError(Exception):
    """A problem with the command's input: printed as one line, exit code 2."""


_progress_open = False  # a progress bar is on the last line of stderr, without its newline


@contextmanager
def flat_map_notes(note: Callable[[str], None]) -> Iterator[None]:
    """The FlatMapWarnings raised inside go to `note` (a line for the user); other warnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FlatMapWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, FlatMapWarning):
            note(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


PROGRESS_LINE_SECONDS = 10.0  # off a terminal, a progress line at most this often (and one at the end)
BAR_REDRAW_SECONDS = 0.2  # on a terminal, the bar is redrawn at most this often
BAR_WIDTH = 30
RATE_AFTER_SECONDS = 1.0  # the rate and the time left are shown once this much has passed (before, they are noise)


class Progress:
    """Work done out of a known total, on stderr, for the commands that take long (explain, run,
    evaluate, demo): one object, however the work is counted.

    On a terminal a bar redrawn in place: units done, rate and time left.  Elsewhere (a log file, a
    pipe, a job scheduler) and under torchrun, where the ranks share one stream, a plain line every
    PROGRESS_LINE_SECONDS and one at the end, prefixed with the rank under torchrun.  `quiet`: nothing.
    `delay`: nothing before that many seconds, and nothing at all for work done sooner (a pass that
    is usually instant, such as checking earlier outputs).

    `update(done, under_way)` takes the units finished and how much of the units in hand is done
    (the solver's share of a batch times its images), so the bar moves within a long batch; the
    rate and the time left count both, and the work shown never goes back.
    """

    def __init__(self, total: int, label: str, unit: str = "images", *, quiet: bool = False,
                 rank: Optional[int] = None, delay: float = 0.0) -> None:  # fmt: skip
        self.total, self.label, self.unit = total, label, unit
        self.quiet = quiet
        self.stream: TextIO = sys.stderr
        self.prefix = "" if rank is None else f"[rank {rank}] "
        self.bar = rank is None and _is_terminal(self.stream)
        self.started = time.monotonic()
        self.delay = delay
        self.shown_at = self.started  # off a terminal, the first line comes one period after the start
        self.shown = False  # anything reported yet
        self.done = 0
        self.work = 0.0
        self.last_width = 0
        # the bar's width: what the terminal leaves beside the label and the counts (about 45 characters)
        columns = shutil.get_terminal_size((80, 24)).columns
        self.width = max(10, min(BAR_WIDTH, columns - len(label) - len(unit) - 45))
        self.ended = False
        if self.bar and not delay:
            self._draw(self.started)

    def update(self, done: int, under_way: float = 0.0) -> None:
        """`done` units finished, and `under_way` units' worth of work done on the units in hand."""
        if self.ended:
            return
        moved = done != self.done
        # never back: the images of a batch the solver finished are done work while they are saved
        self.done, self.work = done, max(self.work, min(float(self.total), done + max(under_way, 0.0)))
        if done >= self.total:
            self.end()
            return
        now = time.monotonic()
        if now - self.started < self.delay:
            return
        if self.bar and (moved or not self.shown or now - self.shown_at >= BAR_REDRAW_SECONDS):
            self._draw(now)
        elif not self.bar and now - self.shown_at >= PROGRESS_LINE_SECONDS:
            self._line(now)

    def end(self) -> None:
        """The last report: the bar completed (with its newline), or the closing line."""
        if self.ended:
            return
        self.ended = True
        if self.delay and not self.shown:
            return
        now = time.monotonic()
        if self.bar:
            self._draw(now, final=True)
        else:
            self._line(now, final=True)

    def _rate_and_ending(self, now: float, final: bool) -> tuple[str, str]:
        """"1.7 images/s" and "0:42 left" (or at the end "in 1:05")."""
        elapsed = now - self.started
        if final:
            return f"{_rate(self.work / max(elapsed, 1e-9))} {self.unit}/s", f"in {_duration(elapsed)}"
        if self.work <= 0 or elapsed < RATE_AFTER_SECONDS:
            return f"-- {self.unit}/s", "--:-- left"
        rate = self.work / elapsed
        return f"{_rate(rate)} {self.unit}/s", f"{_duration((self.total - self.work) / rate)} left"

    def _draw(self, now: float, final: bool = False) -> None:
        global _progress_open
        self.shown_at, self.shown = now, True
        if self.quiet:
            return
        rate, ending = self._rate_and_ending(now, final)
        counts = f"{self.done}/{self.total} {self.unit}  {rate}  {ending}"
        filled = int(self.width * self.work / max(self.total, 1))
        text = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {counts}"
        padding = " " * max(self.last_width - len(text), 0)  # over the end of a longer line drawn before
        self.last_width = len(text)
        print(f"\r{text}{padding}", end="\n" if final else "", file=self.stream, flush=True)
        _progress_open = not final

    def _line(self, now: float, final: bool = False) -> None:
        self.shown_at, self.shown = now, True
        if self.quiet:
            return
        rate, ending = self._rate_and_ending(now, final)
        share = 100 * self.work / max(self.total, 1)
        say(f"{self.prefix}{self.label}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate}, {ending}")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _rate(per_second: float) -> str:
    """Two significant digits at least: 0.043, 1.7, 12, 340."""
    return f"{per_second:.2g}" if per_second < 10 else f"{per_second:.0f}"


def _duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def say(message: str) -> None:
    """A line on stderr, below a progress bar left unfinished."""
    global _progress_open
    print(("\n" if _progress_open else "") + message, file=sys.stderr, flush=True)
    _progress_open = False


def result_arrays(explanation: Explanation, index: int) -> dict[str, np.ndarray]:
    """Image `index`'s results as the commands save them (caffast run's result files, explain's .npz):
    per target, the filter and the map (T, H, W) in float32, and the iterations, loss, objective,
    gradient norm and class (T,)."""

    def array(tensor: torch.Tensor) -> np.ndarray:
        return tensor[index].detach().cpu().numpy()

    return {
        "filters": array(explanation.filters.float()),
        "maps": array(explanation.maps.float()),
        "iterations": array(explanation.iterations),
        "loss": array(explanation.loss.float()),
        "objective": array(explanation.objective),
        "gradient_norm": array(explanation.gradient_norm),
        "targets": array(explanation.targets),
    }


def load_image(path: str, preprocessing: Preprocessing = IMAGENET) -> tuple[np.ndarray, torch.Tensor]:
    """The image file as the model sees it (the reference's ImageNet preprocessing by default).
    Returns the picture as an (H, W, 3) float array in [0, 1] and the normalized (3, H, W) tensor."""
    try:
        return read_image(path, preprocessing)
    except ImageReadError as error:
        raise CliError(str(error)) from None


def weights_error(weights: str, arch: str, error: Exception) -> CliError:
    """The one-line error for weights that cannot be loaded into `arch`: refused for safety, not a
    state dict, or the state dict of another architecture."""
    text = " ".join(str(error).split())
    blocked = re.search(r"GLOBAL (\S+) whose module (\S+) is blocked", text)
    if isinstance(error, pickle.UnpicklingError) and blocked:
        return CliError(
            f"{weights!r} was not loaded: it tries to run code ({blocked.group(1)}) when it is loaded, which a "
            "weights file never needs; do not use it. Save weights with torch.save(model.state_dict(), PATH)"
        )
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if isinstance(error, pickle.UnpicklingError) and refused:
        return CliError(
            f"{weights!r} is refused for safety: besides tensors it holds a Python object ({refused.group(1)}), "
            f"and loading one can run code. If you trust the file, convert it once to a plain state dict: "
            f"python -c \"import torch; "
            f"m = torch.load('{weights}', weights_only=False); torch.save(getattr(m, 'state_dict', lambda: m)(), "
            f"'weights.pth')\" and pass --weights weights.pth"
        )
    if isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in text:
        shown = text if len(text) <= 300 else text[:300] + " ..."
        return CliError(f"the weights in {weights!r} do not fit --arch {arch} ({shown}): pass the weights of that "
                        "architecture, or the --arch they were trained for")  # fmt: skip
    if isinstance(error, (FileNotFoundError, ValueError)):
        return CliError(f"{text} (or pass --weights random for an untrained model)")
    # torch's own reason, without its advice on weights_only (which does not apply): the first
    # sentence, or for its safe unpickler the error it names
    unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    detail = (unpickler.group(1) if unpickler else text.split(". ")[0])[:150]
    return CliError(f"{weights!r} is not a PyTorch state-dict file ({type(error).__name__}: {detail}): save one "
                    "with torch.save(model.state_dict(), PATH)")  # fmt: skip


@contextmanager
def model_errors() -> Iterator[None]:
    """A caffast.models.source.ModelSource's errors inside, as the commands' one-line errors."""
    try:
        yield
    except WeightsError as error:
        raise weights_error(error.weights, error.arch, error.cause) from None
    except ModelSourceError as error:
        raise CliError(str(error)) from None


def parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"classes must be comma-separated integers, e.g. 207,323; got {text!r}") from None
    if not classes:
        raise CliError(f"classes {text!r} name no class: pass comma-separated indices such as 207,323, or leave the "
                       "flag out for each image's top-1 class")  # fmt: skip
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise CliError(f"classes {text!r} name {', '.join(map(str, repeated))} more than once: list each class once")
    if any(c < 0 for c in classes):
        raise CliError(f"classes are indices from 0 on; got {text!r}")
    return classes


def _check(args: argparse.Namespace, name: str, valid: Callable[[Any], bool], wanted: str) -> None:
    value = getattr(args, name, None)
    if value is not None and not valid(value):
        dash = "_" if args.command in ("class_oblivious", "class_specific") else "-"
        raise CliError(f"--{name.replace('_', dash)} must be {wanted}, got {value!r}")


def check_arguments(args: argparse.Namespace) -> None:
    """Every setting of a command that can be wrong on its own, before anything is loaded or written."""
    command_settings(args)
    _check(args, "batch_size", lambda v: v >= 1, "at least 1")
    _check(args, "scenes", lambda v: v >= 1, "at least 1")
    _check(args, "rank_timeout", lambda v: math.isfinite(v) and v > 0, "a positive number of seconds")
    parse_classes(getattr(args, "classes", None) or getattr(args, "cls_logits", None))
    if getattr(args, "device", None) is not None:
        check_device(args.device)
        if getattr(args, "backend", None) is not None:
            check_backend(args.backend, args.device)


def check_device(name: str) -> None:
    """A device this machine has: cpu, cuda (with a GPU), cuda:N (N below the GPU count)..."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown device {name!r}: pass cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CliError(f"--device {name}: this machine has no usable CUDA GPU; pass --device cpu")
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        first_line = str(error).splitlines()[0]
        raise CliError(f"--device {name} cannot be used here ({first_line}); pass --device cpu") from None


def check_backend(backend: str, device: str) -> None:
    """The backend can compute on the device (triton needs a CUDA GPU, cpp the CPU)."""
    from ..backends import resolve_backend

    try:
        resolve_backend(backend, torch.device(device))
    except (ValueError, RuntimeError) as error:
        raise CliError(f"--backend {backend} with --device {device}: {error}; or pass --backend auto") from None


def check_output_folder(path: str, flag: str = "--out") -> None:
    """`path` is a folder, or can be made one, that this process may write to; nothing is created."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(path).absolute() else f"is inside {str(existing)!r}, a file"
        raise CliError(f"{flag} {path!r} {where}, not a folder: pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path!r}: {str(existing)!r} is read-only for this user: pass a folder you can write to")


def add_setting_flags(
    command: argparse.ArgumentParser, names: Sequence[str], defaults: Settings, *, dash: str = "-",
    alternative: Optional[tuple[Settings, str]] = None, aliases: Mapping[str, Sequence[str]] = {},
) -> None:
    """Flags for the settings `names`, made from Settings' fields: the help beside each field, the
    values of a choice's Literal type, and the defaults of `defaults`.

    `alternative` is (settings, the flag that selects them): where they differ from `defaults` the
    flag's default is None, for the command to fill in (`take_defaults`).  `aliases` are other
    spellings of a flag.  `command_settings` reads the flags back.
    """
    flags = dict(command.get_default(SETTING_FLAGS) or {})
    for name in names:
        default = getattr(defaults, name)
        shown = f"default: {_shown(default)}"
        if alternative is not None and getattr(alternative[0], name) != default:
            default, shown = None, f"{shown}, or {_shown(getattr(alternative[0], name))} with {alternative[1]}"
        kind = {"choices": CHOICES[name]} if name in CHOICES else {"type": _value_type(name)}
        flags[name] = f"--{name.replace('_', dash)}"
        command.add_argument(flags[name], *aliases.get(name, ()), dest=name, default=default,
                             help=f"{SETTINGS_FIELDS[name].metadata['help']}; {shown}", **kind)  # fmt: skip
    command.set_defaults(**{SETTING_FLAGS: flags})


def take_defaults(args: argparse.Namespace, settings: Settings) -> None:
    """The setting flags a command left at None (`add_setting_flags`' alternative) take `settings`' values."""
    for name in getattr(args, SETTING_FLAGS, {}):
        if getattr(args, name) is None:
            setattr(args, name, getattr(settings, name))


def command_settings(args: argparse.Namespace) -> Settings:
    """The Settings of a command's setting flags (its other settings at their defaults); a refused
    value is the command's one-line error, naming the setting by its flag.

    The one place the flags become caffast.explain's settings: a setting with a flag reaches every
    command, and `caffast run`'s config.json (which refuses to mix results of different values).
    """
    flags = getattr(args, SETTING_FLAGS, {})
    try:
        return Settings(**{name: getattr(args, name) for name in flags})
    except SettingError as error:
        raise CliError(f"{flags[error.setting]} {error.requirement}") from None


def _value_type(name: str) -> type:
    """The type a numeric setting's flag converts its text to (int for Optional[int])."""
    hint = TYPES[name]
    return next(kind for kind in get_args(hint) or (hint,) if kind is not type(None))


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)
