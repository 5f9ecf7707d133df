"""A few-evaluation solver for L2-CAF problems: a batched, monotone proximal bundle method.

Why a bundle method.  Class-specific L2-CAF through a ReLU tail is piecewise affine in the filter g:
inside one activation region the loss is c^T g + const, and the regions are tiny.  Curvature
estimates from gradient differences (Barzilai-Borwein, quasi-Newton) are meaningless there, and the
minimum the reference walk finds sits in a V-shaped valley where the gradient flips from one
evaluation to the next (measured: gradients 0.01 rad apart have cosine ~0 near gd's answer, 0.999 at
the start).  A proximal bundle method is built for exactly this: it keeps the last K evaluations as
cutting planes

    l_i(y) = L(y_i) + c_i . (y - y_i),

and each iteration minimizes the model  max_i l_i(x + d) + ||d||^2 / (2 t)  around the current
point x.  Its dual is a small quadratic program over the simplex,

    min_lambda  t/2 ||sum_i lambda_i c_i||^2 + sum_i lambda_i alpha_i,

with alpha_i the linearization error of cut i at x (for a non-convex loss, |error| floored by
gamma ||x - y_i||^2, so that far-away cuts fade out).  The step is d = -t sum_i lambda_i c_i: on a
smooth stretch it is a gradient step of length t, across a kink it is the min-norm combination of the
gradients on both sides, which runs along the valley instead of zig-zagging.  A trial point that
lowers the loss by a fraction of the predicted decrease becomes the new centre ("serious step");
otherwise it only adds its cut to the bundle and t shrinks ("null step").  The loss of the
centre therefore never rises.

The same iteration serves every constraint:
- on the sphere ("l2norm"): the parameters are kept at unit norm (the filter f / ||f|| is unchanged).  At unit norm
  the Problem's gradient with respect to f is the Riemannian gradient (the gradient projected on the
  sphere's tangent plane); cuts are transported to the current tangent plane by projection, and a
  step is retracted by normalization.  Step lengths are angles (radians).
- any other parameterization ("softmax", "gauss"): plain Euclidean steps.

The first trial step is long (`first_step`, 0.6 rad by default): the reference SGD, lr 0.5 with
||f|| = sqrt(HW) at the start, crawls by ~0.002 rad per step and travels about 1 rad in 1000 steps;
a long first step covers a large share of that distance at once, and null steps shorten it where
the loss disagrees.

How t moves.  After each trial t is multiplied by 2.5 where the trial achieved at least half of
the decrease the model predicted, kept where it achieved 30 %, and multiplied by 0.7 otherwise
(every null step included).  Long trial points end in lower minima.  On a trained network
(benchmarks/real_tier.py: EfficientNet-Lite0 at blocks.5 and blocks.4, 7 x 7 and 14 x 14 grids)
halving t after each null step brought it down to the scale of the landscape's small kinks within a
few steps, where the method settled in a neighbouring local minimum a little above the reference
loop's answer.  Measured and not kept: starting with the reference loop's own first k steps (k
evaluations; worse for every k from 2 to 10: those steps do not pick the basin the loop ends in,
and they use up evaluations), a non-monotone acceptance against the worst of the last few centres,
and a t fitted to the loss along the previous step (both converge to higher minima).  The growth
factor matters: 2, 2.5 and 3 reach the reference loop's answer on 63, 64 and 62 of the tier's 66
problems (benchmarks/RESULTS.md).

Why fast stops on a stall.  Most of the decrease comes in the first 10 to 15 evaluations; after
that the bundle creeps along a valley, gaining little per evaluation.  A problem stops when its
last `stall_window` evaluations lowered the loss by at most `stall_tolerance` times its decrease
since the start, as the reference loop stops when its loss changed little between two checks, and
its last trial was a null step (a walk of serious steps is converging to a smooth minimum, quickly,
and goes on: stopping it there left fast a hair above the loop on a random convnext_tiny in
benchmarks/quality.py).  On the real tier this cuts the median evaluations from 30 to 18.

Everything is batched: every problem has its own centre, bundle, step length and budget; one
`problem.loss_and_grad` call per iteration evaluates the trial points of the still-active problems.
A problem leaves the active set when its projected gradient at the centre is below `tolerance`
(converged), when its model predicts no decrease above rounding level, when it stalls, or when it
used `max_evaluations` evaluations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .constraints import Constraint
from .loop import Problem


class FastResult(NamedTuple):
    """params: (P, *shape) the best point of each problem (unit norm for l2norm); evaluations: (P,)
    loss_and_grad evaluations each problem used (its start included); converged: (P,) whether the
    projected gradient at params got below the tolerance; loss: (P,) the loss at params (float64)."""

    params: torch.Tensor
    evaluations: torch.Tensor
    converged: torch.Tensor
    loss: torch.Tensor


_QP_ITERATIONS = 150  # accelerated projected-gradient iterations of the bundle's dual QP


def fast_minimize(
    problem: Problem,
    initial: torch.Tensor,
    constraint: Constraint,
    tolerance: float = 1e-8,
    max_evaluations: int = 30,
    *,
    bundle_size: int = 20,
    first_step: float = 0.6,
    max_step: float = 1.0,
    distance_weight: float = 0.6,
    sufficient_decrease: float = 0.1,
    keep_decrease: float = 0.3,
    grow_decrease: float = 0.5,
    growth: float = 2.5,
    shrink: float = 0.7,
    stall_window: int = 4,
    stall_tolerance: float = 3e-3,
    qp: Optional[BundleQP] = None,
) -> FastResult:
    """Minimize each problem from `initial` (P, *shape) with a proximal bundle method (module doc).

    `problem.loss_and_grad(params, active)` is the caffast.core.loop.Problem interface.  `first_step` is
    the length of the first trial step (radians on the sphere, parameter units otherwise), `max_step`
    caps every step, `bundle_size` is the number of cuts kept, `distance_weight` is gamma in the
    non-convex linearization error, and `sufficient_decrease` the fraction of the predicted decrease a
    serious step must achieve.  After each trial, t is multiplied by `growth` where the trial achieved
    at least `grow_decrease` of the predicted decrease, kept where it achieved at least
    `keep_decrease`, and multiplied by `shrink` otherwise.  A problem stalls, and stops, when its last
    `stall_window` evaluations lowered its loss by at most `stall_tolerance` times its decrease since
    the start and its last trial was a null step.  `qp` solves the bundle's dual QP (`bundle_qp`, or
    its compiled copy, which the engine passes when it is built).
    """
    qp = qp or bundle_qp
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be at least 1, got {max_evaluations}")
    if stall_window < 1:
        raise ValueError(f"stall_window must be at least 1, got {stall_window}")
    sphere = constraint.on_sphere
    shape = initial.shape[1:]
    dtype, device = initial.dtype, initial.device
    work = torch.float64
    count = initial.shape[0]
    x = initial.detach().to(work).flatten(1).clone()
    if sphere:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(work).tiny)
    n = x.shape[1]
    everyone = torch.arange(count, device=device)

    def evaluate(points: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, grad = problem.loss_and_grad(points.to(dtype).view(-1, *shape), active)
        grad = grad.detach().to(work).flatten(1)
        if sphere:  # the tangent component (at unit norm it already is the Riemannian gradient)
            grad = grad - (grad * points).sum(1, keepdim=True) * points
        return loss.detach().to(work), grad

    fx, cx = evaluate(x, everyone)
    start_loss = fx.clone()
    evaluations = torch.ones(count, dtype=torch.long, device=device)
    # the bundle: slot 0 is always the centre, slots 1.. a ring of the latest trial points
    K = max(bundle_size, 2)
    Y = torch.zeros(count, K, n, dtype=work, device=device)
    L = torch.zeros(count, K, dtype=work, device=device)
    C = torch.zeros(count, K, n, dtype=work, device=device)
    valid = torch.zeros(count, K, dtype=torch.bool, device=device)
    Y[:, 0], L[:, 0], C[:, 0], valid[:, 0] = x, fx, cx, True
    ring = torch.ones(count, dtype=torch.long, device=device)  # next ring slot to fill
    t = first_step / cx.norm(dim=1).clamp_min(torch.finfo(work).tiny)
    # gamma in loss units: relative to each problem's initial slope, so that the method is invariant
    # to the scale of the loss (logits of random networks range over orders of magnitude)
    gamma = distance_weight * cx.norm(dim=1)
    eps = torch.finfo(dtype).eps
    # the lowest point evaluated: the centre, or a trial that lowered the loss too little to be one
    best, best_loss = x.clone(), fx.clone()
    # the lowest loss after each of the last `stall_window` + 1 evaluations, oldest first (inf: not
    # evaluated yet), for the stall test
    recent = torch.full((count, stall_window + 1), torch.inf, dtype=work, device=device)
    recent[:, -1] = fx

    active = everyone[(cx.norm(dim=1) > tolerance) & (evaluations < max_evaluations)]
    while active.numel() > 0:
        xa, fa, ta = x[active], fx[active], t[active]
        Ya, La, Ca, va = Y[active], L[active], C[active], valid[active]
        if sphere:  # transport the cuts to the tangent plane at the centre
            Ct = Ca - (Ca * xa[:, None]).sum(-1, keepdim=True) * xa[:, None]
        else:
            Ct = Ca
        offset = xa[:, None] - Ya
        linear = La + (Ca * offset).sum(-1)
        alpha = torch.maximum((fa[:, None] - linear).abs(), gamma[active, None] * offset.square().sum(-1))
        alpha = torch.where(va, alpha, torch.inf)
        lam = _bundle_step(Ct, alpha, ta, va, qp)
        v = (lam[..., None] * Ct).sum(1)
        alpha_term = (lam * torch.where(va, alpha, 0)).sum(1)
        predicted = ta * v.square().sum(1) + alpha_term
        d = -ta[:, None] * v
        length = d.norm(dim=1)
        cap = (max_step / length.clamp_min(torch.finfo(work).tiny)).clamp(max=1.0)
        d = d * cap[:, None]
        predicted = predicted * cap
        # a model that predicts nothing above rounding level ends the problem
        hopeless = predicted <= 8 * eps * fa.abs()
        if bool(hopeless.any()):
            active, xa, fa, ta, d, predicted = (
                active[~hopeless], xa[~hopeless], fa[~hopeless], ta[~hopeless], d[~hopeless], predicted[~hopeless]
            )
            if active.numel() == 0:
                break
        trial = xa + d
        if sphere:
            trial = trial / trial.norm(dim=1, keepdim=True)
        ft, ct = evaluate(trial, active)
        evaluations.index_add_(0, active, torch.ones_like(active))
        # the trial point joins the ring (never overwriting slot 0, the centre)
        slot = ring[active]
        Y[active, slot], L[active, slot], C[active, slot], valid[active, slot] = trial, ft, ct, True
        ring[active] = torch.where(slot + 1 >= K, torch.ones_like(slot), slot + 1)
        achieved = fa - ft  # against `predicted`: the model's accuracy decides the centre and t
        serious = achieved >= sufficient_decrease * predicted
        lower = ft < best_loss[active]
        best[active[lower]], best_loss[active[lower]] = trial[lower], ft[lower]
        moved = active[serious]
        x[moved], fx[moved], cx[moved] = trial[serious], ft[serious], ct[serious]
        Y[moved, 0], L[moved, 0], C[moved, 0] = trial[serious], ft[serious], ct[serious]
        factor = torch.where(achieved >= keep_decrease * predicted, 1.0, shrink)
        t[active] = ta * torch.where(achieved >= grow_decrease * predicted, growth, factor)
        lowest = best_loss[active]
        recent[active] = torch.cat([recent[active, 1:], lowest[:, None]], 1)
        decrease = start_loss[active] - lowest
        # only a null step ends a walk: after a serious one the model still predicts progress
        stalled = ~serious & (decrease > 0) & (recent[active, 0] - lowest <= stall_tolerance * decrease)
        done = (cx[active].norm(dim=1) <= tolerance) | (evaluations[active] >= max_evaluations) | stalled
        active = active[~done]

    converged = (cx.norm(dim=1) <= tolerance) & (best_loss == fx)  # params is the converged centre
    params = best.to(dtype).view(count, *shape)
    return FastResult(params, evaluations, converged, best_loss)


# solves the bundle's dual QP: (gram (A, K, K), alpha (A, K), t (A,), valid (A, K), iterations) -> lambda (A, K)
BundleQP = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def _bundle_step(cuts: torch.Tensor, alpha: torch.Tensor, t: torch.Tensor, valid: torch.Tensor,
                 qp: BundleQP) -> torch.Tensor:
    """The bundle's multipliers lambda (A, K) for (A, K, n) cuts, (A, K) errors (inf where a slot is
    empty) and (A,) t.  Only the (A, K, K) Gram matrix depends on n; the QP itself runs on the host."""
    gram = (cuts @ cuts.transpose(1, 2)).to(torch.float64).cpu().numpy()
    lam = qp(gram, alpha.to(torch.float64).cpu().numpy(), t.to(torch.float64).cpu().numpy(),
             valid.cpu().numpy(), _QP_ITERATIONS)  # fmt: skip
    return torch.from_numpy(lam).to(device=cuts.device, dtype=cuts.dtype)


def bundle_qp(gram: np.ndarray, alpha: np.ndarray, t: np.ndarray, valid: np.ndarray, iterations: int) -> np.ndarray:
    """min over the simplex of t/2 lambda^T gram lambda + alpha^T lambda, batched over the first axis
    (only the valid cuts take weight): `iterations` FISTA steps with a Euclidean simplex projection,
    started at the cut of least error (the centre).  The twin of the compiled caffast._C.bundle_qp,
    which agrees with it to rounding."""
    a = np.where(valid, alpha, 0.0)
    steps = t[:, None]
    # a Lipschitz bound of the gradient t * gram @ lambda: t times the largest eigenvalue <= t * trace
    lipschitz = np.maximum(t * np.trace(gram, axis1=1, axis2=2), 1e-300)[:, None]
    start = np.where(valid, alpha, np.inf).argmin(1)
    lam = np.zeros_like(a)
    lam[np.arange(len(start)), start] = 1.0
    previous, z, momentum = lam, lam, 1.0
    for _ in range(iterations):
        grad = steps * np.einsum("akj,aj->ak", gram, z) + a
        lam = _project_simplex(z - grad / lipschitz, valid)
        following = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        z = lam + ((momentum - 1) / following) * (lam - previous)
        previous, momentum = lam, following
    return lam


def _project_simplex(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the simplex over its valid entries (others get 0)."""
    values = np.where(valid, values, -np.inf)
    ordered = -np.sort(-values, axis=1)
    finite = np.isfinite(ordered)
    cumulative = np.where(finite, ordered, 0.0).cumsum(1) - 1
    index = np.arange(1, values.shape[1] + 1, dtype=values.dtype)
    condition = finite & (ordered - cumulative / index > 0)
    rho = condition.cumsum(1).argmax(1)[:, None]  # last index where it holds
    theta = np.take_along_axis(cumulative, rho, 1) / (rho + 1)
    return np.where(valid, np.maximum(values - theta, 0.0), 0.0)
