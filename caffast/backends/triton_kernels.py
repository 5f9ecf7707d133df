"""Triton kernels for caffast, each beside the plain PyTorch twin it must equal.

1. `Hadamard`: features * f / ||f|| and its gradient in f (the generic tail's filter multiply).
2. `FusedHeadForward`: the truncated forward FT = M_sigma g / HW + b of a fused head, and its gradient in g.
3. `projected_step`: the gradient through g = f / ||f||, the learning-rate schedule and SGD or Adam, fused.
4. `solve_fused`: the whole fused-head optimization of a batch, one program per problem, one launch.

The kernels take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported (the interpreter, which is how the tests run without a GPU).

Precision: Triton types a Python float kernel argument as float32, so every float setting reaches a
kernel in a small tensor of the compute dtype; float literals inside kernels meet a tensor in a binary
operation or tl.where, where they take that tensor's dtype (tl.maximum would round them to float32).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..filters import CONSTRAINTS, check_choice, parameter_shape
from ..heads import FusedHead, FusedProblem, filter_parts
from ..optim import OPTIMIZERS, make_optimizer, polynomial_lr_decay
from ..solve import INITIAL_PREVIOUS_LOSS, LoopSettings, solve

try:
    import triton
    import triton.language as tl
    import triton.language.core as tl_core  # seen by the interpreter: see _InterpretedDeviceFunction
except ImportError as error:  # the module still imports; available() says False
    triton = tl = tl_core = None
    _IMPORT_ERROR: Optional[ImportError] = error
else:
    _IMPORT_ERROR = None

# Triton decides at decoration time whether a kernel is compiled or interpreted.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MODES = ("oblivious", "specific")
FLOATING = (torch.float32, torch.float64)

NORM_EPS = 1e-12  # F.normalize's eps
MIN_LR = 1e-5  # polynomial_lr_decay's floor
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
# Elements per Gram tile in the solver: on a GPU small enough for 8 warps to hold it without
# spilling (ptxas, sm_90: 128 registers for 7 x 7 and 14 x 14 ReLU heads); in the interpreter, where
# every operation costs about the same whatever its size, large.
TILE = 4096 if _INTERPRETED else 1024


def _jit(fn: Callable) -> Any:
    """triton.jit when triton imported; otherwise the plain function, never launched."""
    return fn if triton is None else triton.jit(fn)


class _InterpretedDeviceFunction:
    """A device function under TRITON_INTERPRET=1, called without re-patching triton.language.

    The interpreter patches the language for the whole launch, yet also again at every device
    function call (an inspect.getmembers sweep), which was 70% of the interpreted solver's time.
    A launch patches the triton.language modules that the kernel's globals hold: this module holds
    triton.language.core too, which tl.sum and tl.max use, so they can be called this way as well.
    """

    def __init__(self, interpreted: Any):
        self.interpreted = interpreted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.interpreted.rewrite()(*args, **kwargs)


def _fast(jitted: Any) -> Any:
    """A jitted device function, wrapped as _InterpretedDeviceFunction when interpreted."""
    return _InterpretedDeviceFunction(jitted) if hasattr(jitted, "rewrite") else jitted


def _device(fn: Callable) -> Any:
    """_jit for functions called from kernels."""
    return _fast(_jit(fn))


# tl.sum and tl.max are jitted device functions too: the kernels call them through these names
_sum = None if tl is None else _fast(tl.sum)
_max = None if tl is None else _fast(tl.max)


def _constexpr(value: float) -> Any:
    """Kernels may read a global only when it is a tl.constexpr."""
    return value if tl is None else tl.constexpr(value)


_NORM_EPS, _MIN_LR = _constexpr(NORM_EPS), _constexpr(MIN_LR)
_BETA1, _BETA2, _ADAM_EPS = _constexpr(BETA1), _constexpr(BETA2), _constexpr(ADAM_EPS)


def available() -> bool:
    """Whether the kernels can run here: triton imported, and a CUDA device or the interpreter."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


def require(device: torch.device) -> None:
    """Raise a clear RuntimeError unless the kernels can run on `device`."""
    if triton is None:
        raise RuntimeError(
            f"the caffast Triton backend needs triton ({_IMPORT_ERROR}); install it with: pip install triton"
        ) from _IMPORT_ERROR
    if device.type == "cuda" or _INTERPRETED:
        return
    raise RuntimeError(
        f"the caffast Triton kernels run on CUDA tensors, got {device}; for CPU tensors set TRITON_INTERPRET=1 "
        "before triton is first imported (the interpreter: slow, for tests)"
    )


def _checked(
    tensor: Any, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """`tensor`, contiguous, after checking its type, dtype, shape and device (nothing is converted)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise TypeError(f"{name} must be {wanted}, got {str(tensor.dtype).removeprefix('torch.')}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other inputs on {device}")
    return tensor.contiguous()


def _in_place(
    tensor: Any, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """_checked for a tensor the kernel updates: it must be dense already, as a copy would drop the update."""
    if _checked(tensor, name, dtypes, shape, device) is not tensor:
        raise ValueError(f"{name} is updated in place and must be contiguous; call .contiguous() first")
    return tensor


def _block(count: int, least: int = 1) -> int:
    return max(triton.next_power_of_2(max(count, 1)), least)


def _scalars(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Float settings for a kernel, in the compute dtype (a float argument would be float32)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------
# Shared device functions: the sphere, the schedule and the update rules, written once.


@_device
def _sphere(f):
    """g = f / max(||f||, eps) over a row held in registers (F.normalize), and the clamped norm."""
    norm = tl.sqrt(_sum(f * f, axis=0))
    norm = tl.where(norm > _NORM_EPS, norm, _NORM_EPS)
    return f / norm, norm


@_device
def _sphere_grad(f, grad_g):
    """(grad_g - g (g . grad_g)) / n; with the clamp active the norm is constant and only grad_g / eps stays."""
    g, norm = _sphere(f)
    radial = tl.where(norm > _NORM_EPS, _sum(g * grad_g, axis=0), 0.0)
    return (grad_g - g * radial) / norm


def sphere_grad_torch(f: torch.Tensor, grad_g: torch.Tensor) -> torch.Tensor:
    """Twin of _sphere_grad, per row of (P, D): the gradient in f given the gradient in g = f / ||f||."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(NORM_EPS)
    g = f / norm
    radial = torch.where(norm > NORM_EPS, (g * grad_g).sum(dim=1, keepdim=True), 0)
    return (grad_g - g * radial) / norm


@_device
def _scheduled_lr(lr, step, total):
    """caffast.optim.polynomial_lr_decay; the step and the iteration count arrive as floats."""
    return (lr - _MIN_LR) * (1 - step / total) + _MIN_LR


@_device
def _optimizer_step(f, grad, m, v, lr, beta1_power, beta2_power, OPTIMIZER: tl.constexpr):
    """One step of caffast.optim's SGD or Adam, operation by operation as torch.optim.Adam (single
    tensor) does it; beta*_power are beta ** k for the k-th step."""
    if OPTIMIZER == "adam":
        m = m + (1 - _BETA1) * (grad - m)
        v = v * _BETA2 + (1 - _BETA2) * grad * grad
        step_size = lr / (1 - beta1_power)
        denom = tl.sqrt(v) / tl.sqrt(1 - beta2_power) + _ADAM_EPS
        f = f - step_size * (m / denom)
    else:
        f = f - lr * grad
    return f, m, v


# --------------------------------------------------------------------------------------------------
# 1. The Hadamard filter: features (P, C, H, W) * f / ||f|| with f (P, H, W).


def hadamard_torch(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """Twin of `Hadamard`: autograd gives its backward."""
    return features * F.normalize(filter.flatten(1), dim=1).view_as(filter)[:, None]


@_jit
def _hadamard_forward_kernel(features, filter, out, channels, cells, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Program (p, channel block): the filter row is normalized in registers, then scales the block."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_HW)
    inside = cell < cells
    g, _ = _sphere(tl.load(filter + p * cells + cell, mask=inside, other=0.0))
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (channel < channels)[:, None] & inside[None, :]
    index = (p * channels + channel)[:, None] * cells + cell[None, :]
    tl.store(out + index, tl.load(features + index, mask=mask, other=0.0) * g[None, :], mask=mask)


@_jit
def _hadamard_backward_kernel(
    features, filter, grad_out, grad_filter, channels, cells, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr
):
    """Program p: grad_g = sum over channels of grad_out * features, then through the normalization."""
    p = tl.program_id(0).to(tl.int64)
    cell = tl.arange(0, BLOCK_HW)
    inside = cell < cells
    f = tl.load(filter + p * cells + cell, mask=inside, other=0.0)
    grad_g = tl.full(f.shape, 0, f.dtype)
    for start in range(0, channels, BLOCK_C):
        channel = start + tl.arange(0, BLOCK_C)
        mask = (channel < channels)[:, None] & inside[None, :]
        index = (p * channels + channel)[:, None] * cells + cell[None, :]
        upstream = tl.load(grad_out + index, mask=mask, other=0.0)
        grad_g += _sum(upstream * tl.load(features + index, mask=mask, other=0.0), axis=0)
    tl.store(grad_filter + p * cells + cell, _sphere_grad(f, grad_g), mask=inside)


def _hadamard_blocks(cells: int) -> tuple[int, int]:
    """A (channels x cells) tile of about 4096 elements, whole rows of cells."""
    block_hw = _block(cells)
    return max(1, 4096 // block_hw), block_hw


def hadamard_forward(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, H, W) * filter (P, H, W) / ||filter||, the norm per problem over H, W."""
    require(features.device)
    features = _checked(features, "features", FLOATING, features.shape, features.device)
    if features.dim() != 4:
        raise ValueError(f"features must be (P, C, H, W), got shape {tuple(features.shape)}")
    problems, channels, height, width = features.shape
    filter = _checked(filter, "filter", (features.dtype,), (problems, height, width), features.device)
    out = torch.empty_like(features)
    block_c, block_hw = _hadamard_blocks(height * width)
    grid = (problems, triton.cdiv(channels, block_c))
    _hadamard_forward_kernel[grid](features, filter, out, channels, height * width, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return out


def hadamard_backward(features: torch.Tensor, filter: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of hadamard_forward with respect to the filter, (P, H, W)."""
    require(features.device)
    features = _checked(features, "features", FLOATING, features.shape, features.device)
    problems, channels, height, width = features.shape
    filter = _checked(filter, "filter", (features.dtype,), (problems, height, width), features.device)
    grad_out = _checked(grad_out, "grad_out", (features.dtype,), features.shape, features.device)
    grad_filter = torch.empty_like(filter)
    block_c, block_hw = _hadamard_blocks(height * width)
    _hadamard_backward_kernel[(problems,)](
        features, filter, grad_out, grad_filter, channels, height * width, BLOCK_C=block_c, BLOCK_HW=block_hw
    )
    return grad_filter


class Hadamard(torch.autograd.Function):
    """features * F.normalize(filter over H, W), differentiable in the filter only: the features are
    the captured breakpoint activations, which L2-CAF never trains."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, filter)
        return hadamard_forward(features, filter)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, Optional[torch.Tensor]]:
        features, filter = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        return None, hadamard_backward(features, filter, grad_out)


# --------------------------------------------------------------------------------------------------
# 2. The truncated forward of a fused head: FT[p, k] = sum_j g[p, j] M[p, sigma_j, k, j] / HW + b[k].


def fused_head_forward_torch(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Twin of `FusedHeadForward`: parts (P, S, K, HW), g (P, HW), bias (K,) or None -> FT (P, K)."""
    cells = g.shape[1]
    pieces = filter_parts(g, parts.shape[1])
    out = sum(torch.einsum("pkj,pj->pk", parts[:, a], piece) for a, piece in enumerate(pieces)) / cells
    return out if bias is None else out + bias


@_device
def _sign_offset(g, SIGNS: tl.constexpr, stride):
    """Where each cell's part starts: part 0 for g >= 0, part 1 (stride further) for the other cells
    of a ReLU head; NaN counts as negative, as in torch.where(g >= 0, ...). (One return statement:
    Triton type-checks every return, even in a branch a constexpr rules out.)"""
    if SIGNS == 2:
        offset = tl.where(g >= 0, 0, stride)
    else:
        offset = tl.full(g.shape, 0, tl.int32)
    return offset


@_jit
def _fused_head_forward_kernel(
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
        acc += _sum(m * filt[None, :], axis=1)
    acc = acc / cells
    if HAS_BIAS:
        acc += tl.load(bias + k, mask=k_inside, other=0.0)
    tl.store(out + p * classes + k, acc, mask=k_inside)


@_jit
def _fused_head_backward_kernel(
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
        acc += _sum(m * upstream[:, None], axis=0)
    tl.store(grad_g + p * cells + j, acc / cells, mask=inside)


_HEAD_BLOCK = 64


def _head_inputs(parts: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    require(parts.device)
    parts = _checked(parts, "parts", FLOATING, parts.shape, parts.device)
    if parts.dim() != 4 or parts.shape[1] not in (1, 2):
        raise ValueError(f"parts must be (P, S, K, HW) with S 1 or 2, got shape {tuple(parts.shape)}")
    problems, _, _, cells = parts.shape
    return parts, _checked(g, "g", (parts.dtype,), (problems, cells), parts.device)


def fused_head_forward(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """FT (P, K) from the head's parts (P, S, K, HW) (S = 2: M+ then M- of a ReLU head), g (P, HW)
    and the bias (K,) or None."""
    parts, g = _head_inputs(parts, g)
    problems, signs, classes, cells = parts.shape
    if bias is not None:
        bias = _checked(bias, "bias", (parts.dtype,), (classes,), parts.device)
    out = torch.empty((problems, classes), dtype=parts.dtype, device=parts.device)
    grid = (problems, triton.cdiv(classes, _HEAD_BLOCK))
    _fused_head_forward_kernel[grid](
        parts, g, parts if bias is None else bias, out, classes, cells,
        SIGNS=signs, HAS_BIAS=bias is not None, BLOCK_K=_HEAD_BLOCK, BLOCK_J=_HEAD_BLOCK,
    )  # fmt: skip
    return out


def fused_head_backward(parts: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of fused_head_forward with respect to g, (P, HW), given grad_out (P, K)."""
    parts, g = _head_inputs(parts, g)
    problems, signs, classes, cells = parts.shape
    grad_out = _checked(grad_out, "grad_out", (parts.dtype,), (problems, classes), parts.device)
    grad_g = torch.empty_like(g)
    grid = (problems, triton.cdiv(cells, _HEAD_BLOCK))
    _fused_head_backward_kernel[grid](
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


# --------------------------------------------------------------------------------------------------
# 3. The L2-projected update: through g = f / ||f||, the schedule, SGD or Adam, in place, one kernel.


def projected_step_torch(
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
    """Twin of `projected_step`, built from caffast.optim's own schedule and update rules."""
    update = make_optimizer(optimizer, params)
    if optimizer == "adam":  # hand it the caller's state, `step` steps in
        update.first_moment, update.second_moment, update.steps = first_moment, second_moment, step
    grad_f = sphere_grad_torch(params.index_select(0, active), grad_g)
    update.step(params, grad_f, active, polynomial_lr_decay(step, lr, max_iter))
    return params


@_jit
def _projected_step_kernel(params, grad_g, active, first, second, settings, dim, BLOCK_D: tl.constexpr,
                           OPTIMIZER: tl.constexpr):  # fmt: skip
    """Program a: the row active[a] of params takes its step; settings = lr, step, max_iter,
    beta1 ** (step + 1), beta2 ** (step + 1)."""
    a = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < dim
    row = tl.load(active + a) * dim + d
    f = tl.load(params + row, mask=inside, other=0.0)
    grad_f = _sphere_grad(f, tl.load(grad_g + a * dim + d, mask=inside, other=0.0))
    lr = _scheduled_lr(tl.load(settings), tl.load(settings + 1), tl.load(settings + 2))
    if OPTIMIZER == "adam":
        m = tl.load(first + row, mask=inside, other=0.0)
        v = tl.load(second + row, mask=inside, other=0.0)
    else:
        m = f
        v = f
    f, m, v = _optimizer_step(f, grad_f, m, v, lr, tl.load(settings + 3), tl.load(settings + 4), OPTIMIZER)
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
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if not isinstance(params, torch.Tensor) or params.dim() != 2:
        raise TypeError("params must be a (P, D) tensor")
    require(params.device)
    _in_place(params, "params", FLOATING, params.shape, params.device)
    active = _checked(active, "active", (torch.int64,), (active.numel(),), params.device)
    grad_g = _checked(grad_g, "grad_g", (params.dtype,), (active.numel(), params.shape[1]), params.device)
    moments = (params, params)
    if optimizer == "adam":
        if first_moment is None or second_moment is None:
            raise ValueError("adam needs first_moment and second_moment")
        moments = tuple(
            _in_place(moment, name, (params.dtype,), params.shape, params.device)
            for moment, name in ((first_moment, "first_moment"), (second_moment, "second_moment"))
        )
    if active.numel() == 0:
        return params
    settings = _scalars([lr, step, max_iter, BETA1 ** (step + 1), BETA2 ** (step + 1)], params)
    dim = params.shape[1]
    _projected_step_kernel[(active.numel(),)](
        params, grad_g, active, *moments, settings, dim, BLOCK_D=_block(dim), OPTIMIZER=optimizer
    )
    return params


# --------------------------------------------------------------------------------------------------
# 4. The persistent fused-head solver: the whole reference loop, one program per problem.


def solve_fused_torch(
    head: FusedHead, constraint: str, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of `solve_fused`: caffast.solve.solve on caffast.heads.FusedProblem, same arguments."""
    solution = solve(FusedProblem(head, constraint), params, settings)
    return solution.params, solution.iterations, solution.loss


@_device
def _constrain(f, cell, inside, x, y, CONSTRAINT: tl.constexpr):
    """g from the parameters held in registers (the gauss mean in slots 0 and 1), zero off the grid.
    The Gaussian is a softmax of its log-density, as caffast.filters.gaussian_filter computes it."""
    if CONSTRAINT == "l2norm":
        g, _ = _sphere(f)
    else:
        if CONSTRAINT == "softmax":
            logits = f
        else:
            dx = x - _sum(tl.where(cell == 0, f, 0.0), axis=0)
            dy = y - _sum(tl.where(cell == 1, f, 0.0), axis=0)
            logits = -0.5 * (dy * dy + dx * dx)
        logits = tl.where(inside, logits, float("-inf"))
        e = tl.where(inside, tl.exp(logits - _max(logits, axis=0)), 0.0)
        g = e / _sum(e, axis=0)
    return g


@_device
def _constrain_backward(f, g, grad_g, cell, x, y, CONSTRAINT: tl.constexpr):
    """The chain rule from g back to the parameters."""
    if CONSTRAINT == "l2norm":
        grad_f = _sphere_grad(f, grad_g)
    elif CONSTRAINT == "softmax":
        grad_f = g * (grad_g - _sum(g * grad_g, axis=0))
    else:  # grad_mu = sum over cells of g grad_g (coordinate - its g-weighted mean)
        weight = g * grad_g
        grad_x = _sum(weight * (x - _sum(g * x, axis=0)), axis=0)
        grad_y = _sum(weight * (y - _sum(g * y, axis=0)), axis=0)
        grad_f = tl.where(cell == 0, grad_x, tl.where(cell == 1, grad_y, 0.0))
    return grad_f


@_device
def _column(z, cell, columns, ONE_TILE: tl.constexpr):
    """z at `columns`, taken from a register vector indexed by `cell` (registers cannot be gathered);
    z itself when one tile spans the grid (columns == cell)."""
    if ONE_TILE:
        picked = z
    else:
        picked = _sum(tl.where(cell[:, None] == columns[None, :], z[:, None], 0.0), axis=0)
    return picked


@_device
def _fused_objective(g, cell, inside, gram, linear, constant, classes, CELLS: tl.constexpr, SIGNS: tl.constexpr,
                     MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Loss and gradient in g of one problem (caffast.heads.FusedProblem, closed form).

    gram and linear point at this problem's Grams (S, S, HW, HW) and linear terms (S, HW). The
    oblivious loss is z . G z / (K HW^2), z = [g+ - 1, g-]; the Grams are read BLOCK_R columns at a
    time, so only a (HW x BLOCK_R) tile per block is live, whatever HW is.
    """
    negative = cell < 0  # all False; with S = 2 the cells that use part 1
    if SIGNS == 2:
        negative = ~(g >= 0)
    if MODE == "specific":
        grad = tl.load(linear + tl.where(negative, CELLS, 0) + cell, mask=inside, other=0.0) / CELLS
        loss = _sum(g * grad, axis=0) + constant
    else:
        z0 = tl.where(inside, tl.where(negative, 0.0, g) - 1, 0.0)
        z1 = tl.where(negative, g, 0.0)
        q0 = tl.full(g.shape, 0, g.dtype)
        q1 = tl.full(g.shape, 0, g.dtype)
        for start in range(0, CELLS, BLOCK_R):
            columns = start + tl.arange(0, BLOCK_R)
            mask = inside[:, None] & (columns < CELLS)[None, :]
            tile = gram + cell[:, None] * CELLS + columns[None, :]
            z0_columns = _column(z0, cell, columns, BLOCK_R == BLOCK_N)[None, :]
            q0 += _sum(tl.load(tile, mask=mask, other=0.0) * z0_columns, axis=1)
            if SIGNS == 2:
                z1_columns = _column(z1, cell, columns, BLOCK_R == BLOCK_N)[None, :]
                q0 += _sum(tl.load(tile + CELLS * CELLS, mask=mask, other=0.0) * z1_columns, axis=1)
                q1 += _sum(tl.load(tile + 2 * CELLS * CELLS, mask=mask, other=0.0) * z0_columns, axis=1)
                q1 += _sum(tl.load(tile + 3 * CELLS * CELLS, mask=mask, other=0.0) * z1_columns, axis=1)
        scale = classes * CELLS * CELLS
        loss = (_sum(z0 * q0, axis=0) + _sum(z1 * q1, axis=0)) / scale
        grad = 2 * tl.where(negative, q1, q0) / scale
    return loss, grad


# The float settings of _solve_fused_kernel, in this order, and their indices as the kernel reads them.
_SOLVER_SETTINGS = ("lr", "min_error", "max_iter", "check_every", "classes", "previous", "nan", "zero", "one")
_LR, _MIN_ERROR, _MAX_ITER, _CHECK_EVERY, _CLASSES, _PREVIOUS, _NAN, _ZERO, _ONE = map(_constexpr, range(9))


@_jit
def _solve_fused_kernel(
    gram, linear, constant, image, params, iterations, losses, settings,
    HEIGHT: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, SIGNS: tl.constexpr, MODE: tl.constexpr,
    CONSTRAINT: tl.constexpr, OPTIMIZER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program p runs problem p's loop to its end, the parameters and Adam's moments in registers.

    Loop counters are floats of the compute dtype (exact integers): loop-carried values must be
    tensors from the start, and no int-to-float conversion is then needed.
    """
    p = tl.program_id(0).to(tl.int64)
    CELLS: tl.constexpr = HEIGHT * WIDTH
    cell = tl.arange(0, BLOCK_N)
    inside = cell < CELLS
    zero = tl.load(settings + _ZERO)
    x = (cell % WIDTH) + zero - (WIDTH - 1) / 2
    y = (cell // WIDTH) + zero - (HEIGHT - 1) / 2
    lr = tl.load(settings + _LR)
    min_error = tl.load(settings + _MIN_ERROR)
    total = tl.load(settings + _MAX_ITER)
    check_every = tl.load(settings + _CHECK_EVERY)
    classes = tl.load(settings + _CLASSES)
    gram = gram + tl.load(image + p) * (SIGNS * SIGNS * CELLS * CELLS)
    linear = linear + p * (SIGNS * CELLS)
    constant = tl.load(constant + p)

    f = tl.load(params + p * DIM + cell, mask=cell < DIM, other=0.0)
    m = tl.full(f.shape, 0, f.dtype)
    v = tl.full(f.shape, 0, f.dtype)
    beta1_power = tl.load(settings + _ONE)
    beta2_power = beta1_power
    previous = tl.load(settings + _PREVIOUS)
    last_loss = tl.load(settings + _NAN)
    step = zero
    until_check = zero  # iterations left before the next check
    running = step == zero
    while running & (step < total):
        g = _constrain(f, cell, inside, x, y, CONSTRAINT)
        loss, grad_g = _fused_objective(
            g, cell, inside, gram, linear, constant, classes, CELLS, SIGNS, MODE, BLOCK_N, BLOCK_R
        )
        grad_f = _constrain_backward(f, g, grad_g, cell, x, y, CONSTRAINT)
        beta1_power = beta1_power * _BETA1
        beta2_power = beta2_power * _BETA2
        lr_t = _scheduled_lr(lr, step, total)
        f, m, v = _optimizer_step(f, grad_f, m, v, lr_t, beta1_power, beta2_power, OPTIMIZER)
        last_loss = loss
        check = until_check == 0
        running = ~(check & (tl.abs(loss - previous) < min_error))
        previous = tl.where(check, loss, previous)
        until_check = tl.where(check, check_every, until_check) - 1
        step = step + 1
    tl.store(params + p * DIM + cell, f, mask=cell < DIM)
    tl.store(iterations + p, step.to(tl.int64))
    tl.store(losses + p, last_loss)


def _part_count(tensor: Any, name: str, dims: int) -> int:
    """S, the number of parts (1, or 2 after a ReLU), read off dimension 1 of gram or linear."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims or tensor.shape[1] not in (1, 2):
        raise ValueError(f"{name} must be {dims}-dimensional with 1 or 2 parts, got shape {tuple(tensor.shape)}")
    return tensor.shape[1]


def _solver_tiles(cells: int) -> tuple[int, int]:
    """BLOCK_N holds a problem's cells (and the two gauss parameters); BLOCK_R Gram columns per tile."""
    block_n = _block(cells, least=2)
    return block_n, min(block_n, max(1, TILE // block_n))


def _solver_warps(block_n: int) -> int:
    return 8 if block_n >= 64 else 4


def solve_fused(
    head: FusedHead, constraint: str, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the whole reference loop for P fused-head problems in one launch (DESIGN.md section 3).

    The arguments are those of caffast.backends.cpp.solve_fused, on the GPU: the head's gram
    (I, S, S, HW, HW), linear (P, S, HW), constant (P,) and params (P, D) float64 (or all float32,
    which then is the compute dtype), image (P,) int64. The oblivious mode reads gram and image
    only, the specific mode linear and constant only; the others may be None. Returns new
    parameters (P, D) (`params` is left as it was), the iterations run (P,) int64 and the loss of
    the last iteration (P,).
    """
    mode, grid, classes = head.mode, head.grid, head.classes
    gram, linear, constant, image = head.gram, head.linear, head.constant, head.image
    optimizer, max_iter, check_every = settings.optimizer, settings.max_iter, settings.check_every
    lr, min_error = settings.lr, settings.min_error
    check_choice("mode", mode, MODES)
    check_choice("constraint", constraint, CONSTRAINTS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    device, dtype = params.device, params.dtype
    require(device)
    height, width = grid
    cells = height * width
    problems = params.shape[0]
    dim = math.prod(parameter_shape(constraint, grid))
    params = _checked(params, "params", FLOATING, (problems, dim), device)
    if mode == "specific":
        if linear is None or constant is None:
            raise ValueError("the specific mode needs linear and constant")
        signs = _part_count(linear, "linear", 3)
        linear = _checked(linear, "linear", (dtype,), (problems, signs, cells), device)
        constant = _checked(constant, "constant", (dtype,), (problems,), device)
        gram, image = linear, torch.zeros(problems, dtype=torch.int64, device=device)  # not read
    else:
        if gram is None or image is None:
            raise ValueError("the oblivious mode needs gram and image")
        signs = _part_count(gram, "gram", 5)
        gram = _checked(gram, "gram", (dtype,), (gram.shape[0], signs, signs, cells, cells), device)
        image = _checked(image, "image", (torch.int64,), (problems,), device)
        if problems and (image.min() < 0 or image.max() >= gram.shape[0]):
            raise ValueError(f"image {image.tolist()} is not an index into gram ({gram.shape[0]} images)")
        linear, constant = gram, torch.zeros(problems, dtype=dtype, device=device)  # linear not read

    result = params.clone()
    iterations = torch.zeros(problems, dtype=torch.int64, device=device)
    loss = torch.empty(problems, dtype=dtype, device=device)
    if problems == 0:
        return result, iterations, loss
    values = dict(lr=lr, min_error=min_error, max_iter=max_iter, check_every=check_every, classes=classes,
                  previous=INITIAL_PREVIOUS_LOSS, nan=math.nan, zero=0.0, one=1.0)  # fmt: skip
    settings = _scalars([values[name] for name in _SOLVER_SETTINGS], result)
    block_n, block_r = _solver_tiles(cells)
    _solve_fused_kernel[(problems,)](
        gram, linear, constant, image, result, iterations, loss, settings,
        HEIGHT=height, WIDTH=width, DIM=dim, SIGNS=signs, MODE=mode, CONSTRAINT=constraint, OPTIMIZER=optimizer,
        BLOCK_N=block_n, BLOCK_R=block_r, num_warps=_solver_warps(block_n),
    )  # fmt: skip
    return result, iterations, loss
