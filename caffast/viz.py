"""Pictures of attention maps, drawn as the reference draws them, with pillow and numpy only.

The reference output (docs/design.md, 'The map and the picture'): the map resized to the image bilinearly, min-max scaled,
coloured with 'bwr' and laid over the image with alpha 0.6.  The resize and scaling are those of
caffast.engine.explain.upsample_maps, so a picture shows exactly what Explanation.upsample returns.
Colormaps are 256-entry lookup tables built from matplotlib's segment definitions and indexed as
matplotlib indexes them (floor(v * 256), clipped), so colours match matplotlib's to the byte.

`style="release"` draws the picture the release's matplotlib code writes: the map resized with
mirrored edges (as skimage's resize), a flat map leaving the plain image, on the release's 480 x 480
figure (for a square image; others fit 640 x 480; resampled with a Hamming window, close to the
Hanning filter matplotlib uses there), RGBA with a 100 dpi tag.

Clips and volumes: a (d, h, w) map is resized trilinearly to the clip's (D, H, W) and min-max scaled
over the whole clip (Explanation.upsample's scaling), then drawn over every frame or slice as above:
`overlay_frames` gives one picture per frame, `save_clip_gif` animates them, and `montage` tiles the
slices of a volume along one axis (axial by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .core.choices import check_choice
from .engine.explain import upsample_maps

ArrayLike = Union[np.ndarray, torch.Tensor]
ImageLike = Union[np.ndarray, torch.Tensor, Image.Image]
ClipLike = Union[np.ndarray, torch.Tensor, Sequence[ImageLike]]  # a clip or a volume, or its frames
Size = Union[int, tuple[int, int]]

# (x, value) anchors per channel, piecewise linear in between (matplotlib's _bwr_data and _jet_data).
_SEGMENTS = {
    "bwr": (
        ((0.0, 0.0), (0.5, 1.0), (1.0, 1.0)),
        ((0.0, 0.0), (0.5, 1.0), (1.0, 0.0)),
        ((0.0, 1.0), (0.5, 1.0), (1.0, 0.0)),
    ),
    "jet": (
        ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
    ),
}
LUT_SIZE = 256
EDGES = ("clamp", "mirror")
STYLES = ("caffast", "release")
# what the release's figure is: matplotlib's default 6.4 x 4.8 inches at 100 dpi, cropped to the image
RELEASE_CANVAS, RELEASE_DPI = (640, 480), 100
# plt.axis's values: accepted for the release's signature (pictures have no axes, as its saved files)
AXIS_VALUES = ("on", "off", "equal", "scaled", "tight", "auto", "image", "square", True, False)


def colormap(name: str) -> np.ndarray:
    """The (256, 3) float64 RGB lookup table of 'bwr' or 'jet', entry i at x = i / 255."""
    if name not in _SEGMENTS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(map(repr, _SEGMENTS))}")
    x = np.linspace(0.0, 1.0, LUT_SIZE)
    return np.stack([np.interp(x, *zip(*anchors)) for anchors in _SEGMENTS[name]], axis=1)


def apply_colormap(values: ArrayLike, name: str = "bwr") -> np.ndarray:
    """RGB colours (..., 3) in [0, 1] of values in [0, 1] (clipped), looked up as matplotlib does."""
    values = np.asarray(_as_array(values), dtype=np.float64)
    index = np.clip((values * LUT_SIZE).astype(np.int64), 0, LUT_SIZE - 1)
    return colormap(name)[index]


def _as_array(data: ArrayLike) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().double().numpy()
    return np.asarray(data, dtype=np.float64)


def _size(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_bilinear(heatmap: ArrayLike, size: Size, edges: str = "clamp") -> np.ndarray:
    """A (h, w) map resized to size (H, W), float64: bilinear with half-pixel centres.

    edges="clamp" repeats the edge cells beyond the border (torch align_corners=False,
    cv2.INTER_LINEAR; PIL's bilinear when enlarging); "mirror" reflects the map about its edge cells
    (skimage's resize, which the release uses; scipy.ndimage's mode="mirror", cv2.BORDER_REFLECT_101).
    """
    check_choice("edges", edges, EDGES)
    array = _as_array(heatmap)
    if edges == "mirror":
        height, width = _size(size)
        return _mirror_weights(array.shape[0], height) @ array @ _mirror_weights(array.shape[1], width).T
    tensor = torch.from_numpy(array)
    return F.interpolate(tensor[None, None], size=_size(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _mirror_weights(cells: int, size: int) -> np.ndarray:
    """(size, cells) bilinear weights along one axis with mirrored borders: row i samples the map at
    (i + 0.5) * cells / size - 0.5, an index beyond an edge reflected about the edge cell."""
    source = (np.arange(size) + 0.5) * cells / size - 0.5
    low = np.floor(source)
    frac = source - low

    def reflect(index: np.ndarray) -> np.ndarray:
        if cells == 1:
            return np.zeros_like(index, dtype=np.int64)
        period = 2 * (cells - 1)
        index = np.abs(index).astype(np.int64) % period
        return np.where(index > cells - 1, period - index, index)

    weights = np.zeros((size, cells))
    rows = np.arange(size)
    np.add.at(weights, (rows, reflect(low)), 1 - frac)
    np.add.at(weights, (rows, reflect(low + 1)), frac)
    return weights


def scale_map(heatmap: ArrayLike, size: Size, symmetric: bool = False, edges: str = "clamp") -> np.ndarray:
    """A (h, w) map as it is drawn: resized to size (H, W) and min-max scaled to [0, 1].

    A constant map becomes all zeros (the low end of the colormap), as matplotlib draws a flat image.
    `symmetric` scales by the largest magnitude instead, so that zero lands on 0.5, the centre of a
    diverging colormap (for signed maps: negative cells blue, positive red, zero white with 'bwr').
    `edges` as in resize_bilinear.
    """
    tensor = torch.from_numpy(_as_array(heatmap))
    if tensor.dim() != 2:
        raise ValueError(f"heatmap must have shape (h, w); got {tuple(tensor.shape)}")
    if not symmetric and edges == "clamp":
        return upsample_maps(tensor[None, None], _size(size))[0, 0].numpy()
    resized = resize_bilinear(tensor, size, edges)
    if symmetric:
        return 0.5 + 0.5 * resized / max(np.abs(resized).max(), np.finfo(resized.dtype).tiny)
    low, high = resized.min(), resized.max()
    return (resized - low) / max(high - low, np.finfo(resized.dtype).tiny)


def to_rgb(image: ImageLike) -> np.ndarray:
    """An image as (H, W, 3) float64 in [0, 1].

    Accepts a PIL image, a uint8 array (H, W, 3), a float array (H, W, 3) in [0, 1], a (3, H, W)
    tensor or array (channel-first when the first axis has 3 entries and the last does not), or a
    grey (H, W) array.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float64) / scale
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), (3, H, W) or (H, W); got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def apply_heatmap(
    image: ImageLike,
    heatmap: ArrayLike,
    alpha: float = 0.6,
    display: bool = False,
    save: Optional[Union[str, Path]] = None,
    cmap: str = "bwr",
    axis: Union[str, bool] = "on",
    verbose: bool = False,
    *,
    symmetric: bool = False,
    style: str = "caffast",
) -> Image.Image:
    """The map laid over the image as the reference draws it: alpha * colour + (1 - alpha) * image.

    The map is resized to the image, min-max scaled (scaled around zero when `symmetric`, for signed
    maps) and coloured; the result is rounded to uint8, written to `save` when given (format from the
    suffix), and returned.  The positional order and the keywords are the release's: `display` shows
    the picture, `verbose` prints the file written, `axis` is accepted (the pictures have no axes, as
    the release's saved files).  `style="release"`: mirrored edges, the plain image for a flat map,
    the release's figure size (module docstring).
    """
    check_choice("style", style, STYLES)
    if axis not in AXIS_VALUES:
        raise ValueError(f"unknown axis {axis!r}; choose one of {', '.join(map(repr, AXIS_VALUES))}")
    rgb = to_rgb(image)
    release = style == "release"
    values = _as_array(heatmap)
    if release and not symmetric and values.size and values.max() == values.min():
        blended = rgb  # 0 / 0 in the release's min-max scaling: matplotlib leaves NaN cells transparent
    else:
        scaled = scale_map(values, rgb.shape[:2], symmetric, "mirror" if release else "clamp")
        blended = _blend(rgb, scaled, alpha, cmap)
    picture = _picture(blended)
    if release:
        picture = picture.resize(release_size(picture.height, picture.width)[::-1], Image.Resampling.HAMMING)
        picture = picture.convert("RGBA")
    if save is not None:
        picture.save(save, **({"dpi": (RELEASE_DPI, RELEASE_DPI)} if release else {}))
        if verbose:
            print(f"save image: {save}")
    if display:
        picture.show()
    return picture


def _blend(rgb: np.ndarray, scaled: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    """alpha * colour + (1 - alpha) * image, for a map already resized and scaled to [0, 1]."""
    return alpha * apply_colormap(scaled, cmap) + (1.0 - alpha) * rgb


def _picture(blended: np.ndarray) -> Image.Image:
    """An (H, W, 3) array in [0, 1] as an RGB picture, rounded to uint8."""
    return Image.fromarray(np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def release_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the release's picture of an image: scaled to fit its 640 x 480 figure."""
    scale = min(RELEASE_CANVAS[0] / width, RELEASE_CANVAS[1] / height)
    return int(height * scale + 1e-6), int(width * scale + 1e-6)


def save_mask(heatmap: ArrayLike, path: Union[str, Path]) -> None:
    """The map itself as an 8-bit grey PNG, one pixel per cell, as the TensorFlow release writes its raw
    mask with imageio: values in [0, 1] become floor(v * 255 + 0.499999999), others are min-max scaled."""
    values = _as_array(heatmap)
    if values.ndim != 2:
        raise ValueError(f"heatmap must have shape (h, w); got {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 1):
        values = (values - values.min()) / max(values.max() - values.min(), np.finfo(values.dtype).tiny)
    Image.fromarray((values * 255 + 0.499999999).astype(np.uint8), "L").save(path)


def save_gif(frames: Sequence[Image.Image], path: Union[str, Path], duration_ms: int = 100) -> None:
    """Write frames (for instance a filter converging) as a looping GIF, duration_ms per frame.

    Pillow merges identical consecutive frames into one that lasts as long as they did together.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(path, save_all=True, append_images=rest, duration=duration_ms, loop=0)


# ------------------------------------------------------------------------------------------------
# clips and volumes

SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}  # the (D, H, W) axis each view slices along


def clip_to_rgb(clip: ClipLike) -> np.ndarray:
    """A clip or a volume as (D, H, W, 3) float64 in [0, 1].

    Accepts a channel-first (3, D, H, W) or (1, D, H, W) tensor or array (as a model takes one clip),
    a (D, H, W, 3) one, a grey (D, H, W) one, or a sequence of frames (anything to_rgb takes).
    """
    if isinstance(clip, (list, tuple)):
        return np.stack([to_rgb(frame) for frame in clip])
    array = clip.detach().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip)
    if array.ndim == 4 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # (C, D, H, W) -> (D, H, W, C)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        raise ValueError(
            f"a clip or a volume must be (3, D, H, W), (1, D, H, W), (D, H, W, 3) or (D, H, W); got shape {array.shape}"
        )
    return np.stack([to_rgb(frame) for frame in array])


def scale_volume_map(heatmap: ArrayLike, size: tuple[int, int, int], symmetric: bool = False) -> np.ndarray:
    """A (d, h, w) map as it is drawn over a clip or a volume: resized trilinearly to size (D, H, W)
    and min-max scaled to [0, 1] over the whole volume (as Explanation.upsample); `symmetric` scales by
    the largest magnitude instead, so that zero lands on 0.5."""
    tensor = torch.from_numpy(_as_array(heatmap))
    if tensor.dim() != 3:
        raise ValueError(f"heatmap must have shape (d, h, w); got {tuple(tensor.shape)}")
    if not symmetric:
        return upsample_maps(tensor[None, None], tuple(size))[0, 0].numpy()
    resized = F.interpolate(tensor[None, None], size=tuple(size), mode="trilinear", align_corners=False)[0, 0].numpy()
    return 0.5 + 0.5 * resized / max(np.abs(resized).max(), np.finfo(resized.dtype).tiny)


def _slice_axis(axis: Union[int, str]) -> int:
    if isinstance(axis, str):
        return SLICE_AXES[check_choice("axis", axis, tuple(SLICE_AXES))]
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        names = ", ".join(map(repr, SLICE_AXES))
        raise ValueError(f"axis must be 0, 1 or 2 (D, H or W) or one of {names}; got {axis!r}")
    return axis


def overlay_frames(
    clip: ClipLike,
    heatmap: ArrayLike,
    alpha: float = 0.6,
    cmap: str = "bwr",
    *,
    symmetric: bool = False,
    axis: Union[int, str] = 0,
) -> list[Image.Image]:
    """The map over every frame of a clip (or slice of a volume), one picture each.

    `heatmap` (d, h, w), a map of Explanation.maps for one problem, is resized trilinearly to the
    clip's (D, H, W) and scaled once over the whole clip, so the colours compare across frames.
    `axis` picks the slices: 0 or "axial" (the frames of a clip, the D axis), 1 or "coronal" (H),
    2 or "sagittal" (W).
    """
    axis = _slice_axis(axis)
    rgb = clip_to_rgb(clip)
    scaled = scale_volume_map(heatmap, rgb.shape[:3], symmetric)
    blended = _blend(rgb, scaled, alpha, cmap)
    return [_picture(frame) for frame in np.moveaxis(blended, axis, 0)]


def save_clip_gif(
    clip: ClipLike, heatmap: ArrayLike, path: Union[str, Path], duration_ms: int = 100, **options: object
) -> None:
    """The map over a clip as a looping GIF, one frame per frame of the clip (`options` as
    overlay_frames takes them: alpha, cmap, symmetric, axis)."""
    save_gif(overlay_frames(clip, heatmap, **options), path, duration_ms)


def montage(
    volume: ClipLike,
    heatmap: ArrayLike,
    axis: Union[int, str] = "axial",
    slices: Union[int, Sequence[int], None] = None,
    columns: Optional[int] = None,
    alpha: float = 0.6,
    cmap: str = "bwr",
    *,
    symmetric: bool = False,
    gap: int = 1,
    save: Optional[Union[str, Path]] = None,
) -> Image.Image:
    """Slices of a volume (or frames of a clip) with the map over them, tiled row by row.

    `axis` as in overlay_frames (axial by default); `slices`: the slice indices to show, or how many
    to pick evenly from first to last (all of them when None, at most 16); `columns`: tiles per row
    (about a square montage when None); `gap`: white pixels between tiles.  The picture is written to
    `save` when given, and returned.
    """
    pictures = overlay_frames(volume, heatmap, alpha, cmap, symmetric=symmetric, axis=axis)
    count = len(pictures)
    if slices is None or isinstance(slices, int):
        wanted = min(count, 16) if slices is None else slices
        if isinstance(wanted, bool) or wanted < 1:
            raise ValueError(f"slices must be a positive count or a list of slice indices; got {slices!r}")
        chosen = np.unique(np.linspace(0, count - 1, min(wanted, count)).round().astype(int)).tolist()
    else:
        chosen = [int(index) for index in slices]
        if not chosen or any(not 0 <= index < count for index in chosen):
            raise ValueError(f"slices must be indices in [0, {count}) along axis {axis!r}; got {list(slices)}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be a positive integer (tiles per row) or None; got {columns!r}")
    columns = columns or int(np.ceil(np.sqrt(len(chosen))))
    rows = int(np.ceil(len(chosen) / columns))
    width, height = pictures[0].size
    sheet = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for place, index in enumerate(chosen):
        sheet.paste(pictures[index], ((place % columns) * (width + gap), (place // columns) * (height + gap)))
    if save is not None:
        sheet.save(save)
    return sheet
