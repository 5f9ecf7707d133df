"""The output folder of `caffast run`: its layout, its configuration guard, and what is finished.

    OUT/config.json              the settings the results depend on (written once, at the first start)
    OUT/results/REL.npz          per image: filters, maps (T, H, W) float32, iterations, loss, objective,
                                 gradient_norm, targets (T,); with --baseline gradcam also gradcam_maps
    OUT/overlays/REL.TARGET.png  per image and target, with --overlays ("oblivious" in place of TARGET)
    OUT/overlays/REL.TARGET.gif  beside it for a clip: the map over its frames
    OUT/records/REL.json         per image: its index rows; written once its files are durable, so it
                                 marks the image finished
    OUT/records/REL.reading      while the image is decoded and resized: left only by a killed process
    OUT/index.jsonl              every image's rows in image order, rebuilt from the records at the end
    OUT/summary.json             with --annotations: the localization scores (caffast.apps.runlocalization)
    OUT/.lock                    held (flock) by the run using the folder; holds its pid and host

REL is the image's path relative to the data folder, suffix included (a.png and a.jpg stay apart);
where a name with its suffix would be too long for the file system, its last part is shortened and
ends in a hash of it (`atomic.fitting_name`).
Every file is written atomically, so a kill leaves whole files; an image is finished exactly when its
record exists and is whole: it parses, and the result and overlay files it names exist (the result
loads, with every array).  Records are written in groups (`commit`): the result and overlay files of
the images since the last commit are made durable together (atomic.make_durable), then their records
are written and made durable, so a record never names a file that a crash of the machine could lose,
and a kill or a crash loses at most the images since the last commit.  A rerun skips finished images
and explains again the others, those whose outputs were removed or damaged since, and images whose
file changed since (its record keeps the file's size, time and sha256).  A failed image gets a record
too (status "failed" and the error), so a rerun does not loop on it; `pending(..., retry_failed=True)`
hands it out again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np

from ..core.settings import complete_record
from ..models.zoo import file_sha256
from .atomic import (
    check_path_length, fitting_name, json_text, make_durable, remove_temporaries, temporary_name, write_atomically,
    write_json, write_npz, write_text,
)  # fmt: skip

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is not locked there
    fcntl = None  # type: ignore[assignment]

CONFIG = "config.json"
INDEX = "index.jsonl"
LOCK = ".lock"
RESULT_ARRAYS = ("filters", "maps", "iterations", "loss", "objective", "gradient_norm", "targets")
STATUSES = ("done", "failed")


RUN_SETTINGS = ("data", "arch", "explain")  # among the keys of every run's config.json


def is_run_folder(path: os.PathLike) -> bool:
    """Whether `path` holds the outputs of a caffast run: a config.json with a run's settings, or the
    results and records folders of one whose config.json was lost."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and all(key in config for key in RUN_SETTINGS):
        return True
    return (path / "results").is_dir() and (path / "records").is_dir()


class ConfigMismatch(Exception):
    """OUT already holds results of other settings; the message names them and the fix."""


class FolderBusy(Exception):
    """Another process holds OUT's lock; the message names it and the fix."""


def image_source(path: Path) -> Optional[dict[str, Any]]:
    """What an input file is: its size, modification time and sha256; None when it cannot be read.
    A folder of frames: its files' total size, latest time, and the sha256 of their names and hashes."""
    try:
        if os.path.isdir(path):
            files = sorted((entry for entry in os.scandir(path) if entry.is_file() and not entry.name.startswith(".")),
                           key=lambda entry: entry.name)
            stats = [entry.stat() for entry in files]
            listing = "".join(f"{entry.name}\t{file_sha256(entry.path)}\n" for entry in files)
            return {"size": sum(stat.st_size for stat in stats), "mtime_ns": max((stat.st_mtime_ns for stat in stats),
                    default=0), "sha256": hashlib.sha256(listing.encode()).hexdigest()}  # fmt: skip
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    except OSError:
        return None


def _output_name(image: str, suffix: str) -> str:
    """The image's relative path with `suffix`, its last part shortened to fit the file system."""
    folder, _, name = image.rpartition("/")
    fitting = fitting_name(name, suffix)
    return f"{folder}/{fitting}" if folder else fitting


_OVERLAY_NAME = re.compile(r"(.*)\.(?:\d+|oblivious)\.(?:png|gif)")


def output_clash(images: list[str], fold_case: bool) -> Optional[tuple[str, str, str]]:
    """Two images whose outputs would be one file, or a file where the other's folder goes: (image,
    image, the output path), or None.  With `fold_case` (an output disk that ignores letter case, as
    macOS's and Windows' do) names that differ only in case are one."""
    fold: Callable[[str], str] = str.casefold if fold_case else str
    files: dict[str, str] = {}  # output path -> its image
    folders: dict[str, str] = {}  # a folder the outputs need -> an image that needs it
    names = {fold(image): image for image in images}
    for image in images:
        kinds = (("results", ".npz"), ("records", ".json"), ("records", ".reading"))
        outputs = [f"{kind}/{_output_name(image, suffix)}" for kind, suffix in kinds]
        for output in outputs:
            key = fold(output)
            other = files.get(key, folders.get(key, image))
            if other != image:
                return other, image, output
            files[key] = image
        for folder in [f"{kind}/{image}" for kind in ("results", "records", "overlays")]:
            parts = folder.split("/")
            for end in range(2, len(parts)):
                key = fold("/".join(parts[:end]))
                other = files.get(key)
                overlay = _OVERLAY_NAME.fullmatch(key) if key.startswith(fold("overlays/")) else None
                if overlay is not None:  # the name of an overlay of another image
                    other = names.get(overlay.group(1)[len("overlays/") :], other)
                if other is not None and other != image:
                    return other, image, "/".join(parts[:end])
                folders.setdefault(key, image)
    return None


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _with_recorded_defaults(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A config.json of an older caffast, with the settings it did not record set as it ran them
    (caffast.core.settings.complete_record).  Where its named weights came from it did not record
    either, and that cannot be recovered: such a folder takes today's source."""
    explain_settings = stored.get("explain")
    if isinstance(explain_settings, dict):
        stored = {**stored, "explain": complete_record(explain_settings)}
    if "weights_source" not in stored and "weights_source" in current:
        stored = {**stored, "weights_source": current["weights_source"]}
    return stored


class RunFolder:
    """Paths and files of one output folder; every write is atomic.  The outputs and records of the
    images since the last `commit` are held back: call it every so often, and before the process ends."""

    def __init__(self, root: Path, data: Optional[Path] = None, extra_arrays: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.data = None if data is None else Path(data)  # the images: records of changed ones do not count
        self.arrays = RESULT_ARRAYS + tuple(extra_arrays)  # a result file lacking one is broken (a baseline's maps)
        self.unsynced: list[Path] = []  # outputs written since the last commit, not yet durable
        self.uncommitted: dict[str, dict[str, Any]] = {}  # image: its record, written by the next commit
        self.spare_marker: Optional[Path] = None  # the reading marker between two reads (`reading`)

    def result_path(self, image: str) -> Path:
        return self.root / "results" / _output_name(image, ".npz")

    def overlay_path(self, image: str, target: Optional[int]) -> Path:
        return self.root / "overlays" / _output_name(image, f".{'oblivious' if target is None else target}.png")

    def record_path(self, image: str) -> Path:
        return self.root / "records" / _output_name(image, ".json")

    def folds_case(self) -> bool:
        """Whether the output folder's disk takes names that differ only in letter case for one."""
        probe = self.root / ".caffast-case-probe"
        write_text(probe, "", durable=False)
        try:
            return (self.root / ".CAFFAST-CASE-PROBE").exists()
        finally:
            probe.unlink(missing_ok=True)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # one run at a time

    @contextlib.contextmanager
    def locked(self, wait: bool, waiting: Callable[[str], None] = lambda message: None) -> Iterator[None]:
        """Hold OUT/.lock exclusively (flock) while the block runs; the lock goes with the process, even
        on kill -9.  Another holder: FolderBusy naming it, or with `wait` a `waiting(message)` and a
        wait until it ends.  A folder of other files is refused first, without writing the lock there."""
        self._refuse_foreign()
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        descriptor = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "pid unknown"
                if not wait:
                    raise FolderBusy(
                        f"{self.root} is in use by another caffast run ({holder}): let it finish, or pass "
                        "--wait to start when it ends"
                    ) from None
                waiting(f"waiting for the other caffast run using {self.root} ({holder}) to end")
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(descriptor)

    def _refuse_foreign(self) -> None:
        if not self.root.is_dir() or (self.root / CONFIG).exists():
            return
        if any(path.name != LOCK for path in self.root.iterdir()):
            raise ConfigMismatch(
                f"{self.root} is not empty and holds no {CONFIG}, so it is not a caffast run folder (or its "
                "settings were lost): pass a new or empty --out"
            )

    # the configuration guard

    def claim(self, config: dict[str, Any]) -> None:
        """Write `config` at the first start; afterwards refuse any other configuration.

        Also removes the temporary files of a killed run: call it holding the lock (`locked`).
        """
        path = self.root / CONFIG
        config = json.loads(json.dumps(config))  # compare as it reads back: tuples become lists
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ConfigMismatch(
                    f"{path} cannot be read ({error}), so the results in {self.root} cannot be trusted: "
                    "pass another --out, or delete that folder to start over"
                ) from None
            differences = self._differences(_with_recorded_defaults(stored, config), config)
            if differences:
                raise ConfigMismatch(
                    f"{self.root} holds results of other settings ({'; '.join(differences)}): rerun with the "
                    "settings of its config.json to finish it, or pass another --out"
                )
        else:
            self._refuse_foreign()
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(path, config)
        remove_temporaries(self.root, recursive=False)
        for part in ("results", "overlays", "records"):
            remove_temporaries(self.root / part)

    @staticmethod
    def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
        before, now = _flatten(stored), _flatten(current)

        def shown(settings: dict[str, Any], key: str) -> str:
            return repr(settings[key]) if key in settings else "unset"

        return [
            f"{key} {shown(before, key)} there, {shown(now, key)} now"
            for key in sorted(set(before) | set(now))
            if key not in before or key not in now or before[key] != now[key]
        ]

    # what is finished

    def read_record(self, image: str) -> Optional[list[dict[str, Any]]]:
        """The index rows of a finished image, or None when it is not finished (or its outputs are broken)."""
        rows, _ = self.check_record(image)
        return rows

    def check_record(self, image: str) -> tuple[Optional[list[dict[str, Any]]], Optional[str]]:
        """(rows, None) for a finished image; (None, None) with no record; (None, what is wrong) when the
        record does not parse or a file it names is missing or does not load."""
        path = self.record_path(image)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as error:
            return None, f"its record {self.relative(path)} cannot be read ({error})"
        rows = record.get("rows") if isinstance(record, dict) and record.get("image") == image else None
        whole = isinstance(rows, list) and bool(rows)
        if not whole or not all(isinstance(row, dict) and row.get("status") in STATUSES for row in rows):
            return None, f"its record {self.relative(path)} is not one caffast wrote"
        done = [row for row in rows if row["status"] == "done"]
        problem = self._changed(image, record.get("source")) or (self._check_outputs(image, done) if done else None)
        return (None, problem) if problem else (rows, None)

    def _changed(self, image: str, source: Any) -> Optional[str]:
        """What changed in the image file since its record was written, or None.  Size and modification
        time unchanged count as unchanged; otherwise the content decides (a copy or a touch is not a
        change).  Records from before sources were kept, and images that are gone, count as unchanged."""
        if self.data is None or not isinstance(source, dict):
            return None
        now = image_source(self.data / image)
        if now is None or all(now[key] == source.get(key) for key in ("size", "mtime_ns")):
            return None
        return None if now["sha256"] == source.get("sha256") else "the image file changed since it was explained"

    def _check_outputs(self, image: str, rows: list[dict[str, Any]]) -> Optional[str]:
        """What is wrong with the result and overlay files of a finished image's `rows`, or None.  Every
        array of the result is read whole, which checks its CRC; only the targets are parsed (np.load
        parsing each array cost more than reading it)."""
        result = self.result_path(image)
        try:
            with zipfile.ZipFile(io.BytesIO(result.read_bytes())) as archive:  # zipfile reads in small pieces
                members = set(archive.namelist())
                missing = [name for name in self.arrays if f"{name}.npy" not in members]
                if missing:
                    return f"its result file {self.relative(result)} lacks {', '.join(missing)}"
                stored = {name: archive.read(f"{name}.npy") for name in self.arrays}
            targets = np.lib.format.read_array(io.BytesIO(stored["targets"]), allow_pickle=False)
        except FileNotFoundError:
            return f"its result file {self.relative(result)} is missing"
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            return f"its result file {self.relative(result)} does not load ({error})"
        if targets.tolist() != [row.get("target") for row in rows]:
            return f"its result file {self.relative(result)} holds other targets than its record"
        for row in rows:
            for kind in ("overlay", "overlay_gif"):
                if kind in row and not (self.root / str(row[kind])).is_file():
                    return f"its overlay {row[kind]} is missing"
        return None

    def pending(
        self, images: list[str], retry_failed: bool, checked: Callable[[int], None] = lambda count: None
    ) -> tuple[list[str], dict[str, str]]:
        """The images still to explain: those with no whole record, and with `retry_failed` the failed
        ones; and, among them, the images whose outputs are broken, with what is wrong.  `checked` is
        told how many images were checked so far (reading every result file takes a while)."""
        pending, broken = [], {}
        for count, image in enumerate(images, 1):
            rows, problem = self.check_record(image)
            checked(count)
            if problem:
                broken[image] = problem
            if rows is None or (retry_failed and any(row["status"] != "done" for row in rows)):
                pending.append(image)
        return pending, broken

    # writing an image's outputs: results and overlays first, the record once they are durable

    def write_output(self, path: Path, write: Callable[[BinaryIO], Any]) -> None:
        """A result or overlay file, made durable by the next commit."""
        write_atomically(path, write, durable=False)
        self.unsynced.append(path)

    def write_result(self, image: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.result_path(image)
        write_npz(path, arrays, durable=False)
        self.unsynced.append(path)
        return path

    def write_record(self, image: str, rows: list[dict[str, Any]], source: Optional[dict[str, Any]] = None) -> None:
        """The image's record, written by the next commit: its index rows, and what its file was
        (`image_source`) when read."""
        self.uncommitted[image] = {"image": image, "rows": rows, **({"source": source} if source is not None else {})}

    def commit(self) -> list[list[dict[str, Any]]]:
        """Make the outputs written since the last commit durable, then write the records held back and
        make them durable too; returns their rows.  A few milliseconds however many images it commits.
        What fails is held back still, for another try."""
        if not self.uncommitted and not self.unsynced:
            return []
        make_durable(self.unsynced)
        records = [self.record_path(image) for image in self.uncommitted]
        for path, record in zip(records, self.uncommitted.values()):
            write_json(path, record, durable=False)
        make_durable(records)
        rows = [record["rows"] for record in self.uncommitted.values()]
        self.unsynced, self.uncommitted = [], {}
        return rows

    def reading_path(self, image: str) -> Path:
        return self.root / "records" / _output_name(image, ".reading")

    def killed_reads(self, image: str) -> int:
        """How many processes were killed while they read `image` (its marker left behind)."""
        try:
            return int(json.loads(self.reading_path(image).read_text(encoding="utf-8"))["attempts"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    @contextlib.contextmanager
    def reading(self, image: str) -> Iterator[None]:
        """Mark `image` as being read while the block runs: only a process killed in the block (out of
        memory, or kill -9) leaves the marker, which counts the attempts so far.  The marker is not
        fsynced: a kill leaves it in the page cache, and a crash of the machine, which loses it, is no
        fault of the image.

        One file serves as the marker of every read, under a temporary's name between two reads (which
        nothing reads and a claim removes; `end_reads` removes it): it is written there, then renamed to
        the image's marker, and back after the read.  Creating a file, or emptying one, costs more than
        reading a small image on some disks; renaming one costs little."""
        path = self.reading_path(image)
        check_path_length(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = json_text({"image": image, "attempts": self.killed_reads(image) + 1})
        spare = self.spare_marker = self.spare_marker or self.root / "records" / temporary_name()
        descriptor = os.open(spare, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(descriptor, "wb") as file:  # no O_TRUNC: emptying a file first costs more than the write
            file.write(marker.encode("utf-8"))
            file.truncate()  # after the marker: the end of a longer one before
        os.replace(spare, path)
        self.spare_marker = None
        try:
            yield
        finally:
            try:
                os.replace(path, spare)
                self.spare_marker = spare
            except FileNotFoundError:  # removed meanwhile: the next read makes another
                pass

    def end_reads(self) -> None:
        """Remove the marker file kept between reads (`reading`); call it when no more images are read."""
        if self.spare_marker is not None:
            with contextlib.suppress(OSError):  # a temporary: the next claim removes it
                self.spare_marker.unlink(missing_ok=True)
            self.spare_marker = None

    def read_index(self) -> list[dict[str, Any]]:
        """The rows of index.jsonl, as the last run wrote it."""
        text = (self.root / INDEX).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_index(
        self, images: list[str], checked: Callable[[int], None] = lambda count: None
    ) -> tuple[int, list[str]]:
        """Rebuild index.jsonl from the whole records of `images`, in their order; returns the row
        count and the images left out for want of a whole record.  `checked` as for `pending`."""
        lines, unfinished = [], []
        for count, image in enumerate(images, 1):
            rows = self.read_record(image)
            checked(count)
            if rows is None:
                unfinished.append(image)
            lines += [json.dumps(row) for row in rows or []]
        write_text(self.root / INDEX, "".join(f"{line}\n" for line in lines))
        return len(lines), unfinished
