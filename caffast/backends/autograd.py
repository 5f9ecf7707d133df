"""The "torch" backend: the real tail and autograd, for any model and any breakpoint."""

from __future__ import annotations

import torch

from ..filters import Grid, constrained_filter
from ..losses import Objective
from ..split import Tail


class AutogradProblem:
    """Filtered feature maps through the tail; the gradient flows back to the filter parameters."""

    def __init__(
        self,
        tail: Tail,
        features: torch.Tensor,
        image_index: torch.Tensor,
        objective: Objective,
        constraint: str,
        grid: Grid,
    ):
        self.tail = tail
        self.features = features
        self.image_index = image_index
        self.objective = objective
        self.constraint = constraint
        self.grid = grid

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            params = params.detach().requires_grad_(True)
            multiplier = constrained_filter(params, self.constraint, self.grid)
            images = self.image_index.index_select(0, active)
            features = self.features.index_select(0, images)
            filtered = (features * multiplier[:, None]).to(features.dtype)
            loss = self.objective(self.tail(filtered, images), active)
            (grad,) = torch.autograd.grad(loss.sum(), params)
        return loss.detach(), grad
