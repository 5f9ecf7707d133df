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
        colours = apply_colormap(scale_map(values, rgb.shape[:2], symmetric, "mirror" if release else "clamp"), cmap)
        blended = alpha * colours + (1.0 - alpha) * rgb
    picture = Image.fromarray(np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
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
