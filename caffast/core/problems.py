"""The problems the shared loop (caffast.core.loop) solves: the loss of a batch of filters and its
gradient, by autograd through the real tail (the generic path) or through a fused head's closed form.

Where the tail starts with ops that are affine in the filtered map, they are folded into the
feature map once (caffast.core.folds) and every evaluation starts after them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .breakpoints import Tail
from .constraints import Constraint, Grid
from .folds import FoldedTail
from .heads import FusedHead, filter_parts
from .losses import Objective


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


class FusedProblem:
    """The fused head's loss as an explicit function of the filter, differentiated by autograd.

    This is the plain PyTorch twin of the compiled fused solvers.  `zeros_negative` differentiates
    at zero cells from the negative side (see filter_parts).
    """

    def __init__(self, head: FusedHead, constraint: Constraint, zeros_negative: bool = False):
        self.head = head
        self.constraint = constraint
        self.zeros_negative = zeros_negative

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head
        cells = math.prod(head.grid)
        with torch.enable_grad():
            params = params.detach().requires_grad_(True)
            # the filter joins the float64 Grams and linear terms in their precision, whatever the
            # constraint's own (the softmax and Gaussian filters follow the parameters' dtype)
            g = self.constraint.multiplier(params, head.grid).flatten(1).to(torch.float64)
            parts = filter_parts(g, head.parts, self.zeros_negative)
            if head.mode == "specific" and head.linear is None:
                products = head.products.index_select(0, head.image.index_select(0, active))
                logits = sum(torch.einsum("pkj,pj->pk", products[:, a], part) for a, part in enumerate(parts))
                output = logits / cells + head.bias
                loss = head.class_loss(output, head.targets.index_select(0, active), None)
            elif head.mode == "specific":
                linear = head.linear.index_select(0, active)
                projection = sum((part * linear[:, a]).sum(1) for a, part in enumerate(parts))
                loss = projection / cells + head.constant.index_select(0, active)
            else:
                z = [parts[0] - 1, *parts[1:]]
                gram = head.gram.index_select(0, head.image.index_select(0, active))
                quadratic = sum(
                    torch.einsum("pi,pij,pj->p", left, gram[:, a, b], right)
                    for a, left in enumerate(z)
                    for b, right in enumerate(z)
                )
                loss = quadratic / (head.classes * cells**2)
            (grad,) = torch.autograd.grad(loss.sum(), params)
        return loss.detach(), grad
