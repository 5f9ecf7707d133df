"""The optimization loop, written once for every backend.

It reproduces the reference loop problem by problem: one update per iteration with the polynomial
schedule, and every `check_every` iterations a check that stops a problem when its loss moved by less
than `min_error` since the previous check (the first check compares with 32767).  The update of the
stopping iteration is kept.  A stopped problem leaves the batch; the others go on unchanged, so the
batch gives what solving each problem alone would.  The first iteration at which a problem's loss is
not finite is recorded, and the loop ends at the next check (caffast.core.finite reports it).
A `progress` callback hears, at every check, how much of the loop's work is done (for progress bars).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from .optimizers import MIN_LEARNING_RATE, make_optimizer, polynomial_lr_decay

INITIAL_PREVIOUS_LOSS = 32767.0

# called at every check of the loop with the share of its work done, from 0 to 1
ProgressCallback = Callable[[float], None]


class Problem(Protocol):
    """What a backend supplies: the loss of each active problem and its gradient."""

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`params` (A, *shape) are the parameters of problems `active` (A,); returns the loss (A,)
        and the gradient with respect to `params`."""
        ...


@dataclass(frozen=True)
class LoopSettings:
    max_iter: int
    lr: float
    min_error: float
    check_every: int
    optimizer: str
    record: bool = False  # keep the parameters at every check, for pictures of the convergence
    end_lr: float = MIN_LEARNING_RATE  # where the schedule ends (the TensorFlow release's: 0)


@dataclass
class Solution:
    """A solver's answer: parameters (P, *shape), steps taken (P,), the loss of the last step (P,),
    and the evaluations of the loss and its gradient each problem used (P,; None: one per step)."""

    params: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # (P,) the first iteration at which each problem's loss was not finite, 0 if none; None where the
    # solver does not record it (the compiled fused solvers)
    first_non_finite: Optional[torch.Tensor] = None
    evaluations: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.evaluations is None:
            self.evaluations = self.iterations


def work_done(iteration: int, active: int, count: int, max_iter: int) -> float:
    """The share of the loop's work done after `iteration` steps with `active` of `count` problems
    still running: a stopped problem counts as done, a running one as far as it went.  The work left
    is an upper bound (a running problem may stop at the next check), so the share only grows."""
    return 1.0 - active * (max_iter - iteration) / (count * max_iter)


def solve(
    problem: Problem, initial: torch.Tensor, settings: LoopSettings, progress: Optional[ProgressCallback] = None
) -> Solution:
    """The loop on every problem from `initial` (module doc).  `progress` is told the share of the work
    done at every check, where the loop synchronizes anyway: it costs nothing and changes nothing."""
    params = initial.clone()
    count = params.shape[0]
    device = params.device
    update = make_optimizer(settings.optimizer, params)
    active = torch.arange(count, device=device)
    previous = torch.full((count,), INITIAL_PREVIOUS_LOSS, dtype=params.dtype, device=device)
    last_loss = torch.zeros(count, dtype=params.dtype, device=device)
    iterations = torch.zeros(count, dtype=torch.long, device=device)
    never = torch.iinfo(torch.long).max
    first_non_finite = torch.full((count,), never, dtype=torch.long, device=device)
    history: list[tuple[int, torch.Tensor]] = []

    for step in range(settings.max_iter):
        loss, grad = problem.loss_and_grad(params.index_select(0, active), active)
        update.step(params, grad, active, polynomial_lr_decay(step, settings.lr, settings.max_iter, settings.end_lr))
        last_loss.index_copy_(0, active, loss.detach().to(params.dtype))
        iterations.index_fill_(0, active, step + 1)
        now = torch.where(torch.isfinite(loss), never, step + 1)
        first_non_finite.index_copy_(0, active, torch.minimum(first_non_finite.index_select(0, active), now))
        if step % settings.check_every == 0:
            if settings.record:
                history.append((step + 1, params.clone()))
            loss = last_loss.index_select(0, active)
            if not bool(torch.isfinite(loss).all()):
                break
            converged = (loss - previous.index_select(0, active)).abs() < settings.min_error
            previous.index_copy_(0, active, loss)
            active = active[~converged]
            if progress is not None:
                progress(work_done(step + 1, active.numel(), count, settings.max_iter))
            if active.numel() == 0:
                break
    return Solution(params, iterations, last_loss, history, torch.where(first_non_finite == never, 0, first_non_finite))
