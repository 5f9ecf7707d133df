"""Non-finite results are errors: a problem whose loss or filter stops being finite, or whose unit
filter vanishes (its norm overflows or underflows), stops the explanation with a NonFiniteError that
names the problem, what happened and the setting or input to change.  Every solver and backend
hands its solution to `check_solution`; the shared loop also records the first iteration at which a
loss went non-finite, so the message can say when.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .constraints import Constraint
from .loop import Solution

LARGE_FEATURES = 1e6  # a feature map beyond this in magnitude is named as a suspect


class NonFiniteError(ValueError):
    """The optimization produced NaN or Inf, or a filter that vanished; the message says where and why."""


@dataclass(frozen=True)
class Suspects:
    """What a non-finite value can come from, for the message: the problems' names ("(image 0,
    target 207)"), the learning rate, the breakpoint, its feature map and the filter's grid on it
    (tokens and channels-last maps do not hold it in their last two axes), and a user objective."""

    name: Callable[[int], str]
    lr: float
    layer: str
    features: torch.Tensor
    grid: tuple[int, ...]
    objective: bool
    scorer: Callable[[int], Optional[str]] = lambda problem: None  # the callable target that scores it


def _user_code(suspects: Suspects, problem: int) -> Optional[str]:
    """The user's code that computes problem `problem`'s loss, for the message; None: caffast's loss."""
    return "the objective" if suspects.objective else suspects.scorer(problem)


def _describe(value: float) -> str:
    return "NaN" if math.isnan(value) else ("infinite" if math.isinf(value) else f"{value:.3g}")


def _fix(suspects: Suspects, started: bool, loss: bool, problem: int) -> str:
    """The settings and inputs to look at: the learning rate once a step was taken, the layers
    after the breakpoint (and a user objective or target) when the loss is what went wrong."""
    causes = [f"lower lr (now {suspects.lr:g})"] if started else []
    user_code = _user_code(suspects, problem)
    if user_code is not None and loss:
        causes.append(f"check {user_code}: it must return a finite value")
    scale = float(suspects.features.abs().max())
    if scale > LARGE_FEATURES:
        causes.append(f"scale the images down (the feature map of layer {suspects.layer!r} reaches {scale:.3g})")
    if loss:
        causes.append(f"check the layers after {suspects.layer!r}: they can give NaN or Inf on a filtered feature map")
    return ", or ".join(causes)


def check_solution(solution: Solution, constraint: Constraint, dtype: torch.dtype, suspects: Suspects) -> None:
    """Raise a NonFiniteError for the first problem whose loss or filter is not finite in `dtype` (the
    result's precision), or whose unit filter vanished there."""
    check_loss(solution.loss.to(dtype), suspects, solution.first_non_finite, solution.iterations)
    check_filters(solution.params.to(dtype), constraint, suspects)


def check_loss(
    loss: torch.Tensor, suspects: Suspects, first_bad: Optional[torch.Tensor] = None,
    iterations: Optional[torch.Tensor] = None,
) -> None:  # fmt: skip
    """Raise a NonFiniteError for the first problem whose loss (P,) is not finite.  `first_bad` (P,)
    is the first iteration at which each loss went non-finite (0: never), where the loop knows it;
    `iterations` (P,) the steps each problem took."""
    broken = ~torch.isfinite(loss)
    if first_bad is not None:
        broken |= first_bad > 0
    if not bool(broken.any()):
        return
    problem = int(broken.nonzero()[0, 0])
    name, value = suspects.name(problem), _describe(float(loss[problem]))
    iteration = 0 if first_bad is None else int(first_bad[problem])
    if iteration == 1:
        what = f"the loss is not finite at the starting filter of problem {name}, before any step"
    elif iteration > 1:
        what = f"the loss became NaN or infinite at iteration {iteration} of problem {name}"
    elif iterations is not None:
        what = f"the loss of problem {name} is {value} after {int(iterations[problem])} iterations"
    else:
        what = f"the loss of problem {name} is {value} at the returned filter"
    raise NonFiniteError(f"{what}: {_fix(suspects, iteration != 1, loss=True, problem=problem)}")


def check_filters(params: torch.Tensor, constraint: Constraint, suspects: Suspects) -> None:
    """Raise a NonFiniteError for the first problem whose parameters (P, ...) are not finite or whose
    filter, in their dtype, is not (a unit filter whose norm overflowed or underflowed vanishes)."""
    values = params.flatten(1)
    finite = torch.isfinite(values).all(dim=1)
    multiplier = constraint.multiplier(params, suspects.grid).flatten(1)
    if constraint.on_sphere:
        valid = torch.linalg.vector_norm(multiplier, dim=1) > 0.5
    else:
        valid = torch.isfinite(multiplier).all(dim=1)
    broken = ~(finite & valid)
    if not bool(broken.any()):
        return
    problem = int(broken.nonzero()[0, 0])
    name = suspects.name(problem)
    largest = float(values[problem].abs().max())
    if not bool(finite[problem]):
        what = f"the filter of problem {name} became {'NaN' if values[problem].isnan().any() else 'infinite'}"
    elif not constraint.on_sphere:
        what = f"the filter of problem {name} is not finite: its parameters reach {largest:.3g}"
    else:
        what = (
            f"the filter of problem {name} vanished: its values reach {largest:.3g} and its norm "
            f"{'overflows' if largest > 1 else 'underflows'} {str(params.dtype).removeprefix('torch.')}"
        )
    raise NonFiniteError(f"{what}: {_fix(suspects, True, loss=False, problem=problem)}")
