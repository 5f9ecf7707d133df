"""The solvers of `explain`: "gd", the reference loop, and "exact", which goes past where it stops."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import solve_fused
from ..core.constraints import Constraint
from ..core.exact import DESCENT_STEPS_PER_ITERATION, closed_form, descend, has_closed_form
from ..core.finite import Suspects, check_solution
from ..core.heads import FusedHead
from ..core.loop import LoopSettings, Problem, Solution, solve

SOLVERS = ("gd", "exact")


def optimize(
    solver: str, problem: Problem, fused_head: Optional[FusedHead], backend: str, constraint: Constraint,
    initial: torch.Tensor, settings: LoopSettings, tolerance: float, suspects: Suspects,
) -> Solution:
    """The reference loop's answer; for solver="exact", the closed form where there is one, else the
    loop's answer refined by a descent (caffast.core.exact).  A loss or filter that is not finite in
    the result's precision (the dtype of `initial`) raises a NonFiniteError naming its cause."""
    if solver == "exact" and has_closed_form(fused_head, constraint):
        zeros = torch.zeros(initial.shape[0], dtype=torch.long, device=initial.device)
        solution = Solution(params=closed_form(fused_head).view(initial.shape), iterations=zeros, loss=zeros.double())
        check_solution(solution, constraint, initial.dtype, suspects)
        return solution
    if fused_head is not None:
        solution = solve_fused(backend, fused_head, constraint, initial.double(), settings)
    else:
        solution = solve(problem, initial, settings)
    check_solution(solution, constraint, initial.dtype, suspects)
    if solver == "exact":
        budget = DESCENT_STEPS_PER_ITERATION * settings.max_iter
        params, steps = descend(problem, solution.params, constraint, tolerance, budget)
        solution.params, solution.iterations = params, solution.iterations + steps
        check_solution(solution, constraint, initial.dtype, suspects)
    return solution
