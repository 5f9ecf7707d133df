"""The generic path: the real tail and autograd, for any model and any breakpoint.

Where the tail starts with ops that are affine in the filtered map, they are folded into the
feature map once (caffast.core.folds) and every evaluation starts after them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ...core.constraints import Constraint, Grid
from ...core.losses import Objective
from ...core.breakpoints import Tail
from ...core.folds import FoldedTail


class AutogradProblem:
    """Filtered feature maps through the tail; the gradient flows back to the filter parameters."""

    def __init__(
        self,
        tail: Tail,
        features: torch.Tensor,
        image_index: torch.Tensor,
        objective: Objective,
        constraint: Constraint,
        grid: Grid,
        multiply: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        folded: Optional[FoldedTail] = None,
    ):
        self.tail = tail
        self.features = features
        self.image_index = image_index
        self.objective = objective
        self.constraint = constraint
        self.grid = grid
        self.multiply = multiply or self._multiply
        self.folded = folded

    def _multiply(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        multiplier = self.constraint.multiplier(params, self.grid)
        return (features * multiplier[:, None]).to(features.dtype)

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            params = params.detach().requires_grad_(True)
            images = self.image_index.index_select(0, active)
            if self.folded is not None:
                output = self.folded(self.constraint.multiplier(params, self.grid), images)
            else:
                output = self.tail(self.multiply(self.features.index_select(0, images), params), images)
            loss = self.objective(output, active)
            (grad,) = torch.autograd.grad(loss.sum(), params, allow_unused=True) if loss.requires_grad else (None,)
        if grad is None:
            raise ValueError(self._no_gradient(output))
        return loss.detach(), grad

    def _no_gradient(self, output: torch.Tensor) -> str:
        if not output.requires_grad:
            return (
                "the model's output does not depend differentiably on the breakpoint's feature map (the layers "
                "after it detach it or run without gradients): pick a layer whose output the rest of the network "
                "differentiates"
            )
        return (
            "the loss is not connected to FT (no gradient path): the objective must compute it from FT with "
            "differentiable torch operations (no .detach(), .item(), numpy or new tensors)"
        )
