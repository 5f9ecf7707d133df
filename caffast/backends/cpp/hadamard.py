"""The Hadamard filter on the CPU (csrc/hadamard.cpp); its plain PyTorch twin is in tests/backends/test_cpp.py."""

from __future__ import annotations

import torch

from .library import FLOATING, kernels, threads, view


def _planar(tensor: torch.Tensor, axes: int) -> torch.Tensor:
    """A tensor whose last `axes` axes are a grid, with a (D, H, W) grid seen as (D * H, W): the
    kernels read the cells of a grid in row-major order and only count them.  A tensor that is not
    contiguous is passed as it is, for the kernels' wrapper to refuse."""
    return tensor.flatten(-3, -2) if axes == 3 and tensor.is_contiguous() else tensor


def hadamard_forward(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, *grid) * filter (P, *grid) / ||filter||, the norm per problem over the grid's
    cells ((H, W), or (D, H, W))."""
    axes = filter.dim() - 1
    out = kernels().hadamard_forward(
        view(_planar(features, axes), "features", FLOATING),
        view(_planar(filter, axes), "filter", (features.dtype,)),
        threads=threads(),
    )
    return torch.from_numpy(out).view(features.shape)


def hadamard_backward(features: torch.Tensor, filter: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of hadamard_forward with respect to the filter, (P, *grid)."""
    axes = filter.dim() - 1
    grad = kernels().hadamard_backward(
        view(_planar(features, axes), "features", FLOATING),
        view(_planar(filter, axes), "filter", (features.dtype,)),
        view(_planar(grad_out, axes), "grad_out", (features.dtype,)),
        threads=threads(),
    )
    return torch.from_numpy(grad).view(filter.shape)


class Hadamard(torch.autograd.Function):
    """features * F.normalize(filter over its grid), differentiable in the filter only: the features
    are the captured breakpoint activations, which L2-CAF never trains."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, filter)
        return hadamard_forward(features, filter)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None]:
        features, filter = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        # autograd often hands in expanded (stride-0) gradients, e.g. from a sum: make them dense.
        return None, hadamard_backward(features, filter, grad_out.contiguous())
