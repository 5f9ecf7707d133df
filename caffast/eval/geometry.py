"""Where an image's pixels land in the model input, so that boxes and masks follow the pixels.

The preprocessing is torchvision's, as caffast reads images (caffast.apps.imagefiles.read_image):
either the shorter side resized to S (the longer side truncated to an integer, as
``torchvision.transforms.functional.resize`` does) and a centre crop of C (``center_crop``: the
offset rounded half to even, a crop larger than the picture padded with zeros), or a plain resize to
(H, W).  Both resizes map continuous coordinates linearly (half-pixel centres, as bilinear and
bicubic filters sample), so a point x of the picture lands on ``x * resized / original - offset``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Union

import numpy as np

from .annotations import Box

__all__ = ["InputGeometry", "box_to_input", "mask_to_input", "preprocessing_geometry", "resize_crop_geometry",
           "resize_geometry"]  # fmt: skip

Size = tuple[int, int]


class ResizeSettings(Protocol):
    """What of caffast's Preprocessing (caffast.apps.imagefiles) places the pixels."""

    size: int
    crop: bool
    crop_pct: float


@dataclass(frozen=True)
class InputGeometry:
    """A picture of ``image_size`` resized to ``resized_size`` and cut to the ``input_size`` window
    whose top-left corner is at ``offset`` in the resized picture (negative where the crop pads).

    All sizes are (width, height); the offset is (left, top).
    """

    image_size: Size
    resized_size: Size
    offset: tuple[int, int]
    input_size: Size

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from picture pixels to resized pixels."""
        return self.resized_size[0] / self.image_size[0], self.resized_size[1] / self.image_size[1]


def _check_image_size(image_size: Size) -> tuple[int, int]:
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image_size must be a positive (width, height); got {tuple(image_size)}")
    return width, height


def _crop_offset(length: int, crop: int) -> int:
    """torchvision's center_crop along one axis: pad (crop - length) // 2 in front when the crop is
    larger, else start at round((length - crop) / 2), rounded half to even as Python's round."""
    return -((crop - length) // 2) if crop > length else int(round((length - crop) / 2.0))


def resize_crop_geometry(image_size: Size, resize: int, crop: Union[int, Size]) -> InputGeometry:
    """The shorter side resized to `resize`, then a centre crop of `crop` (an int, or (width, height))."""
    width, height = _check_image_size(image_size)
    crop_width, crop_height = (crop, crop) if isinstance(crop, int) else crop
    if resize < 1 or crop_width < 1 or crop_height < 1:
        raise ValueError(f"resize and crop must be positive; got resize {resize}, crop {crop}")
    if width <= height:
        resized = (resize, int(resize * height / width))
    else:
        resized = (int(resize * width / height), resize)
    offset = (_crop_offset(resized[0], crop_width), _crop_offset(resized[1], crop_height))
    return InputGeometry((width, height), resized, offset, (crop_width, crop_height))


def resize_geometry(image_size: Size, size: Size) -> InputGeometry:
    """A plain resize to `size`, given as (height, width) like torchvision's resize."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive (height, width); got {tuple(size)}")
    return InputGeometry(_check_image_size(image_size), (width, height), (0, 0), (width, height))


def preprocessing_geometry(image_size: Size, preprocessing: ResizeSettings) -> InputGeometry:
    """The geometry of caffast's Preprocessing: with crop, the shorter side resized to
    floor(size / crop_pct) and a size x size centre crop; without, a plain size x size resize."""
    size = preprocessing.size
    if preprocessing.crop:
        return resize_crop_geometry(image_size, math.floor(size / preprocessing.crop_pct), size)
    return resize_geometry(image_size, (size, size))


def box_to_input(box: Box, geometry: InputGeometry) -> Optional[Box]:
    """A box of the picture's pixels in the model input's pixels.

    The box is scaled with the picture and shifted by the crop, then clipped to the input; a box
    the crop cuts away entirely (nothing of positive width and height left) gives None.
    """
    x0, y0, x1, y1 = box
    sx, sy = geometry.scale
    left, top = geometry.offset
    width, height = geometry.input_size
    clipped = (
        min(max(x0 * sx - left, 0.0), float(width)),
        min(max(y0 * sy - top, 0.0), float(height)),
        min(max(x1 * sx - left, 0.0), float(width)),
        min(max(y1 * sy - top, 0.0), float(height)),
    )
    return clipped if clipped[2] > clipped[0] and clipped[3] > clipped[1] else None


def mask_to_input(labels: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """A (height, width) label image of the picture in the model input's pixels, as int32.

    Resized nearest-neighbour by Pillow, as torchvision resizes a PIL image, so labels never blend;
    pixels the crop pads are 0 (background).
    """
    from PIL import Image

    labels = np.asarray(labels)
    if labels.shape != geometry.image_size[::-1]:
        raise ValueError(
            f"the mask has shape {labels.shape} but the picture is {geometry.image_size[0]} x "
            f"{geometry.image_size[1]} pixels: pass the (height, width) mask drawn on this picture"
        )
    resized = Image.fromarray(labels.astype(np.int32)).resize(geometry.resized_size, Image.NEAREST)
    left, top = geometry.offset
    width, height = geometry.input_size
    return np.asarray(resized.crop((left, top, left + width, top + height)))
