"""The fused-head solver in plain PyTorch: the shared loop on the head's closed form, the twin of
the compiled solvers (cpp and triton)."""

from __future__ import annotations

import torch

from ...core.constraints import Constraint
from ...core.heads import FusedHead, FusedProblem
from ...core.loop import LoopSettings, solve


def solve_fused_torch(
    head: FusedHead, constraint: Constraint, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of `solve_fused`: caffast.core.loop.solve on caffast.core.heads.FusedProblem, same arguments."""
    solution = solve(FusedProblem(head, constraint), params, settings)
    return solution.params, solution.iterations, solution.loss
