"""Atomic file writes: a reader, or a run started again after a kill, sees a whole file or none.

Each file is written to a temporary file in its own directory, flushed and fsynced, then renamed over
the destination with os.replace (atomic on POSIX and Windows within one file system); the directory is
fsynced too, so a rename that returned survives a power cut.  A killed writer leaves at most a hidden
``.caffast-*.tmp`` file (a short name, so any destination name that fits fits its temporary too),
which `remove_temporaries` deletes and nothing ever reads.  Files get the permissions the umask gives
a new file (0644 under the usual 022), not the temporary's private 0600.  An OSError names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import numpy as np

NAME_MAX = 255  # bytes in a file name, on Linux, macOS and Windows file systems alike
NAME_HASH_CHARACTERS = 16
TEMPORARY_PREFIX = ".caffast-"
TEMPORARY_SUFFIX = ".tmp"

PathLike = Union[str, os.PathLike]
# the time stamp of every member of an .npz, so equal arrays give equal bytes
NPZ_TIME = (1980, 1, 1, 0, 0, 0)


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # elsewhere it can only be read by setting it: briefly the strictest one
    os.umask(umask)
    return umask


def _fsync_directory(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened; the rename is durable
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def write_atomically(path: PathLike, write: Callable[[BinaryIO], Any], durable: bool = True) -> None:
    """Create or replace `path` with what `write(file)` writes to a binary file object.  `durable`:
    on the disk before this returns (fsync), so that it outlives a crash of the machine too; a file
    whose loss in such a crash costs nothing can skip the two fsyncs (milliseconds each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600
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


def write_json(path: PathLike, value: Any, durable: bool = True) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n", durable)


def write_npz(path: PathLike, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez writes, with fixed time stamps: the same arrays give the same bytes."""

    def write(file: BinaryIO) -> None:
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_TIME), "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    write_atomically(path, write)


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
