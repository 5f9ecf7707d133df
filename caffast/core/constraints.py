"""The constrained attention filter, one object per constraint.

A constraint turns the optimized parameters of a problem into the spatial multiplier that scales the
feature map, and a converged filter into the attention map.  "l2norm" (the paper's L2-CAF) keeps the
filter on the unit sphere, "softmax" makes it a distribution over the grid cells, and "gauss" is a
Gaussian with identity covariance whose mean is the only parameter.  A grid is (H, W), or (D, H, W)
for a clip or a volume: every constraint treats its D * H * W cells as the (H, W) ones.  The loop, the solvers and
the backends ask the object; a new constraint is a new class here (and, for the compiled fused
solvers, a kernel branch under its `name` in csrc/constraints.cpp and backends/triton/fused_solver.py).
"""

from __future__ import annotations

from typing import ClassVar, Optional, Union, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .choices import ConstraintName, InitName, MapName, check_choice

Grid = tuple[int, ...]  # (H, W), or (D, H, W) for clips and volumes
ArrayLike = Union[torch.Tensor, np.ndarray]

INITS: tuple[InitName, ...] = get_args(InitName)
NORM_EPS = 1e-12  # F.normalize's: below it the norm is clamped
MAPS: tuple[MapName, ...] = get_args(MapName)  # how a signed l2norm filter becomes a map


class Constraint:
    """The parameterization of one problem's filter."""

    name: ClassVar[ConstraintName]
    # the filter is f / ||f||: the parameters live on (a scaling of) the unit sphere, and the filter's
    # cells take either sign and can be exactly zero
    on_sphere: ClassVar[bool] = False

    def parameter_shape(self, grid: Grid) -> tuple[int, ...]:
        """The shape of one problem's optimized variable."""
        return tuple(grid)

    def start(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The reference's starting parameters: ones (the uniform filter)."""
        return torch.ones(shape, dtype=dtype, device=device)

    def multiplier(self, params: torch.Tensor, grid: Optional[Grid]) -> torch.Tensor:
        """The filter applied to the feature map, (P, *grid), from a batch of parameters."""
        raise NotImplementedError

    def filters(self, params: torch.Tensor, grid: Grid) -> torch.Tensor:
        """What a result reports as the filter: the parameters themselves."""
        return params

    def retract(self, params: torch.Tensor) -> torch.Tensor:
        """Parameters standing for the same filter, in the form a descent steps from."""
        return params

    def attention_map(self, values: torch.Tensor, grid: Optional[Grid], map: MapName) -> torch.Tensor:
        """The map of converged parameters (..., *parameter_shape), over the grid's axes (the last
        two when no grid is given)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<constraint {self.name!r}>"


class L2Norm(Constraint):
    """g = f / ||f||; the map is |g| (the reference), max(g, 0) or g, renormalized."""

    name = "l2norm"
    on_sphere = True

    def multiplier(self, params: torch.Tensor, grid: Optional[Grid]) -> torch.Tensor:
        return F.normalize(params.flatten(1), dim=1).view(params.shape)

    def retract(self, params: torch.Tensor) -> torch.Tensor:
        return self.multiplier(params, None)

    def attention_map(self, values: torch.Tensor, grid: Optional[Grid], map: MapName) -> torch.Tensor:
        kept = {"abs": values.abs(), "positive": values.clamp_min(0), "signed": values}[map]
        norm = torch.linalg.vector_norm(kept, dim=grid_axes(grid), keepdim=True)
        return kept / norm.clamp_min(torch.finfo(kept.dtype).tiny)


class Softmax(Constraint):
    """g = softmax(f) over the cells: positive, summing to 1."""

    name = "softmax"

    def multiplier(self, params: torch.Tensor, grid: Optional[Grid]) -> torch.Tensor:
        return torch.softmax(params.flatten(1), dim=1).view(params.shape)

    def attention_map(self, values: torch.Tensor, grid: Optional[Grid], map: MapName) -> torch.Tensor:
        return torch.softmax(values.flatten(grid_axes(grid)[0]), dim=-1).view(values.shape)


class Gauss(Constraint):
    """A normalized identity-covariance Gaussian on the grid; the parameter is its mean, one number
    per grid axis ((2,) on an (H, W) grid, (3,) on a (D, H, W) one)."""

    name = "gauss"
    DEFAULT_GRID: ClassVar[Grid] = (7, 7)  # normalize_filter's grid when none is given

    def parameter_shape(self, grid: Grid) -> tuple[int, ...]:
        return (len(grid),)

    def start(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The grid centre."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def multiplier(self, params: torch.Tensor, grid: Optional[Grid]) -> torch.Tensor:
        return gaussian_filter(params, grid)

    def filters(self, params: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The Gaussian the mean stands for."""
        return gaussian_filter(params, grid)

    def attention_map(self, values: torch.Tensor, grid: Optional[Grid], map: MapName) -> torch.Tensor:
        grid = grid or self.DEFAULT_GRID
        return gaussian_filter(values.reshape(*values.shape[:-1], len(grid)), grid)


CONSTRAINTS: dict[ConstraintName, Constraint] = {kind.name: kind() for kind in (L2Norm, Softmax, Gauss)}
ConstraintLike = Union[ConstraintName, Constraint]


def as_constraint(constraint: ConstraintLike, kind: str = "constraint") -> Constraint:
    """The constraint object for a name (or the object itself); a clear error for anything else.

    The one place a name becomes its constraint (caffast.core.settings.Settings, and normalize_filter's
    filter_type): everything below explain takes the object."""
    if isinstance(constraint, Constraint):
        return constraint
    return CONSTRAINTS[check_choice(kind, constraint, get_args(ConstraintName))]


def initial_parameters(
    constraint: Constraint,
    init: InitName,
    count: int,
    grid: Grid,
    seed: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Starting values for `count` problems, shape (count, *parameter_shape).

    "ones" is the reference start (the constraint's `start`).  "normal" draws from N(0, 1) with a CPU
    float64 generator seeded by `seed`, so a run is reproducible on any device.
    """
    check_choice("init", init, INITS)
    shape = (count, *constraint.parameter_shape(grid))
    if init == "normal":
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        return values.to(device=device, dtype=dtype)
    return constraint.start(shape, dtype, device)


def grid_axes(grid: Optional[Grid]) -> tuple[int, ...]:
    """The trailing axes a map over `grid` occupies: (-2, -1) for (H, W) (or no grid), (-3, -2, -1)
    for (D, H, W)."""
    rank = 2 if grid is None else len(grid)
    return tuple(range(-rank, 0))


def gaussian_filter(mean: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Identity-covariance Gaussians centred at `mean`, evaluated on the grid and normalized to sum 1:
    shape (..., *grid).  The mean holds offsets from the grid centre, last axis first: (..., 2) is
    (column, row) on an (H, W) grid, (..., 3) is (column, row, slice) on a (D, H, W) one."""
    squares = []
    for axis, size in enumerate(grid):  # the squared distances along each axis, broadcast on the grid
        centred = torch.arange(size, dtype=mean.dtype, device=mean.device) - (size - 1) / 2
        distance = centred - mean[..., len(grid) - 1 - axis, None]
        squares.append((distance**2).view(*distance.shape[:-1], *(size if a == axis else 1 for a in range(len(grid)))))
    log_density = -0.5 * sum(squares[1:], squares[0])
    # a softmax of the log-density: the same normalized Gaussian, and no 0 / 0 once the mean is far off
    return torch.softmax(log_density.flatten(-len(grid)), dim=-1).view(log_density.shape)


def normalize_filter(
    filter: ArrayLike, filter_type: ConstraintLike = "l2norm", shape: Grid | None = None, map: MapName = "abs"
) -> ArrayLike:
    """The attention map of a converged filter; the default is the reference's finalization.

    l2norm: `map` "abs" gives |f| / || |f| || (the reference), "positive" max(f, 0) / ||max(f, 0)|| (the
    cells that raise the objective's output, all zeros when there are none), "signed" f / ||f|| (for a
    diverging colormap); softmax: softmax over the cells; gauss: `filter` is the Gaussian's mean and the
    map is the Gaussian on a `shape` grid (7 x 7 unless given).  softmax and Gaussian filters are
    positive, so `map` changes nothing there.  Works on the last two axes, or the last three with a
    (D, H, W) `shape` (the last one for a gauss mean), of a numpy array or a tensor and returns the
    same kind.
    """
    constraint = as_constraint(filter_type, kind="filter_type")
    check_choice("map", map, MAPS)
    is_numpy = isinstance(filter, np.ndarray)
    values = torch.from_numpy(filter) if is_numpy else filter
    result = constraint.attention_map(values, shape, map)
    return result.numpy() if is_numpy else result


class L2_CAF(nn.Module):
    """The reference module: a filter on the unit L2 sphere multiplying a feature map; `spatial_dim`
    is the grid, (H, W) (an int for a square one) or (D, H, W)."""

    def __init__(self, spatial_dim: int | Grid):
        super().__init__()
        grid = (spatial_dim, spatial_dim) if isinstance(spatial_dim, int) else tuple(spatial_dim)
        self.filter = nn.Parameter(torch.ones(grid, dtype=torch.float32))

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        """A (N, C, *grid): the filter, normalized over all its cells, scales every channel."""
        return A * F.normalize(self.filter, dim=list(range(self.filter.dim())))
