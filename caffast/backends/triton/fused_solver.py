"""The persistent fused-head solver: the whole reference loop, one program per problem, one launch.

Its twin is the shared loop (caffast.core.loop.solve) on the fused head's closed form
(caffast.core.problems.FusedProblem).  The kernel branches on the constraint's and the optimizer's
names, the compiled twin of caffast.core.constraints and caffast.core.optimizers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...core.choices import check_choice
from ...core.constraints import Constraint
from ...core.heads import FusedHead
from ...core.loop import INITIAL_PREVIOUS_LOSS, LoopSettings
from ...core.losses import MODES
from ...core.optimizers import COMPILED_OPTIMIZERS
from .device import BETA1, BETA2, optimizer_step, scheduled_lr, sphere, sphere_grad
from .fused_head import head_gradient, head_logits, negative_cells
from .runtime import (  # noqa: F401 (tl_core: see runtime)
    FLOATING, INTERPRETED, block_size, checked, constexpr, device_function, jit, require, scalars, tl, tl_core, tl_max,
    tl_sum,
)

NONLINEAR_LOSSES = ("log_softmax",)  # the class-specific losses beyond the linear ones that the kernel takes

_BETA1, _BETA2 = constexpr(BETA1), constexpr(BETA2)  # a kernel reads a global only as a constexpr
# Elements per Gram tile in the solver: on a GPU small enough for 8 warps to hold it without
# spilling (ptxas, sm_90: 128 registers for 7 x 7 and 14 x 14 ReLU heads); in the interpreter, where
# every operation costs about the same whatever its size, large.
TILE = 4096 if INTERPRETED else 1024


@device_function
def _constrain(f, cell, inside, x, y, z, CONSTRAINT: tl.constexpr):
    """g from the parameters held in registers (the gauss mean in slots 0, 1 and, on a (D, H, W) grid,
    2), zero off the grid.  The Gaussian is a softmax of its log-density, as
    caffast.core.constraints.gaussian_filter computes it; on an (H, W) grid z and slot 2 are 0, so the
    depth term adds an exact 0."""
    if CONSTRAINT == "l2norm":
        g, _ = sphere(f)
    else:
        if CONSTRAINT == "softmax":
            logits = f
        else:
            dx = x - tl_sum(tl.where(cell == 0, f, 0.0), axis=0)
            dy = y - tl_sum(tl.where(cell == 1, f, 0.0), axis=0)
            dz = z - tl_sum(tl.where(cell == 2, f, 0.0), axis=0)
            logits = -0.5 * (dz * dz + dy * dy + dx * dx)
        logits = tl.where(inside, logits, float("-inf"))
        e = tl.where(inside, tl.exp(logits - tl_max(logits, axis=0)), 0.0)
        g = e / tl_sum(e, axis=0)
    return g


@device_function
def _constrain_backward(f, g, grad_g, cell, x, y, z, CONSTRAINT: tl.constexpr):
    """The chain rule from g back to the parameters."""
    if CONSTRAINT == "l2norm":
        grad_f = sphere_grad(f, grad_g)
    elif CONSTRAINT == "softmax":
        grad_f = g * (grad_g - tl_sum(g * grad_g, axis=0))
    else:  # grad_mu = sum over cells of g grad_g (coordinate - its g-weighted mean)
        weight = g * grad_g
        grad_x = tl_sum(weight * (x - tl_sum(g * x, axis=0)), axis=0)
        grad_y = tl_sum(weight * (y - tl_sum(g * y, axis=0)), axis=0)
        grad_z = tl_sum(weight * (z - tl_sum(g * z, axis=0)), axis=0)
        grad_f = tl.where(cell == 0, grad_x, tl.where(cell == 1, grad_y, tl.where(cell == 2, grad_z, 0.0)))
    return grad_f


@device_function
def _column(z, cell, columns, ONE_TILE: tl.constexpr):
    """z at `columns`, taken from a register vector indexed by `cell` (registers cannot be gathered);
    z itself when one tile spans the grid (columns == cell)."""
    if ONE_TILE:
        picked = z
    else:
        picked = tl_sum(tl.where(cell[:, None] == columns[None, :], z[:, None], 0.0), axis=0)
    return picked


@device_function
def _log_softmax_objective(g, cell, inside, negative, products, bias, target, class_count, zero,
                           CELLS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """-log softmax(FT)_t and its gradient, the K classes read BLOCK_K at a time: a first pass for
    logsumexp (running maximum and sum) and the target's logit, a second for
    dloss/dg_j = sum_k (softmax_k - [k = t]) M[s_j, k, j] / HW."""
    part = tl.where(negative, 1, 0)
    largest = zero + float("-inf")
    total = zero
    chosen = zero
    for start in range(0, class_count, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        logits, _ = head_logits(g, cell, inside, part, products, bias, ks, class_count, CELLS)
        new_largest = tl.maximum(largest, tl_max(logits, axis=0))
        total = total * tl.exp(largest - new_largest) + tl_sum(tl.exp(logits - new_largest), axis=0)
        largest = new_largest
        chosen += tl_sum(tl.where(ks == target, logits, 0.0), axis=0)
    log_total = largest + tl.log(total)
    grad = tl.full(g.shape, 0, g.dtype)
    for start in range(0, class_count, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        logits, tile = head_logits(g, cell, inside, part, products, bias, ks, class_count, CELLS)
        weight = tl.exp(logits - log_total) - tl.where(ks == target, 1.0, 0.0)
        grad += head_gradient(tile, weight)
    return log_total - chosen, grad / CELLS


@device_function
def _fused_objective(g, cell, inside, gram, linear, constant, classes, CELLS: tl.constexpr, SIGNS: tl.constexpr,
                     MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Loss and gradient in g of one problem (caffast.core.problems.FusedProblem, closed form).

    gram and linear point at this problem's Grams (S, S, HW, HW) and linear terms (S, HW). The
    oblivious loss is z . G z / (K HW^2), z = [g+ - 1, g-]; the Grams are read BLOCK_R columns at a
    time, so only a (HW x BLOCK_R) tile per block is live, whatever HW is.
    """
    negative = negative_cells(g, cell, SIGNS)
    if MODE == "specific":
        grad = tl.load(linear + tl.where(negative, CELLS, 0) + cell, mask=inside, other=0.0) / CELLS
        loss = tl_sum(g * grad, axis=0) + constant
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
            q0 += tl_sum(tl.load(tile, mask=mask, other=0.0) * z0_columns, axis=1)
            if SIGNS == 2:
                z1_columns = _column(z1, cell, columns, BLOCK_R == BLOCK_N)[None, :]
                q0 += tl_sum(tl.load(tile + CELLS * CELLS, mask=mask, other=0.0) * z1_columns, axis=1)
                q1 += tl_sum(tl.load(tile + 2 * CELLS * CELLS, mask=mask, other=0.0) * z0_columns, axis=1)
                q1 += tl_sum(tl.load(tile + 3 * CELLS * CELLS, mask=mask, other=0.0) * z1_columns, axis=1)
        scale = classes * CELLS * CELLS
        loss = (tl_sum(z0 * q0, axis=0) + tl_sum(z1 * q1, axis=0)) / scale
        grad = 2 * tl.where(negative, q1, q0) / scale
    return loss, grad


# The float settings of kernel, in this order, and their indices as the kernel reads them.
_SOLVER_SETTINGS = ("lr", "min_error", "max_iter", "check_every", "classes", "previous", "nan", "zero", "one")
_LR, _MIN_ERROR, _MAX_ITER, _CHECK_EVERY, _CLASSES, _PREVIOUS, _NAN, _ZERO, _ONE = map(constexpr, range(9))


@jit
def kernel(
    gram, linear, constant, image, products, bias, targets, class_count, params, iterations, losses, settings,
    coordinates, HEIGHT: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, SIGNS: tl.constexpr,
    MODE: tl.constexpr, CONSTRAINT: tl.constexpr, OPTIMIZER: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program p runs problem p's loop to its end, the parameters and Adam's moments in registers.

    The grid is HEIGHT x WIDTH cells (a (D, H, W) grid comes flattened, as D * H x W);
    `coordinates` (3, HEIGHT * WIDTH) holds each cell's centred column, row and slice, which the
    Gaussian reads.  Loop counters are floats of the compute dtype (exact integers): loop-carried
    values must be tensors from the start, and no int-to-float conversion is then needed.
    """
    p = tl.program_id(0).to(tl.int64)
    CELLS: tl.constexpr = HEIGHT * WIDTH
    cell = tl.arange(0, BLOCK_N)
    inside = cell < CELLS
    zero = tl.load(settings + _ZERO)
    x = tl.load(coordinates + cell, mask=inside, other=0.0)
    y = tl.load(coordinates + CELLS + cell, mask=inside, other=0.0)
    z = tl.load(coordinates + 2 * CELLS + cell, mask=inside, other=0.0)
    lr = tl.load(settings + _LR)
    min_error = tl.load(settings + _MIN_ERROR)
    total = tl.load(settings + _MAX_ITER)
    check_every = tl.load(settings + _CHECK_EVERY)
    classes = tl.load(settings + _CLASSES)
    gram = gram + tl.load(image + p) * (SIGNS * SIGNS * CELLS * CELLS)
    linear = linear + p * (SIGNS * CELLS)
    constant = tl.load(constant + p)
    products = products + tl.load(image + p) * (SIGNS * class_count * CELLS)
    target = tl.load(targets + p)

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
        g = _constrain(f, cell, inside, x, y, z, CONSTRAINT)
        if MODE == "log_softmax":
            loss, grad_g = _log_softmax_objective(
                g, cell, inside, negative_cells(g, cell, SIGNS), products, bias, target, class_count, zero, CELLS,
                BLOCK_R,
            )  # fmt: skip
        else:
            loss, grad_g = _fused_objective(
                g, cell, inside, gram, linear, constant, classes, CELLS, SIGNS, MODE, BLOCK_N, BLOCK_R
            )
        grad_f = _constrain_backward(f, g, grad_g, cell, x, y, z, CONSTRAINT)
        beta1_power = beta1_power * _BETA1
        beta2_power = beta2_power * _BETA2
        lr_t = scheduled_lr(lr, step, total)
        f, m, v = optimizer_step(f, grad_f, m, v, lr_t, beta1_power, beta2_power, OPTIMIZER)
        last_loss = loss
        check = until_check == 0
        running = ~(check & (tl.abs(loss - previous) < min_error))
        previous = tl.where(check, loss, previous)
        until_check = tl.where(check, check_every, until_check) - 1
        step = step + 1
    tl.store(params + p * DIM + cell, f, mask=cell < DIM)
    tl.store(iterations + p, step.to(tl.int64))
    tl.store(losses + p, last_loss)


def centred_coordinates(grid: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(3, cells): the column, row and slice (0 on an (H, W) grid) of every cell, row-major, each
    centred on the grid as caffast.core.constraints.gaussian_filter centres them."""
    *depth, height, width = grid
    cell = torch.arange(math.prod(grid), device=device)
    column = (cell % width).double() - (width - 1) / 2
    row = (cell // width % height).double() - (height - 1) / 2
    slice_ = (cell // (width * height)).double() - (depth[0] - 1) / 2 if depth else torch.zeros_like(column)
    return torch.stack([column, row, slice_]).to(dtype)


def _part_count(tensor: Any, name: str, dims: int) -> int:
    """S, the number of parts (1, or 2 after a ReLU), read off dimension 1 of gram or linear."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims or tensor.shape[1] not in (1, 2):
        raise ValueError(f"{name} must be {dims}-dimensional with 1 or 2 parts, got shape {tuple(tensor.shape)}")
    return tensor.shape[1]


def tiles(cells: int) -> tuple[int, int]:
    """BLOCK_N holds a problem's cells (and the two gauss parameters); BLOCK_R Gram columns per tile."""
    block_n = block_size(cells, least=2)
    return block_n, min(block_n, max(1, TILE // block_n))


def warps(block_n: int) -> int:
    return 8 if block_n >= 64 else 4


def solve_fused(
    head: FusedHead, constraint: Constraint, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the whole reference loop for P fused-head problems in one launch (docs/design.md, 'The fused head').

    The arguments are those of caffast.backends.cpp.fused_solver.solve_fused, on the GPU: the head's gram
    (I, S, S, HW, HW), linear (P, S, HW), constant (P,) and params (P, D) float64 (or all float32,
    which then is the compute dtype), image (P,) int64. The oblivious mode reads gram and image
    only, the specific mode linear and constant only, or with the log-softmax loss the head's
    products (I, S, K, HW), bias (K,), targets (P,) and image; the others may be None. Returns new
    parameters (P, D) (`params` is left as it was), the iterations run (P,) int64 and the loss of
    the last iteration (P,).
    """
    mode, grid, classes = head.mode, head.grid, head.classes
    gram, linear, constant, image = head.gram, head.linear, head.constant, head.image
    optimizer, max_iter, check_every = settings.optimizer, settings.max_iter, settings.check_every
    lr, min_error = settings.lr, settings.min_error
    check_choice("mode", mode, MODES)
    check_choice("optimizer", optimizer, COMPILED_OPTIMIZERS)
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    device, dtype = params.device, params.dtype
    require(device)
    cells = math.prod(grid)
    problems = params.shape[0]
    dim = math.prod(constraint.parameter_shape(grid))
    params = checked(params, "params", FLOATING, (problems, dim), device)
    products = bias = targets = None
    if mode == "specific" and linear is None and head.products is not None:
        if head.class_loss is None or head.class_loss.name not in NONLINEAR_LOSSES:
            raise ValueError(f"the kernel takes linear losses and {NONLINEAR_LOSSES}, not {head.class_loss!r}")
        mode, signs = head.class_loss.name, _part_count(head.products, "products", 4)
        products = checked(head.products, "products", (dtype,), (head.products.shape[0], signs, classes, cells), device)
        bias = checked(head.bias, "bias", (dtype,), (classes,), device)
        targets = checked(head.targets, "targets", (torch.int64,), (problems,), device)
        image = checked(image, "image", (torch.int64,), (problems,), device)
        gram, linear, constant = products, products, torch.zeros(problems, dtype=dtype, device=device)  # not read
    elif mode == "specific":
        if linear is None or constant is None:
            raise ValueError("the specific mode needs linear and constant")
        signs = _part_count(linear, "linear", 3)
        linear = checked(linear, "linear", (dtype,), (problems, signs, cells), device)
        constant = checked(constant, "constant", (dtype,), (problems,), device)
        gram, image = linear, torch.zeros(problems, dtype=torch.int64, device=device)  # not read
    else:
        if gram is None or image is None:
            raise ValueError("the oblivious mode needs gram and image")
        signs = _part_count(gram, "gram", 5)
        gram = checked(gram, "gram", (dtype,), (gram.shape[0], signs, signs, cells, cells), device)
        image = checked(image, "image", (torch.int64,), (problems,), device)
        if problems and (image.min() < 0 or image.max() >= gram.shape[0]):
            raise ValueError(f"image {image.tolist()} is not an index into gram ({gram.shape[0]} images)")
        linear, constant = gram, torch.zeros(problems, dtype=dtype, device=device)  # linear not read

    if products is None:  # not read
        products, bias, targets = gram, constant, image
    result = params.clone()
    iterations = torch.zeros(problems, dtype=torch.int64, device=device)
    loss = torch.empty(problems, dtype=dtype, device=device)
    if problems == 0:
        return result, iterations, loss
    values = dict(lr=lr, min_error=min_error, max_iter=max_iter, check_every=check_every, classes=classes,
                  previous=INITIAL_PREVIOUS_LOSS, nan=math.nan, zero=0.0, one=1.0)  # fmt: skip
    settings = scalars([values[name] for name in _SOLVER_SETTINGS], result)
    block_n, block_r = tiles(cells)
    kernel[(problems,)](
        gram, linear, constant, image, products, bias, targets, classes, result, iterations, loss, settings,
        centred_coordinates(grid, dtype, device), HEIGHT=cells // grid[-1], WIDTH=grid[-1], DIM=dim, SIGNS=signs,
        MODE=mode, CONSTRAINT=constraint.name, OPTIMIZER=optimizer, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=warps(block_n),
    )  # fmt: skip
    return result, iterations, loss
