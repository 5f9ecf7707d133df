"""The truncated forward of a fused head: FT[p, k] = sum_j g[p, j] M[p, sigma_j, k, j] / HW + b[k].

sigma_j picks M+ or M- by the sign of g_j after a ReLU (docs/design.md, 'The fused head'); the gradient in g is
the transposed product.  Its twin is caffast.backends.torch.fused_head.fused_head_forward_torch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .runtime import FLOATING, checked, device_function, jit, require, tl, tl_core, tl_sum, triton  # noqa: F401


@device_function
def _sign_offset(g, SIGNS: tl.constexpr, stride):
    """Where each cell's part starts: part 0 for g >= 0, part 1 (stride further) for the other cells
    of a ReLU head; NaN counts as negative, as in torch.where(g >= 0, ...). (One return statement:
    Triton type-checks every return, even in a branch a constexpr rules out.)"""
    if SIGNS == 2:
        offset = tl.where(g >= 0, 0, stride)
    else:
        offset = tl.full(g.shape, 0, tl.int32)
    return offset


@jit
def forward_kernel(
    parts, g, bias, out, classes, cells, SIGNS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Program (p, class block): accumulate the sign-picked columns of M weighted by g."""
    p = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_inside = k < classes
    acc = tl.full([BLOCK_K], 0, out.dtype.element_ty)
    for start in range(0, cells, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        inside = j < cells
        filt = tl.load(g + p * cells + j, mask=inside, other=0.0)
        column = _sign_offset(filt, SIGNS, classes * cells) + j
        mask = k_inside[:, None] & inside[None, :]
        m = tl.load(parts + p * SIGNS * classes * cells + k[:, None] * cells + column[None, :], mask=mask, other=0.0)
        acc += tl_sum(m * filt[None, :], axis=1)
    acc = acc / cells
    if HAS_BIAS:
        acc += tl.load(bias + k, mask=k_inside, other=0.0)
    tl.store(out + p * classes + k, acc, mask=k_inside)


@jit
def backward_kernel(
    parts, g, grad_out, grad_g, classes, cells, SIGNS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr
):
    """Program (p, cell block): grad_g[j] = sum_k grad_FT[k] M[sigma_j, k, j] / HW."""
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    inside = j < cells
    filt = tl.load(g + p * cells + j, mask=inside, other=0.0)
    column = _sign_offset(filt, SIGNS, classes * cells) + j
    acc = tl.full(filt.shape, 0, filt.dtype)
    for start in range(0, classes, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_inside = k < classes
        mask = k_inside[:, None] & inside[None, :]
        m = tl.load(parts + p * SIGNS * classes * cells + k[:, None] * cells + column[None, :], mask=mask, other=0.0)
        upstream = tl.load(grad_out + p * classes + k, mask=k_inside, other=0.0)
        acc += tl_sum(m * upstream[:, None], axis=0)
    tl.store(grad_g + p * cells + j, acc / cells, mask=inside)


_HEAD_BLOCK = 64


def _head_inputs(parts: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    require(parts.device)
    parts = checked(parts, "parts", FLOATING, parts.shape, parts.device)
    if parts.dim() != 4 or parts.shape[1] not in (1, 2):
        raise ValueError(f"parts must be (P, S, K, HW) with S 1 or 2, got shape {tuple(parts.shape)}")
    problems, _, _, cells = parts.shape
    return parts, checked(g, "g", (parts.dtype,), (problems, cells), parts.device)


def fused_head_forward(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """FT (P, K) from the head's parts (P, S, K, HW) (S = 2: M+ then M- of a ReLU head), g (P, HW)
    and the bias (K,) or None."""
    parts, g = _head_inputs(parts, g)
    problems, signs, classes, cells = parts.shape
    if bias is not None:
        bias = checked(bias, "bias", (parts.dtype,), (classes,), parts.device)
    out = torch.empty((problems, classes), dtype=parts.dtype, device=parts.device)
    grid = (problems, triton.cdiv(classes, _HEAD_BLOCK))
    forward_kernel[grid](
        parts, g, parts if bias is None else bias, out, classes, cells,
        SIGNS=signs, HAS_BIAS=bias is not None, BLOCK_K=_HEAD_BLOCK, BLOCK_J=_HEAD_BLOCK,
    )  # fmt: skip
    return out


def fused_head_backward(parts: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of fused_head_forward with respect to g, (P, HW), given grad_out (P, K)."""
    parts, g = _head_inputs(parts, g)
    problems, signs, classes, cells = parts.shape
    grad_out = checked(grad_out, "grad_out", (parts.dtype,), (problems, classes), parts.device)
    grad_g = torch.empty_like(g)
    grid = (problems, triton.cdiv(cells, _HEAD_BLOCK))
    backward_kernel[grid](
        parts, g, grad_out, grad_g, classes, cells, SIGNS=signs, BLOCK_K=_HEAD_BLOCK, BLOCK_J=_HEAD_BLOCK
    )
    return grad_g


class FusedHeadForward(torch.autograd.Function):
    """The fused head's output as a function of the filter g, differentiable in g only: the parts M
    and the bias are fixed by the image and the network."""

    @staticmethod
    def forward(ctx: Any, parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(parts, g)
        return fused_head_forward(parts, g, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, Optional[torch.Tensor], None]:
        parts, g = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        return None, fused_head_backward(parts, g, grad_out), None
