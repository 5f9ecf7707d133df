"""The true minimizer of the L2-CAF objective, for `explain(solver="exact")`.

The reference loop stops when its loss moves by less than `min_error` per check, which is not where
the loss is lowest.  For a plain fused head (docs/design.md, 'The fused head') the minimizer on the unit sphere has
a closed form:

- class-specific with a linear loss s . FT: s^T M g / HW + s^T b is linear in g, so g = -c / ||c|| with c = M^T s.
  After a ReLU the loss is still a sum over cells, |g_j| times c+_j (g_j >= 0) or -c-_j (g_j < 0)
  with c+- = M+-^T s: each cell takes the cheaper sign, and the magnitudes follow the linear case;
- class-oblivious: the loss (g - 1)^T G (g - 1) / (K HW^2) is a quadratic on the sphere, a trust-region
  subproblem with an equality constraint.  Its global minimizer solves (G - lambda I) g = G 1 with
  lambda at most the smallest eigenvalue of G; in the eigenbasis of G that is a one-dimensional root
  search on lambda.  When the component of G 1 along the smallest eigenvalue vanishes (the "hard
  case", common when the classes K are fewer than the cells HW), the root sits at that eigenvalue and
  the rest of the unit norm goes into its eigenspace.

Every other problem (class-oblivious after a ReLU, the softmax and Gaussian constraints, a generic tail) is driven by
`descend` from the reference loop's answer: gradient steps on the sphere with a backtracking line
search until the projected gradient is below a tolerance, so its objective never rises.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .constraints import Constraint
from .heads import FusedHead
from .loop import Problem

_BISECTION_STEPS = 200  # halvings of an interval of width ||G 1||: past float64 resolution
_RESOLUTION = 8 * torch.finfo(torch.float64).eps  # relative width at which a bisection has converged
_SUFFICIENT_DECREASE = 1e-4  # Armijo's constant
_DEGENERATE = 1e-12  # eigenvalues this close (relative to the largest) count as one
DESCENT_STEPS_PER_ITERATION = 10  # the descent's step budget, in units of explain's max_iter


def has_closed_form(head: FusedHead | None, constraint: Constraint) -> bool:
    """Fused heads with the unit-sphere filter, with a linear class-specific loss or a plain head:
    solved without iterating."""
    if head is None or not constraint.on_sphere:
        return False
    return head.is_linear or (head.mode == "oblivious" and head.parts == 1)


def closed_form(head: FusedHead) -> torch.Tensor:
    """The minimizing unit filters (P, HW), float64."""
    if head.mode == "specific":
        return _piecewise_linear_minimizer(head.linear[:, 0], head.linear[:, -1])
    gram = head.gram[:, 0, 0].index_select(0, head.image)
    return _sphere_quadratic_minimizer(gram)


def _piecewise_linear_minimizer(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """argmin over the unit sphere of sum_j g_j * (positive_j if g_j >= 0 else negative_j).

    A cell costs |g_j| * min(positive_j, -negative_j) with the sign that attains it, so the minimizer
    puts weight max(-positive_j, negative_j, 0) on each cell, normalized.  When no cell can lower the
    loss, all the weight goes to the least costly cell (spread evenly where that cost is zero, which
    costs nothing).  A plain head is the case positive = negative, where this is -c / ||c||.
    """
    cheaper_non_negative = -positive >= negative
    cost = torch.where(cheaper_non_negative, positive, -negative)
    weight = (-cost).clamp_min(0)
    lowest = cost.amin(dim=1, keepdim=True)
    first_lowest = F.one_hot(cost.argmin(dim=1), cost.shape[1]).to(cost.dtype)
    free = (cost == 0).to(cost.dtype)
    weight = torch.where(lowest < 0, weight, torch.where(lowest == 0, free, first_lowest))
    return F.normalize(torch.where(cheaper_non_negative, weight, -weight), dim=1)


def _sphere_quadratic_minimizer(gram: torch.Tensor) -> torch.Tensor:
    """argmin of (g - 1)^T G (g - 1) over the unit sphere, for a batch of PSD Grams (P, n, n)."""
    ones = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)
    target = (gram @ ones[..., None])[..., 0]  # b = G 1
    eigenvalues, basis = torch.linalg.eigh(gram)  # ascending
    beta = (basis.transpose(1, 2) @ target[..., None])[..., 0]  # b in the eigenbasis
    lowest = eigenvalues[:, :1]
    spread = eigenvalues.abs().amax(dim=1, keepdim=True)
    bottom = eigenvalues <= lowest + _DEGENERATE * spread  # the smallest eigenvalue's eigenspace
    above = ~bottom
    tiny = torch.finfo(gram.dtype).tiny
    # b's weight in the bottom eigenspace; at rounding level it is zero (b = G 1 has none in G's null space)
    bottom_weight = torch.where(bottom, beta, 0).square().sum(1, keepdim=True)
    significant = bottom_weight.sqrt() > 1e-10 * torch.linalg.vector_norm(target, dim=1, keepdim=True)
    bottom_weight = torch.where(significant, bottom_weight, 0)

    def coefficients_above(shift: torch.Tensor) -> torch.Tensor:
        """g's coordinates beta_i / (d_i - lambda) along the eigenvalues above the bottom one."""
        return torch.where(above, beta / torch.where(above, eigenvalues - shift, 1.0), 0)

    # ||g(lambda)||^2 rises from 0 towards its value at the lowest eigenvalue; at lowest - ||b||
    # every term is at most beta_i^2 / ||b||^2, so it is at most 1 there: bisect in between
    high = lowest.clone()
    low = lowest - torch.linalg.vector_norm(target, dim=1, keepdim=True)
    for step in range(_BISECTION_STEPS):
        if step % 16 == 0 and bool(((high - low) <= _RESOLUTION * torch.maximum(low.abs(), high.abs())).all()):
            break  # every interval is down to a few units in the last place
        middle = (low + high) / 2
        gap = (lowest - middle).clamp_min(tiny)
        too_long = coefficients_above(middle).square().sum(1, keepdim=True) + bottom_weight / gap.square() > 1
        high = torch.where(too_long, middle, high)
        low = torch.where(too_long, low, middle)
    coefficients = coefficients_above(low)
    # the bottom eigenspace's share of the unit norm: b's own component there, or, in the hard case
    # (the norm stays below 1 up to the lowest eigenvalue), the rest of the norm, put along the
    # minimizer nearest to the reference's start (the ones vector)
    at_lowest = coefficients_above(lowest).square().sum(1, keepdim=True)
    hard = ~significant & (at_lowest < 1)
    coefficients = torch.where(hard, coefficients_above(lowest), coefficients)
    share = torch.where(
        significant,
        bottom_weight.sqrt() / (lowest - low).clamp_min(tiny),
        torch.where(hard, (1 - at_lowest).clamp_min(0).sqrt(), 0),
    )
    ones_there = torch.where(bottom, (basis.transpose(1, 2) @ ones[..., None])[..., 0], 0)
    first = torch.zeros_like(beta)
    first[:, 0] = 1
    along = torch.where(significant, torch.where(bottom, beta, 0), ones_there)
    along_norm = torch.linalg.vector_norm(along, dim=1, keepdim=True)
    along = torch.where(along_norm > 0, along / along_norm.clamp_min(tiny), first)
    coefficients = coefficients + share * along
    return F.normalize((basis @ coefficients[..., None])[..., 0], dim=1)


def descend(
    problem: Problem, initial: torch.Tensor, constraint: Constraint, tolerance: float, max_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient descent from `initial` until the projected gradient is below `tolerance`.

    Each accepted step sets the next step length by Barzilai and Borwein's rule (s.s / s.y, the
    inverse curvature along the last move), which copes with ill-conditioned problems (a Gaussian's
    mean running off the grid) far better than a fixed schedule; a step that does not lower the loss
    enough (Armijo's test) is shortened fourfold and retried.  A problem also stops when no step
    decreases its loss any more (the precision floor: float32 losses end well above a small
    tolerance), or after `max_steps` tries.  On the sphere the parameters are kept at unit norm,
    where the gradient with respect to them is the projected gradient and a step followed by
    normalization is the retraction.  Returns the parameters, the steps each problem took and the
    evaluations of the loss each used (its start included).

    This is not a second copy of the reference loop (caffast.core.loop, shared by every backend): it is
    the other solver, with its own steps and stopping rule, driven through the same Problem interface.
    """
    params = constraint.retract(initial.clone())
    count = params.shape[0]
    everyone = torch.arange(count, device=params.device)
    loss, grad = problem.loss_and_grad(params, everyone)
    loss, grad = loss.to(params.dtype), grad.to(params.dtype)
    step = torch.ones(count, dtype=params.dtype, device=params.device)
    steps = torch.zeros(count, dtype=torch.long, device=params.device)
    evaluations = torch.ones(count, dtype=torch.long, device=params.device)
    active = everyone[_norms(grad) > tolerance]
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        current, slope = params.index_select(0, active), grad.index_select(0, active)
        rate = step.index_select(0, active)
        trial = constraint.retract(current - _expand(rate, slope) * slope)
        trial_loss, trial_grad = problem.loss_and_grad(trial, active)
        evaluations.index_add_(0, active, torch.ones_like(active))
        trial_loss, before = trial_loss.to(params.dtype), loss.index_select(0, active)
        decrease = before - trial_loss
        sufficient = decrease >= _SUFFICIENT_DECREASE * rate * _norms(slope).square()
        # at the precision floor the loss cannot tell points apart; the gradient still can
        level = decrease >= -8 * torch.finfo(params.dtype).eps * before.abs()
        accepted = sufficient | (level & (_norms(trial_grad) < _norms(slope)))
        moved = active[accepted]
        params.index_copy_(0, moved, trial[accepted])
        loss.index_copy_(0, moved, trial_loss[accepted].to(params.dtype))
        grad.index_copy_(0, moved, trial_grad[accepted].to(params.dtype))
        steps.index_add_(0, moved, torch.ones_like(moved))
        moves, turns = (trial - current).flatten(1), (trial_grad.to(params.dtype) - slope).flatten(1)
        curvature = (moves * turns).sum(1)
        inverse_curvature = moves.square().sum(1) / curvature.clamp_min(torch.finfo(params.dtype).tiny)
        longer = torch.where(curvature > 0, inverse_curvature, rate * 2)
        step.index_copy_(0, active, torch.where(accepted, longer, rate / 4))
        # a step too small to change the parameters, or a gradient below the tolerance, ends a problem
        movement = step.index_select(0, active) * _norms(grad.index_select(0, active))
        scale = _norms(params.index_select(0, active)).clamp_min(1.0)
        still = (movement > torch.finfo(params.dtype).eps * scale) & (_norms(grad.index_select(0, active)) > tolerance)
        active = active[still]
    return params, steps, evaluations


def stationarity(
    problem: Problem, params: torch.Tensor, constraint: Constraint, mirrored: Optional[Problem] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss at `params` and the norm of its projected gradient (the gradient on the sphere's
    tangent plane for l2norm, the plain gradient for the other parameterizations).

    `mirrored` is the same problem differentiated from the other side of a ReLU head's kink.  At a
    cell where the filter is exactly zero the loss has two one-sided slopes; the gradient takes the
    one of least magnitude between them (zero when they straddle zero), the minimal-norm subgradient,
    so that a minimizer with zero cells reports a vanishing norm too.
    """
    at = constraint.retract(params.clone())
    everyone = torch.arange(at.shape[0], device=at.device)
    loss, grad = problem.loss_and_grad(at, everyone)
    if mirrored is not None:
        _, other = mirrored.loss_and_grad(at, everyone)
        least = torch.minimum(grad, other).clamp_min(0) + torch.maximum(grad, other).clamp_max(0)
        grad = torch.where(at == 0, least, grad)
    return loss, _norms(grad)


def _norms(values: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(values.flatten(1), dim=1)


def _expand(rates: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rates.view(-1, *([1] * (like.dim() - 1)))
