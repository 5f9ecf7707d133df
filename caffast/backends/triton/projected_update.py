"""The L2-projected update: through g = f / ||f||, the schedule, SGD or Adam, in place, one kernel.

Its twin is caffast.backends.torch.projected_update.projected_step_torch.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core.choices import check_choice
from ...core.optimizers import COMPILED_OPTIMIZERS
from .device import BETA1, BETA2, optimizer_step, scheduled_lr, sphere_grad
from .runtime import FLOATING, block_size, checked, in_place, jit, require, scalars, tl, tl_core  # noqa: F401


@jit
def kernel(params, grad_g, active, first, second, settings, dim, BLOCK_D: tl.constexpr,
           OPTIMIZER: tl.constexpr):  # fmt: skip
    """Program a: the row active[a] of params takes its step; settings = lr, step, max_iter,
    beta1 ** (step + 1), beta2 ** (step + 1)."""
    a = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < dim
    row = tl.load(active + a) * dim + d
    f = tl.load(params + row, mask=inside, other=0.0)
    grad_f = sphere_grad(f, tl.load(grad_g + a * dim + d, mask=inside, other=0.0))
    lr = scheduled_lr(tl.load(settings), tl.load(settings + 1), tl.load(settings + 2))
    if OPTIMIZER == "adam":
        m = tl.load(first + row, mask=inside, other=0.0)
        v = tl.load(second + row, mask=inside, other=0.0)
    else:
        m = f
        v = f
    f, m, v = optimizer_step(f, grad_f, m, v, lr, tl.load(settings + 3), tl.load(settings + 4), OPTIMIZER)
    tl.store(params + row, f, mask=inside)
    if OPTIMIZER == "adam":
        tl.store(first + row, m, mask=inside)
        tl.store(second + row, v, mask=inside)


def projected_step(
    params: torch.Tensor,
    grad_g: torch.Tensor,
    active: torch.Tensor,
    step: int,
    *,
    lr: float,
    max_iter: int,
    optimizer: str,
    first_moment: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Step `step` (0-based) of the loop for the rows `active` (A,) int64 of params (P, D), in place.

    grad_g (A, D) is the gradient with respect to g = f / ||f|| of those rows; the step goes through
    the normalization, uses lr_t = polynomial_lr_decay(step, lr, max_iter) and SGD, or Adam (torch's
    defaults, bias correction for step + 1) with its moments (P, D) updated in place. Returns params.
    """
    check_choice("optimizer", optimizer, COMPILED_OPTIMIZERS)
    if not isinstance(params, torch.Tensor) or params.dim() != 2:
        raise TypeError("params must be a (P, D) tensor")
    require(params.device)
    in_place(params, "params", FLOATING, params.shape, params.device)
    active = checked(active, "active", (torch.int64,), (active.numel(),), params.device)
    grad_g = checked(grad_g, "grad_g", (params.dtype,), (active.numel(), params.shape[1]), params.device)
    moments = (params, params)
    if optimizer == "adam":
        if first_moment is None or second_moment is None:
            raise ValueError("adam needs first_moment and second_moment")
        moments = tuple(
            in_place(moment, name, (params.dtype,), params.shape, params.device)
            for moment, name in ((first_moment, "first_moment"), (second_moment, "second_moment"))
        )
    if active.numel() == 0:
        return params
    settings = scalars([lr, step, max_iter, BETA1 ** (step + 1), BETA2 ** (step + 1)], params)
    dim = params.shape[1]
    kernel[(active.numel(),)](
        params, grad_g, active, *moments, settings, dim, BLOCK_D=block_size(dim), OPTIMIZER=optimizer
    )
    return params
