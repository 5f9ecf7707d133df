"""The L2-projected update in plain PyTorch: the twin of triton.projected_update and cpp.projected_update."""

from __future__ import annotations

from typing import Optional

import torch

from ...core.constraints import NORM_EPS
from ...core.optimizers import make_optimizer, polynomial_lr_decay


def sphere_grad_torch(f: torch.Tensor, grad_g: torch.Tensor) -> torch.Tensor:
    """Twin of triton.device.sphere_grad, per row of (P, D): the gradient in f given the gradient in g = f / ||f||."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(NORM_EPS)
    g = f / norm
    radial = torch.where(norm > NORM_EPS, (g * grad_g).sum(dim=1, keepdim=True), 0)
    return (grad_g - g * radial) / norm


def projected_step_torch(
    params: torch.Tensor,
    grad_g: torch.Tensor,
    active: torch.Tensor,
    step: int,
    *,
    lr: float,
    max_iter: int,
    optimizer: str,
    first_moment: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Twin of `projected_step`, built from caffast.core.optimizers' own schedule and update rules."""
    update = make_optimizer(optimizer, params)
    if optimizer == "adam":  # hand it the caller's state, `step` steps in
        update.first_moment, update.second_moment, update.steps = first_moment, second_moment, step
    grad_f = sphere_grad_torch(params.index_select(0, active), grad_g)
    update.step(params, grad_f, active, polynomial_lr_decay(step, lr, max_iter))
    return params
