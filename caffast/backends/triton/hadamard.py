"""The Hadamard filter: features (P, C, *grid) * f / ||f|| with f (P, *grid), and its gradient in f;
the grid is (H, W), or (D, H, W) on clips and volumes, and the kernels see only its cells.

The generic tail's filter multiply; its plain PyTorch twin is in tests/backends/test_triton.py.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .device import sphere, sphere_grad
from .runtime import FLOATING, block_size, checked, jit, require, tl, tl_core, tl_sum, triton  # noqa: F401


@jit
def forward_kernel(features, filter, out, channels, cells, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Program (p, channel block): the filter row is normalized in registers, then scales the block."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_HW)
    inside = cell < cells
    g, _ = sphere(tl.load(filter + p * cells + cell, mask=inside, other=0.0))
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (channel < channels)[:, None] & inside[None, :]
    index = (p * channels + channel)[:, None] * cells + cell[None, :]
    tl.store(out + index, tl.load(features + index, mask=mask, other=0.0) * g[None, :], mask=mask)


@jit
def backward_kernel(
    features, filter, grad_out, grad_filter, channels, cells, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr
):
    """Program p: grad_g = sum over channels of grad_out * features, then through the normalization."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_HW)
    inside = cell < cells
    f = tl.load(filter + p * cells + cell, mask=inside, other=0.0)
    grad_g = tl.full(f.shape, 0, f.dtype)
    for start in range(0, channels, BLOCK_C):
        channel = start + tl.arange(0, BLOCK_C)
        mask = (channel < channels)[:, None] & inside[None, :]
        index = (p * channels + channel)[:, None] * cells + cell[None, :]
        upstream = tl.load(grad_out + index, mask=mask, other=0.0)
        grad_g += tl_sum(upstream * tl.load(features + index, mask=mask, other=0.0), axis=0)
    tl.store(grad_filter + p * cells + cell, sphere_grad(f, grad_g), mask=inside)


def _hadamard_blocks(cells: int) -> tuple[int, int]:
    """A (channels x cells) tile of about 4096 elements, whole rows of cells."""
    block_hw = block_size(cells)
    return max(1, 4096 // block_hw), block_hw


def _feature_maps(features: torch.Tensor) -> torch.Tensor:
    """The features checked: (P, C, H, W) or (P, C, D, H, W)."""
    require(features.device)
    features = checked(features, "features", FLOATING, features.shape, features.device)
    if features.dim() not in (4, 5):
        raise ValueError(f"features must be (P, C, H, W) or (P, C, D, H, W), got shape {tuple(features.shape)}")
    return features


def hadamard_forward(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, *grid) * filter (P, *grid) / ||filter||, the norm per problem over the grid."""
    features = _feature_maps(features)
    problems, channels, *grid = features.shape
    filter = checked(filter, "filter", (features.dtype,), (problems, *grid), features.device)
    out = torch.empty_like(features)
    cells = math.prod(grid)
    block_c, block_hw = _hadamard_blocks(cells)
    launch = (problems, triton.cdiv(channels, block_c))
    forward_kernel[launch](features, filter, out, channels, cells, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return out


def hadamard_backward(features: torch.Tensor, filter: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of hadamard_forward with respect to the filter, (P, *grid)."""
    features = _feature_maps(features)
    problems, channels, *grid = features.shape
    filter = checked(filter, "filter", (features.dtype,), (problems, *grid), features.device)
    grad_out = checked(grad_out, "grad_out", (features.dtype,), features.shape, features.device)
    grad_filter = torch.empty_like(filter)
    cells = math.prod(grid)
    block_c, block_hw = _hadamard_blocks(cells)
    backward_kernel[(problems,)](
        features, filter, grad_out, grad_filter, channels, cells, BLOCK_C=block_c, BLOCK_HW=block_hw
    )
    return grad_filter


class Hadamard(torch.autograd.Function):
    """features * F.normalize(filter over its grid), differentiable in the filter only: the features
    are the captured breakpoint activations, which L2-CAF never trains."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, filter)
        return hadamard_forward(features, filter)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, Optional[torch.Tensor]]:
        features, filter = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        return None, hadamard_backward(features, filter, grad_out)
