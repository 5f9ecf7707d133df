"""Image files: finding them in a folder tree and turning one into a model input.

Every mode Pillow opens is read at its real range, in the orientation its EXIF tag gives:

- 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV) through Pillow's conversion to RGB; with an alpha
  channel (RGBA, LA, PA, a palette with a transparent colour) composited onto white, as viewers show it;
- 16-bit grayscale (I;16 and its byte orders) divided by 65535;
- 32-bit integer grayscale (I): values in [0, 65535] are 16-bit data (Pillow reads some 16-bit
  files so) and are divided by 65535, other non-negative values by 2**31 - 1, and values with
  negatives are mapped from the whole int32 range to [0, 1];
- 32-bit float grayscale (F): values in [0, 1] are taken as they are, others min-max scaled to
  [0, 1] (a float image has no fixed range); NaN or Inf is an error.

Grayscale is repeated over the three channels.

The work per image is bounded: a picture of more than MAX_PIXELS pixels, or longer than MAX_ASPECT_RATIO
times its width (or wider than that times its height), is refused before it is decoded, since
resizing its shorter side to the model's size would make it enormous (a 1 x 8000 strip becomes
2 048 000 x 256).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..models.preprocessing import IMAGENET, Preprocessing
from .runfolder import is_run_folder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

PathLike = Union[str, os.PathLike]

# a hidden file `caffast explain` leaves in its output folder, so that no run takes its overlays for images
EXPLAIN_MARKER = ".caffast-explain"
MAX_PIXELS = 100_000_000  # 10 000 x 10 000: about 300 MB decoded
MAX_ASPECT_RATIO = 100  # the longer side over the shorter


class ImageReadError(Exception):
    """An image file that is missing or cannot be decoded; the message names the file and the cause."""


def find_images(
    root: PathLike, exclude: Optional[PathLike] = None, run_folders: Optional[list[str]] = None
) -> list[str]:
    """The image files under `root`, recursively, as '/'-separated paths relative to it, sorted.

    An image is a file whose suffix is one of IMAGE_SUFFIXES, in any letter case; hidden files and
    folders (a leading '.') are left out, and so are the folder `exclude` and the output folders of
    any caffast run or explain command (an output folder inside `root` must not feed its pictures
    back in); the latter are appended to `run_folders`, relative to `root`.
    """
    skipped = os.path.realpath(exclude) if exclude is not None else None
    found = []
    for directory, folders, names in os.walk(root):
        relative = Path(directory).relative_to(root)
        kept = []
        for folder in folders:
            path = os.path.join(directory, folder)
            if folder.startswith(".") or os.path.realpath(path) == skipped:
                continue
            if is_run_folder(path) or os.path.isfile(os.path.join(path, EXPLAIN_MARKER)):
                if run_folders is not None:
                    run_folders.append((relative / folder).as_posix())
                continue
            kept.append(folder)
        folders[:] = kept
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append((relative / name).as_posix())
    return sorted(found)


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _unit_range(values: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit grayscale image's values in [0, 1] (the module docstring says how)."""
    values = values.astype(np.float64)
    if mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("the float image holds NaN or infinite values")
        low, high = values.min(), values.max()
        if low >= 0 and high <= 1:
            return values
        return (values - low) / (high - low) if high > low else np.clip(values, 0, 1)
    if mode == "I" and values.min() < 0:
        return (values - _INT32_MIN) / (_INT32_MAX - _INT32_MIN)
    if mode == "I" and values.max() > 65535:
        return values / _INT32_MAX
    return values / 65535


def _decoded(image: "Image.Image") -> "Image.Image":
    """The picture upright, as 8-bit RGB or, for high-bit grayscale, one float channel in [0, 1]."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_MODES:
        return Image.fromarray(_unit_range(np.asarray(image), image.mode).astype(np.float32), mode="F")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and image.has_transparency_data):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _check_size(path: PathLike, width: int, height: int) -> None:
    """Refuse a picture whose decoding or resizing would take far more memory than a photo's."""
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"image {os.fspath(path)!r} is {width} x {height} pixels, more than the {MAX_PIXELS:,} "
                             "caffast reads: scale it down first")  # fmt: skip
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise ImageReadError(
            f"image {os.fspath(path)!r} is {width} x {height} pixels, more than {MAX_ASPECT_RATIO} times longer "
            "than wide: resized to the model's input it would take huge memory; crop it first"
        )


# EXIF orientations that turn the picture a quarter turn: its upright width is the stored height
QUARTER_TURNS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112


def upright_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of the picture as read_image reads it, upright, from the file's header alone:
    boxes drawn on a picture are in these pixels.  Raises ImageReadError as read_image does."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            width, height = opened.size
            turned = opened.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS
    except Exception as error:  # as in read_image: decoders raise many kinds
        raise ImageReadError(f"cannot read image {os.fspath(path)!r}: {error}") from None
    return (height, width) if turned else (width, height)


def read_image(path: PathLike, preprocessing: Preprocessing = IMAGENET) -> tuple[np.ndarray, torch.Tensor]:
    """The picture as the model sees it: (H, W, 3) float32 in [0, 1] after the resize, and the
    normalized (3, H, W) float32 tensor.  Raises ImageReadError for a missing or undecodable file."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    if not os.path.isfile(path):
        raise ImageReadError(f"image {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            _check_size(path, *opened.size)
            image = _decoded(opened)
    except ImageReadError:
        raise
    except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageReadError(f"cannot read image {os.fspath(path)!r}: {error}") from None
    size = preprocessing.size
    interpolation = TF.InterpolationMode(preprocessing.interpolation)
    if preprocessing.crop:
        image = TF.resize(image, math.floor(size / preprocessing.crop_pct), interpolation)
        image = TF.center_crop(image, [size, size])
    else:
        image = TF.resize(image, [size, size], interpolation)
    tensor = TF.to_tensor(image).expand(3, -1, -1).contiguous()
    return tensor.permute(1, 2, 0).numpy(), TF.normalize(tensor, list(preprocessing.mean), list(preprocessing.std))
