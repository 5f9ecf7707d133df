"""The fused-head solver on the CPU (csrc/solve_fused.cpp); its twin is the shared loop
(caffast.core.loop.solve) on caffast.core.problems.FusedProblem."""

from __future__ import annotations

import math

import torch

from ...core.constraints import Constraint
from ...core.heads import FusedHead
from ...core.loop import LoopSettings
from .library import kernels, threads, view

NONLINEAR_LOSSES = ("log_softmax",)  # the class-specific losses beyond the linear ones that the loop takes


def solve_fused(
    head: FusedHead, constraint: Constraint, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the whole reference loop for P fused-head problems in one call (docs/design.md, 'The fused head').

    The head's gram (I, S, S, HW, HW), linear (P, S, HW) and constant (P,) and params (P, D) are
    contiguous float64 CPU tensors, image (P,) int64.  The oblivious mode reads gram and image only,
    the specific mode linear and constant only, or with the log-softmax loss products
    (I, S, K, HW), bias (K,), targets (P,) and image; the others may be None.  Returns the final
    parameters (a new tensor; `params` is left as it was), the iterations run (P,) and the loss of
    the last iteration (P,).
    """
    compiled = kernels()
    f64, i64 = (torch.float64,), (torch.int64,)
    *depth, height, width = head.grid  # a (D, H, W) grid has a depth; an (H, W) one passes 0
    depth = depth[0] if depth else 0
    cells = math.prod(head.grid)
    problems = params.shape[0]
    gram, linear, constant, image = head.gram, head.linear, head.constant, head.image
    mode = head.mode
    products = torch.empty((0, 1, 1, 1), dtype=torch.float64)
    bias = torch.empty(0, dtype=torch.float64)
    targets = torch.empty(0, dtype=torch.int64)
    if head.mode == "specific" and linear is None:
        if head.class_loss is None or head.class_loss.name not in NONLINEAR_LOSSES:
            raise ValueError(f"the compiled loop takes linear losses and {NONLINEAR_LOSSES}, not {head.class_loss!r}")
        mode, signs = head.class_loss.name, head.products.shape[1]
        products, bias, targets = head.products.contiguous(), head.bias.contiguous(), head.targets.contiguous()
        gram = torch.empty((0, signs, signs, cells, cells), dtype=torch.float64)
        linear = torch.zeros((problems, signs, cells), dtype=torch.float64)
        constant = torch.zeros(problems, dtype=torch.float64)
    elif head.mode == "specific":
        if linear is None or constant is None:
            raise ValueError("the specific mode needs linear and constant")
        signs = linear.shape[1]
        gram = torch.empty((0, signs, signs, cells, cells), dtype=torch.float64)
        image = torch.zeros(problems, dtype=torch.int64)
    else:
        if gram is None or image is None:
            raise ValueError("the oblivious mode needs gram and image")
        signs = gram.shape[1]
        linear = torch.zeros((problems, signs, cells), dtype=torch.float64)
        constant = torch.zeros(problems, dtype=torch.float64)
    result = view(params, "params", f64).copy()
    iterations, loss = compiled.solve_fused(
        view(gram, "gram", f64),
        view(linear, "linear", f64),
        view(constant, "constant", f64),
        view(image, "image", i64),
        view(products, "products", f64),
        view(bias, "bias", f64),
        view(targets, "targets", i64),
        result,
        mode=mode,
        constraint=constraint.name,
        optimizer=settings.optimizer,
        height=height,
        width=width,
        depth=depth,
        classes=head.classes,
        max_iter=settings.max_iter,
        lr=settings.lr,
        min_error=settings.min_error,
        check_every=settings.check_every,
        threads=threads(),
    )
    return torch.from_numpy(result), torch.from_numpy(iterations), torch.from_numpy(loss)
