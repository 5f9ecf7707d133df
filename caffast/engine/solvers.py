"""The solvers of `explain`: "gd", the reference loop; "fast", a few evaluations to a lower loss;
"exact", which goes past where both stop."""

from __future__ import annotations

from typing import Optional, get_args

import torch

from ..backends import Backend
from ..backends.torch.graphs import GraphedProblem
from ..core.choices import SolverName
from ..core.constraints import Constraint
from ..core.exact import DESCENT_STEPS_PER_ITERATION, closed_form, descend, has_closed_form
from ..core.fast import fast_minimize
from ..core.finite import Suspects, check_solution
from ..core.heads import FusedHead
from ..core.loop import LoopSettings, Problem, ProgressCallback, Solution, solve
from ..core.problems import FusedProblem
from ..core.settings import Settings

SOLVERS: tuple[SolverName, ...] = get_args(SolverName)


def optimize(
    problem: Problem, fused_head: Optional[FusedHead], backend: Backend, initial: torch.Tensor, chosen: Settings,
    suspects: Suspects, progress: Optional[ProgressCallback] = None,
) -> Solution:
    """The answer of the `chosen` solver for every problem.

    Where a fused head has a closed form, "fast" and "exact" return it.  "fast" otherwise runs the
    bundle method of caffast.core.fast from the reference start.  "exact" descends (caffast.core.exact)
    from the loop's answer, on a generic tail from the better of the loop's and fast's answers, so its
    objective is the lowest of the three.  A loss or filter that is not finite in the result's
    precision (the dtype of `initial`) raises a NonFiniteError naming its cause.  `progress` hears the
    reference loop's checks where it runs in Python (caffast.core.loop.solve); the compiled fused
    loops run whole in one call, and "fast" and the descent of "exact" report nothing.
    """
    solver, constraint, settings = chosen.solver, chosen.filter_constraint, chosen.loop_settings()
    if solver != "gd" and has_closed_form(fused_head, constraint):
        zeros = torch.zeros(initial.shape[0], dtype=torch.long, device=initial.device)
        solution = Solution(params=closed_form(fused_head).view(initial.shape), iterations=zeros, loss=zeros.double())
    elif solver == "fast":
        solution = _fast(problem, initial, chosen, backend)
    else:
        if fused_head is not None:
            solution = fused_loop(backend, fused_head, constraint, initial.double(), settings, progress)
        else:
            graphed = chosen.cuda_graphs and initial.device.type == "cuda"
            solution = solve(GraphedProblem(problem) if graphed else problem, initial, settings, progress)
        if solver == "exact":
            check_solution(solution, constraint, initial.dtype, suspects)  # the loop's own cause first
            start, evaluations = solution.params, solution.evaluations
            if fused_head is None:
                start, evaluations = _better_of(
                    problem, solution, _fast(problem, initial, chosen, backend)
                )
            budget = DESCENT_STEPS_PER_ITERATION * settings.max_iter
            params, steps, descent = descend(problem, start, constraint, chosen.tolerance, budget)
            solution.params, solution.iterations = params, solution.iterations + steps
            solution.evaluations = evaluations + descent
    check_solution(solution, constraint, initial.dtype, suspects)
    return solution


def fused_loop(
    backend: Backend, head: FusedHead, constraint: Constraint, initial: torch.Tensor, settings: LoopSettings,
    progress: Optional[ProgressCallback] = None,
) -> Solution:
    """The reference loop on a fused head: the backend's own where it takes the problem, otherwise the
    shared loop on the head's closed form (which alone reports to `progress`)."""
    solution = backend.solve_fused(head, constraint, initial, settings)
    return solution if solution is not None else solve(FusedProblem(head, constraint), initial, settings, progress)


def _fast(problem: Problem, initial: torch.Tensor, chosen: Settings, backend: Backend) -> Solution:
    result = fast_minimize(problem, initial, chosen.filter_constraint, chosen.tolerance, chosen.max_evaluations,
                           qp=backend.bundle_qp)  # fmt: skip
    return Solution(params=result.params, iterations=result.evaluations, loss=result.loss)


def _better_of(problem: Problem, looped: Solution, fast: Solution) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem, the start with the lower loss (the loop's answer is scored by one more
    evaluation), and the evaluations spent on both."""
    everyone = torch.arange(looped.params.shape[0], device=looped.params.device)
    looped_loss, _ = problem.loss_and_grad(looped.params, everyone)
    use_fast = fast.loss.to(looped_loss.dtype) < looped_loss
    shape = (-1,) + (1,) * (looped.params.dim() - 1)
    params = torch.where(use_fast.view(shape), fast.params.to(looped.params.dtype), looped.params)
    return params, looped.evaluations + fast.evaluations + 1
