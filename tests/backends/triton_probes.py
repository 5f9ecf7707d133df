"""Probe kernels: each runs one group of the fused solver's device functions on its own, so that
tests/backends/test_triton.py holds it equal to its plain PyTorch twin (the solver itself is tested whole).

- projected_step: the gradient through g = f / ||f||, the learning-rate schedule, SGD or Adam
  (caffast.backends.triton.device), one step for some rows of a batch;
- head_forward and head_backward: the fused head's FT and its transposed product
  (caffast.backends.triton.fused_head), with an upstream gradient of the caller's.

The launchers check nothing: the tests hand them dense tensors of one dtype on one device.
"""

from __future__ import annotations

from typing import Optional

import torch

from caffast.backends.triton.device import BETA1, BETA2, optimizer_step, scheduled_lr, sphere_grad
from caffast.backends.triton.fused_head import head_gradient, head_logits, negative_cells
from caffast.backends.triton.runtime import block_size, jit, scalars, tl, tl_core, triton  # noqa: F401 (tl_core: see runtime)

HEAD_BLOCK_K = 64  # classes per block: the tests use more classes than one block


@jit
def projected_step_kernel(params, grad_g, active, first, second, settings, dim, BLOCK_D: tl.constexpr,
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
    """Step `step` (0-based) of the loop for the rows `active` (A,) of params (P, D), in place, given
    grad_g (A, D), the gradient with respect to g = f / ||f|| of those rows; Adam's moments (P, D)
    are updated in place too.  Returns params."""
    moments = (first_moment, second_moment) if optimizer == "adam" else (params, params)
    settings = scalars([lr, step, max_iter, BETA1 ** (step + 1), BETA2 ** (step + 1)], params)
    dim = params.shape[1]
    projected_step_kernel[(active.numel(),)](
        params, grad_g, active, *moments, settings, dim, BLOCK_D=block_size(dim), OPTIMIZER=optimizer
    )
    return params


@jit
def head_forward_kernel(products, g, bias, out, class_count, CELLS: tl.constexpr, SIGNS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Program (p, class block): FT of problem p for a block of classes."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_N)
    inside = cell < CELLS
    filt = tl.load(g + p * CELLS + cell, mask=inside, other=0.0)
    part = tl.where(negative_cells(filt, cell, SIGNS), 1, 0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    logits, _ = head_logits(filt, cell, inside, part, products + p * (SIGNS * class_count * CELLS), bias, ks,
                            class_count, CELLS)  # fmt: skip
    tl.store(out + p * class_count + ks, logits, mask=ks < class_count)


@jit
def head_backward_kernel(products, g, bias, grad_out, grad_g, class_count, CELLS: tl.constexpr, SIGNS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Program p: sum over the classes k of grad_out[p, k] dFT[p, k]/dg, the classes BLOCK_K at a time."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_N)
    inside = cell < CELLS
    filt = tl.load(g + p * CELLS + cell, mask=inside, other=0.0)
    part = tl.where(negative_cells(filt, cell, SIGNS), 1, 0)
    grad = tl.full(filt.shape, 0, filt.dtype)
    for start in range(0, class_count, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        _, tile = head_logits(filt, cell, inside, part, products + p * (SIGNS * class_count * CELLS), bias, ks,
                              class_count, CELLS)  # fmt: skip
        grad += head_gradient(tile, tl.load(grad_out + p * class_count + ks, mask=ks < class_count, other=0.0))
    tl.store(grad_g + p * CELLS + cell, grad / CELLS, mask=inside)


def _head_launch(parts: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """The constexprs of a head probe for parts (P, S, K, HW), and the bias (zeros for None)."""
    _, signs, classes, cells = parts.shape
    if bias is None:
        bias = torch.zeros(classes, dtype=parts.dtype, device=parts.device)
    return dict(CELLS=cells, SIGNS=signs, BLOCK_N=block_size(cells), BLOCK_K=HEAD_BLOCK_K), bias


def head_forward(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """FT (P, K) from the head's parts (P, S, K, HW) (S = 2: M+ then M- of a ReLU head), g (P, HW)
    and the bias (K,) or None."""
    problems, _, classes, _ = parts.shape
    constants, bias = _head_launch(parts, bias)
    out = torch.empty((problems, classes), dtype=parts.dtype, device=parts.device)
    grid = (problems, triton.cdiv(classes, HEAD_BLOCK_K))
    head_forward_kernel[grid](parts, g, bias, out, classes, **constants)
    return out


def head_backward(parts: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of head_forward with respect to g, (P, HW), given grad_out (P, K)."""
    problems, _, classes, _ = parts.shape
    constants, bias = _head_launch(parts, None)
    grad_g = torch.empty_like(g)
    head_backward_kernel[(problems,)](parts, g, bias, grad_out, grad_g, classes, **constants)
    return grad_g
