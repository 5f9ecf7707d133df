"""The L2-projected update on the CPU (csrc/projected_update.cpp); its twin is
caffast.backends.torch.projected_update."""

from __future__ import annotations

import torch

from .library import FLOATING, kernels, threads, view


def projected_update(params: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """params (P, D) -= lr * (grad - g (g . grad)) / ||params|| in place, with g = params / ||params||
    per row and `grad` the gradient with respect to g; returns params."""
    kernels().projected_update(
        view(params, "params", FLOATING), view(grad, "grad", (params.dtype,)), lr, threads=threads()
    )
    return params
