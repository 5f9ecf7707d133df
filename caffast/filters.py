"""The constrained attention filter: its parameterizations, its initial values and its final map.

A constraint turns the optimized parameters of a problem into the spatial multiplier that scales the
feature map.  "l2norm" (the paper's L2-CAF) keeps the filter on the unit sphere, "softmax" makes it a
distribution over the grid cells, and "gauss" is a 2-D Gaussian with identity covariance whose mean is
the only parameter.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CONSTRAINTS = ("l2norm", "softmax", "gauss")
INITS = ("ones", "normal")
MAPS = ("abs", "positive", "signed")  # how a signed l2norm filter becomes a map

Grid = tuple[int, int]
ArrayLike = Union[torch.Tensor, np.ndarray]


def check_choice(kind: str, value: object, choices: Sequence[str]) -> str:
    """Raise a ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value  # type: ignore[return-value]


def parameter_shape(constraint: str, grid: Grid) -> tuple[int, ...]:
    """The shape of one problem's optimized variable."""
    check_choice("constraint", constraint, CONSTRAINTS)
    return (2,) if constraint == "gauss" else tuple(grid)


def initial_parameters(
    constraint: str,
    init: str,
    count: int,
    grid: Grid,
    seed: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Starting values for `count` problems, shape (count, *parameter_shape).

    "ones" is the reference start (the gauss mean starts at the grid centre, zeros).  "normal" draws
    from N(0, 1) with a CPU float64 generator seeded by `seed`, so a run is reproducible on any device.
    """
    check_choice("init", init, INITS)
    shape = (count, *parameter_shape(constraint, grid))
    if init == "normal":
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        return values.to(device=device, dtype=dtype)
    if constraint == "gauss":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def gaussian_filter(mean: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Identity-covariance Gaussians centred at `mean` (..., 2: column, row offsets from the grid
    centre), evaluated on the grid and normalized to sum 1: shape (..., H, W)."""
    height, width = grid
    cols = torch.arange(width, dtype=mean.dtype, device=mean.device) - (width - 1) / 2
    rows = torch.arange(height, dtype=mean.dtype, device=mean.device) - (height - 1) / 2
    dx = cols - mean[..., 0, None]
    dy = rows - mean[..., 1, None]
    log_density = -0.5 * (dy[..., :, None] ** 2 + dx[..., None, :] ** 2)
    # a softmax of the log-density: the same normalized Gaussian, and no 0 / 0 once the mean is far off
    return torch.softmax(log_density.flatten(-2), dim=-1).view(log_density.shape)


def constrained_filter(params: torch.Tensor, constraint: str, grid: Grid) -> torch.Tensor:
    """The multiplier applied to the feature map, (P, H, W), from a batch of parameters."""
    if constraint == "l2norm":
        return F.normalize(params.flatten(1), dim=1).view(params.shape)
    if constraint == "softmax":
        return torch.softmax(params.flatten(1), dim=1).view(params.shape)
    if constraint == "gauss":
        return gaussian_filter(params, grid)
    check_choice("constraint", constraint, CONSTRAINTS)
    raise AssertionError("unreachable")


def normalize_filter(
    filter: ArrayLike, filter_type: str = "l2norm", shape: Grid | None = None, map: str = "abs"
) -> ArrayLike:
    """The attention map of a converged filter; the default is the reference's finalization.

    l2norm: `map` "abs" gives |f| / || |f| || (the reference), "positive" max(f, 0) / ||max(f, 0)|| (the
    cells that raise the objective's output, all zeros when there are none), "signed" f / ||f|| (for a
    diverging colormap); softmax: softmax over the cells; gauss: `filter` is the Gaussian's mean and the
    map is the Gaussian on a `shape` grid (7 x 7 unless given).  softmax and Gaussian filters are
    positive, so `map` changes nothing there.  Works on the last two axes (the last one for a gauss
    mean) of a numpy array or a tensor and returns the same kind.
    """
    check_choice("filter_type", filter_type, CONSTRAINTS)
    check_choice("map", map, MAPS)
    is_numpy = isinstance(filter, np.ndarray)
    values = torch.from_numpy(filter) if is_numpy else filter
    if filter_type == "l2norm":
        kept = {"abs": values.abs(), "positive": values.clamp_min(0), "signed": values}[map]
        norm = torch.linalg.vector_norm(kept, dim=(-2, -1), keepdim=True)
        result = kept / norm.clamp_min(torch.finfo(kept.dtype).tiny)
    elif filter_type == "softmax":
        result = torch.softmax(values.flatten(-2), dim=-1).view(values.shape)
    else:
        result = gaussian_filter(values.reshape(*values.shape[:-1], 2), shape or (7, 7))
    return result.numpy() if is_numpy else result


class L2_CAF(nn.Module):
    """The reference module: a filter on the unit L2 sphere multiplying a feature map."""

    def __init__(self, spatial_dim: int | tuple[int, int]):
        super().__init__()
        height, width = (spatial_dim, spatial_dim) if isinstance(spatial_dim, int) else spatial_dim
        self.filter = nn.Parameter(torch.ones((height, width), dtype=torch.float32))

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return A * F.normalize(self.filter, dim=[0, 1])
