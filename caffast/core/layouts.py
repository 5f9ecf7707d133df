"""Where the spatial grid lies in a breakpoint's output, so that the filter multiplies the right cells.

Convolutional layers give (N, C, H, W), or (N, C, D, H, W) on clips and volumes.  Transformers give
channels-last maps (N, H, W, C) (torchvision's swin_t, timm's Swin; (N, D, H, W, C) for torchvision's
swin3d_t) or tokens (N, L, C) with prefix tokens (a class token) before the H * W patch tokens (ViT).
A layout turns the layer's output into an (N, C, *grid) map for the filter; the filter multiplies the
patch cells where they lie, prefix tokens stay as they are, and the tail sees the layer's own layout.
pytorch-grad-cam's `reshape_transform` defines a layout too: any function that only selects and
rearranges elements (slicing, reshape, permute) does.

A 4-D shape is read as channels-first or channels-last where the layer's last module says so (a
convolution, normalization or pooling: channels-first; a Linear or LayerNorm over the last axis:
channels-last, where its forward is the class's own or is seen to take that arrangement) and that
reading fits the image, or else where only one reading fits (a (N, 7, 7, 768)
map of a 224 x 224 image cannot be a 7 x 768 grid); otherwise the layout must be given.  A 5-D map
is read the same way against the clip's (D, H, W), its depth axis with a stride of its own (video
networks subsample time and space differently).  Tokens of a clip or a volume are not factored into
a (D, H, W) grid: a reshape_transform says how they lie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .choices import check_choice

LAYOUTS = ("nchw", "nhwc", "tokens", "ncdhw", "ndhwc")
# the channels-first and channels-last layouts of a map with 4 and 5 dimensions
_CHANNEL_LAYOUTS = {4: ("nchw", "nhwc"), 5: ("ncdhw", "ndhwc")}

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]
Grid = tuple[int, ...]  # (H, W), or (D, H, W)


@dataclass
class Layout:
    """How the grid sits in a layer's output of one image.

    `positions` (the output's per-image shape) holds, for every element, 0 where the filter leaves it
    alone (a prefix token) and 1 + h * W + w where cell (h, w) multiplies it (1 + the cell's row-major
    index on a (D, H, W) grid); None for channels-first, where the filter simply broadcasts over
    channels.
    """

    name: str
    grid: Grid
    to_grid: Callable[[torch.Tensor], torch.Tensor]
    positions: Optional[torch.Tensor] = None

    @property
    def channels_first(self) -> bool:
        return self.positions is None

    def multiply_with(self, constraint: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(features, filter parameters) -> the filtered features, for the constraint's filters."""
        return lambda features, params: self.apply(features, constraint.multiplier(params, self.grid)).to(features.dtype)

    def apply(self, features: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        """`features` (P, ...) in the layer's layout times the filters `multiplier` (P, *grid)."""
        if self.positions is None:
            return features * multiplier[:, None]
        cells = multiplier.flatten(1)
        extended = torch.cat([torch.ones_like(cells[:, :1]), cells], dim=1)
        return features * extended[:, self.positions.to(features.device)]


def _channels_first(features: torch.Tensor) -> Layout:
    """(N, C, H, W) or (N, C, D, H, W): the grid is the trailing axes."""
    return Layout(_CHANNEL_LAYOUTS[features.dim()][0], tuple(features.shape[2:]), lambda x: x)


def _channels_last(features: torch.Tensor) -> Layout:
    """(N, H, W, C) or (N, D, H, W, C): the channels move before the grid."""
    rank = features.dim() - 2

    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, rank + 1, *range(1, rank + 1))

    return _probed(_CHANNEL_LAYOUTS[features.dim()][1], features, channels_first)


def _tokens(features: torch.Tensor, prefix: int, grid: Grid) -> Layout:
    height, width = grid

    def to_grid(x: torch.Tensor) -> torch.Tensor:
        return x[:, prefix:].reshape(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)

    return _probed("tokens", features, to_grid)


def _probed(name: str, features: torch.Tensor, to_grid: Callable[[torch.Tensor], torch.Tensor]) -> Layout:
    """The layout of a gather: `to_grid` applied to the elements' own indices says which cell each
    element lands in."""
    shape = tuple(features.shape[1:])
    count = math.prod(shape)
    probe = torch.arange(1, count + 1, dtype=torch.float64).view(1, *shape)
    explanation = (
        "reshape_transform must only select and rearrange the layer's elements (slicing, reshape, "
        "permute, transpose), as pytorch-grad-cam's ViT and Swin transforms do, and return (N, C, H, W) "
        "(or (N, C, D, H, W) for a clip or a volume)"
    )
    try:
        grid = to_grid(probe)
    except Exception as error:
        raise ValueError(f"{explanation}; on the layer's output {tuple(features.shape)} it raised: {error}") from error
    if not isinstance(grid, torch.Tensor) or grid.dim() not in _CHANNEL_LAYOUTS or grid.shape[0] != 1:
        got = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ValueError(f"{explanation}; it returned {got} for one image")
    values = grid.flatten()
    if grid.dtype != torch.float64 or (values != values.round()).any() or values.min() < 1 or values.max() > count \
            or values.unique().numel() != values.numel():  # fmt: skip
        raise ValueError(f"{explanation}; it changed or repeated the values")
    _, channels, *cells_shape = grid.shape
    cells = torch.arange(math.prod(cells_shape)).repeat(channels)
    positions = torch.zeros(count, dtype=torch.long)
    positions[values.long() - 1] = 1 + cells
    return Layout(name, tuple(cells_shape), to_grid, positions.view(shape))


def _fits(grid: Grid, image: Grid) -> bool:
    """Whether a (h, w) grid can be the image seen at one stride s >= 1 (within rounding)."""
    low, high = 1.0, math.inf
    for cells, pixels in zip(grid, image):
        slack = 1 + 0.05 * cells
        low = max(low, pixels / (cells + slack))
        if cells > slack:
            high = min(high, pixels / (cells - slack))
    return low <= high and all(cells <= pixels for cells, pixels in zip(grid, image))


def _fits_clip(grid: Grid, image: Grid) -> bool:
    """Whether a (d, h, w) grid can be a clip or a volume (D, H, W) seen at one stride in H and W and
    one of its own in D; against 2-D images the depth is not checked."""
    frames = image[0] if len(image) == 3 else math.inf
    return _fits(grid[1:], image[-2:]) and grid[0] <= frames


_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.PixelShuffle,
)  # fmt: skip


def _runs_on(leaf: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether `leaf`'s own forward (no hooks) takes a tensor of `shape` without an error."""
    parameter = next(leaf.parameters(), None)
    like = parameter if parameter is not None and parameter.is_floating_point() else torch.empty(0)
    try:
        with torch.no_grad():
            leaf.forward(torch.zeros(shape, dtype=like.dtype, device=like.device))
    except Exception:
        return False
    return True


def _last_axis_module(leaf: nn.Module) -> Optional[bool]:
    """Whether a Linear or a LayerNorm over one axis works on the last axis, as these classes do; a
    subclass with its own forward may mean the opposite (torchvision's and timm's LayerNorm2d normalize
    the channels of an (N, C, H, W) map), so its forward is tried on both arrangements and decides
    where exactly one runs.  None: undecided."""
    base = nn.Linear if isinstance(leaf, nn.Linear) else nn.LayerNorm
    if type(leaf).forward is base.forward:
        return True
    size = leaf.in_features if isinstance(leaf, nn.Linear) else leaf.normalized_shape[0]
    other = size + 1  # a length that is not `size`, so each arrangement fits one reading only
    last, first = _runs_on(leaf, (1, 1, other, size)), _runs_on(leaf, (1, size, 1, other))
    return last if last != first else None


def _output_channels(leaf: nn.Module) -> Optional[int]:
    """The channels a Linear or a LayerNorm over one axis outputs; None for any other module."""
    if isinstance(leaf, nn.Linear):
        return leaf.out_features
    if isinstance(leaf, nn.LayerNorm) and len(leaf.normalized_shape) == 1:
        return leaf.normalized_shape[0]
    return None


# torchvision's Permute modules that end a channels-last or a channels-first map
_PERMUTES = {(0, 2, 3, 1): "last", (0, 3, 1, 2): "first", (0, 2, 3, 4, 1): "last", (0, 4, 1, 2, 3): "first"}


def _leaf_says(module: nn.Module, channels_last_size: int) -> Optional[str]:
    """What the layer's last layout-bearing module implies: "first" (channels first), "last" or None
    (undecided)."""
    for leaf in reversed([m for m in module.modules() if not list(m.children())]):
        if isinstance(leaf, _CHANNELS_FIRST):
            return "first"
        channels = _output_channels(leaf)
        if channels is not None:
            on_last_axis = _last_axis_module(leaf)
            if on_last_axis is None:
                return None
            if not on_last_axis:
                return "first"
            if channels == channels_last_size:
                return "last"
        dims = getattr(leaf, "dims", None)
        if type(leaf).__name__ == "Permute" and dims is not None:
            return _PERMUTES.get(tuple(dims))
    return None


def _prefix_tokens(model: nn.Module) -> Optional[int]:
    """The number of tokens before the patch tokens, where the model says: timm's
    `num_prefix_tokens`, torchvision's VisionTransformer (a class token), timm's Swin (none)."""
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(prefix, int):
        return prefix
    if type(model).__name__ == "VisionTransformer" and isinstance(getattr(model, "class_token", None), torch.Tensor):
        return 1
    if getattr(model, "output_fmt", None) == "NHWC" or type(model).__name__ == "SwinTransformer":
        return 0
    return None


def _token_grids(tokens: int, prefixes: list[int], image: Grid) -> list[tuple[int, Grid]]:
    found = []
    for prefix in prefixes:
        patches = tokens - prefix
        for height in range(1, patches + 1):
            if patches % height == 0 and _fits((height, patches // height), image):
                found.append((prefix, (height, patches // height)))
    return found


def resolve_layout(
    name: str,
    features: torch.Tensor,
    image: Grid,
    model: nn.Module,
    module: nn.Module,
    layout: Optional[str] = None,
    reshape_transform: Optional[ReshapeTransform] = None,
) -> Layout:
    """The layout of layer `name`'s output `features` for images of size `image` (H, W), or clips and
    volumes of size (D, H, W)."""
    shape = tuple(features.shape)
    if reshape_transform is not None:
        if layout is not None:
            raise ValueError("pass either layout= or reshape_transform=, not both: the transform defines the layout")
        return _probed("reshape_transform", features, reshape_transform)
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if features.dim() in _CHANNEL_LAYOUTS:
        first, last = _CHANNEL_LAYOUTS[features.dim()]
        if layout is not None and layout not in (first, last):
            wanted = "an (N, L, C) output" if layout == "tokens" else f"a {5 if features.dim() == 4 else 4}-D output"
            raise ValueError(
                f"layout={layout!r} needs {wanted}; layer {name!r} outputs {shape}: pass layout={first!r} or {last!r}"
            )
        if layout is not None:
            return _channels_first(features) if layout == first else _channels_last(features)
        fits = _fits if features.dim() == 4 else _fits_clip
        seen = image[-2:] if features.dim() == 4 else image
        readings = [kind for kind, grid in ((first, shape[2:]), (last, shape[1:-1])) if fits(grid, seen)]
        said = {"first": first, "last": last}.get(_leaf_says(module, shape[-1]))
        if said in readings:  # the layer's last module decides where its reading fits the image
            readings = [said]
        if len(readings) == 1:
            return _channels_first(features) if readings[0] == first else _channels_last(features)
        order = "C, H, W" if features.dim() == 4 else "C, D, H, W"
        raise ValueError(
            f"layer {name!r} outputs {shape} for {' x '.join(map(str, image))} inputs: it cannot be told "
            f"whether channels come first (N, {order}) or last (N, {order[3:]}, C); pass layout={first!r} "
            f"or layout={last!r}"
        )
    if features.dim() == 3 and len(image) > 2:
        raise ValueError(
            f"layer {name!r} outputs {shape} on inputs of {' x '.join(map(str, image))}: tokens of a clip or a "
            "volume are not factored into a (D, H, W) grid here; pass reshape_transform= that returns "
            "(N, C, D, H, W)"
        )
    if features.dim() == 3:
        if layout in ("nchw", "nhwc"):
            raise ValueError(f"layout={layout!r} needs a 4-D output; layer {name!r} outputs tokens {shape}")
        known = _prefix_tokens(model)
        if known is None and layout is None:
            raise ValueError(
                f"layer {name!r} outputs {shape}; if these are (N, L, C) tokens pass layout='tokens' (a class "
                "token first is found from the count), or reshape_transform= for any other arrangement"
            )
        grids = _token_grids(shape[1], [known] if known is not None else [0, 1], image)
        if len(grids) != 1:
            raise ValueError(
                f"layer {name!r} outputs {shape[1]} tokens for {image[0]} x {image[1]} images: they fit "
                f"{len(grids)} grids {[g for _, g in grids]}; pass reshape_transform= to say how they lie"
            )
        prefix, grid = grids[0]
        return _tokens(features, prefix, grid)
    raise ValueError(
        f"layer {name!r} outputs {shape}; L2-CAF needs a grid: a 4-D (N, C, H, W) or (N, H, W, C) feature map, a "
        "5-D (N, C, D, H, W) or (N, D, H, W, C) one, or (N, L, C) tokens: pick a convolutional or transformer "
        "block, or pass reshape_transform="
    )
