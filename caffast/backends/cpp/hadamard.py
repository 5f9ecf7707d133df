"""The Hadamard filter on the CPU (csrc/hadamard.cpp); its plain PyTorch twin is in tests/backends/test_cpp.py."""

from __future__ import annotations

import torch

from .library import FLOATING, kernels, threads, view


def hadamard_forward(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, H, W) * filter (P, H, W) / ||filter||, the norm per problem over H, W."""
    out = kernels().hadamard_forward(
        view(features, "features", FLOATING), view(filter, "filter", (features.dtype,)), threads=threads()
    )
    return torch.from_numpy(out)


def hadamard_backward(features: torch.Tensor, filter: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of hadamard_forward with respect to the filter, (P, H, W)."""
    grad = kernels().hadamard_backward(
        view(features, "features", FLOATING),
        view(filter, "filter", (features.dtype,)),
        view(grad_out, "grad_out", (features.dtype,)),
        threads=threads(),
    )
    return torch.from_numpy(grad)


class Hadamard(torch.autograd.Function):
    """features * F.normalize(filter over H, W), differentiable in the filter only: the features are
    the captured breakpoint activations, which L2-CAF never trains."""

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
