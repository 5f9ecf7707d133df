"""Atomic file writes: a reader, or a run started again after a kill, sees a whole file or none.

Each file is written to a temporary file in its own directory, then renamed over the destination with
os.replace (atomic on POSIX and Windows within one file system).  A durable write also fsyncs the
file before the rename and the directory after it, so a rename that returned survives a power cut.
Files written with durable=False are whole after a kill (the page cache keeps them) but may be lost,
or found empty, after a crash of the machine; `make_durable` then makes many of them durable at once,
which costs about what one fsync does where one fsync per file would cost milliseconds each.  A killed
writer leaves at most a hidden ``.caffast-*.tmp`` file (a short name, so any destination name that
fits fits its temporary too), which `remove_temporaries` deletes and nothing ever reads.  A path
longer than the system opens is refused before anything is written (PathTooLong), with the fix in
its message.  Files get the permissions the umask gives a new file (0644 under the usual 022): the
temporary is created with them.  An OSError names the file.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

import numpy as np

NAME_MAX = 255  # bytes in a file name, on Linux, macOS and Windows file systems alike
PATH_MAX = 4096  # bytes in a path the system opens, its final NUL included (Linux); pathconf says where it can
NAME_HASH_CHARACTERS = 16
TEMPORARY_PREFIX = ".caffast-"
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_RANDOM = 8  # hexadecimal characters between them

PathLike = Union[str, os.PathLike]
# the time stamp of every member of an .npz, so equal arrays give equal bytes
NPZ_TIME = (1980, 1, 1, 0, 0, 0)


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened; the rename is durable
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _syncfs() -> Optional[Callable[[int], int]]:
    """Linux's syncfs(fd): everything written to the file system of `fd` to the disk, in one call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


SYNCFS = _syncfs()


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable ones only
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_durable(paths: Iterable[PathLike]) -> None:
    """Make files written with durable=False, and their renames, durable: one syncfs per file system
    that holds them where Linux offers it, else an fsync of each file and of each directory holding
    one.  Call it before anything that counts on them (a record naming them) is written."""
    files = [Path(path) for path in paths]
    folders = list(dict.fromkeys(path.parent for path in files))
    if SYNCFS is not None:
        synced: set[int] = set()
        for folder in folders:
            device = os.stat(folder).st_dev
            if device in synced:
                continue
            descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if SYNCFS(descriptor) != 0:
                    number = ctypes.get_errno()
                    raise OSError(number, os.strerror(number), os.fspath(folder))
            finally:
                os.close(descriptor)
            synced.add(device)
        return
    for path in files:
        try:
            _fsync_file(path)
        except OSError as error:
            raise OSError(error.errno, error.strerror, os.fspath(path)) from error
    for folder in folders:
        _fsync_directory(folder)


def fitting_name(start: str, rest: str) -> str:
    """The file name `start` + `rest`, with `start` shortened where the whole would pass the NAME_MAX
    bytes a file system takes: its beginning, "~" and a hash of it, so long names that begin alike
    keep apart and `rest` (what the file holds) stays readable."""
    if len(os.fsencode(start + rest)) <= NAME_MAX:
        return start + rest
    digest = hashlib.sha256(os.fsencode(start)).hexdigest()[:NAME_HASH_CHARACTERS]
    room = max(NAME_MAX - len(os.fsencode(rest)) - len(digest) - 1, 0)
    beginning = os.fsencode(start)[:room].decode("utf-8", "ignore")  # a character cut in two is dropped
    return f"{beginning}~{digest}{rest}"


class PathTooLong(OSError):
    """A path longer than the system opens; the message names its length, the limit and the fix."""


def path_limit(path: PathLike) -> int:
    """The most bytes a path may have where `path` lies, its final NUL included: what the system's
    pathconf says for the nearest folder that exists, else PATH_MAX."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        return int(os.pathconf(existing, "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return PATH_MAX


def _shown(path: str, ends: int = 60) -> str:
    """A path of thousands of bytes, as its beginning and its end."""
    return path if len(path) <= 2 * ends + 3 else f"{path[:ends]}...{path[-ends:]}"


def check_path_length(
    path: PathLike, fix: str = "choose a shorter output folder (--out), or shorter names for the inputs and their folders"
) -> None:
    """Refuse a path the system would not open (a folder deep enough passes its limit with names
    that each fit NAME_MAX), before anything is written, with `fix` in the message; the temporary
    written beside the file must fit too."""
    encoded = os.fsencode(path)
    temporary = len(TEMPORARY_PREFIX) + TEMPORARY_RANDOM + len(TEMPORARY_SUFFIX)
    longest = len(encoded) + max(temporary - len(os.fsencode(os.path.basename(path))), 0)
    limit = path_limit(path)
    if longest >= limit:
        raise PathTooLong(
            errno.ENAMETOOLONG,
            f"the path {_shown(os.fspath(path))!r} is {longest} bytes long, and the system opens paths of at "
            f"most {limit - 1} bytes: {fix}",
        )


def temporary_name() -> str:
    """A new random name of the kind `remove_temporaries` deletes and nothing reads."""
    return f"{TEMPORARY_PREFIX}{os.urandom(TEMPORARY_RANDOM // 2).hex()}{TEMPORARY_SUFFIX}"


def _create_temporary(folder: Path) -> tuple[int, str]:
    """A new temporary file in `folder`, open for writing: (descriptor, path).  Created with mode 0666,
    so the system applies the umask as to any new file (mkstemp's 0600 would need a chmod, and reading
    the umask, for every file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        temporary = os.path.join(folder, temporary_name())
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:  # taken (one in four billion): another name
            continue


def write_atomically(path: PathLike, write: Callable[[BinaryIO], Any], durable: bool = True) -> None:
    """Create or replace `path` with what `write(file)` writes to a binary file object.  `durable`:
    on the disk before this returns (fsync), so that it outlives a crash of the machine too; a file
    whose loss in such a crash costs nothing, or one that `make_durable` will make durable with
    others, can skip the two fsyncs (milliseconds each)."""
    check_path_length(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.filename is None:  # a failed write names no file: name it
            raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from error
        raise
    if durable:
        _fsync_directory(path.parent)


def write_text(path: PathLike, text: str, durable: bool = True) -> None:
    write_atomically(path, lambda file: file.write(text.encode("utf-8")), durable)


def json_text(value: Any) -> str:
    """A JSON file's text as write_json writes it."""
    return json.dumps(value, indent=1, sort_keys=True) + "\n"


def write_json(path: PathLike, value: Any, durable: bool = True) -> None:
    write_text(path, json_text(value), durable)


def write_npz(path: PathLike, arrays: dict[str, np.ndarray], durable: bool = True) -> None:
    """What np.savez writes, with fixed time stamps: the same arrays give the same bytes.  The archive
    is put together in memory and written at once: zipfile's many small writes and seeks on the file
    cost more than the arrays of a map."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_TIME), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    write_atomically(path, lambda file: file.write(buffer.getbuffer()), durable)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of write_atomically's temporaries."""
    return name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX)


def remove_temporaries(root: PathLike, recursive: bool = True) -> int:
    """Delete the temporaries a killed writer left in `root` (and below it when `recursive`); returns
    how many.  Call it only while nothing writes there."""
    removed = 0
    for directory, subdirectories, names in os.walk(root):
        if not recursive:
            subdirectories.clear()
        for name in names:
            if is_temporary(name):
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    continue
                removed += 1
    return removed
