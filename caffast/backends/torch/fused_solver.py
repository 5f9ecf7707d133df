"""The fused-head solver in plain PyTorch: the shared loop on the head's closed form, the twin of
the compiled solvers (cpp and triton)."""

from __future__ import annotations

import torch

from ...core.constraints import ConstraintLike
from ...core.heads import FusedHead
from ...core.loop import LoopSettings, solve
from ...core.problems import FusedProblem


def solve_fused_torch(
    head: FusedHead, constraint: ConstraintLike, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of `solve_fused`: caffast.core.loop.solve on caffast.core.problems.FusedProblem, same arguments."""
    solution = solve(FusedProblem(head, constraint), params, settings)
    return solution.params, solution.iterations, solution.loss
