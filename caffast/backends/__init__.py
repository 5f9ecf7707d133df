"""Backends: how the loss of a batch of problems and its gradient are computed.

"torch" works everywhere: autograd through the real tail, or the fused head's closed form driven by
the shared loop.  "cpp" (the compiled CPU module) and "triton" (GPU kernels) run the whole fused-head
loop in one call and supply the Hadamard filter of the generic tail.  "auto" picks "triton" for CUDA
models, "cpp" for CPU models.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import Callable, Optional, get_args

import torch

from ..core.choices import BackendName, check_choice
from ..core.constraints import Constraint
from ..core.fast import BundleQP
from ..core.heads import FusedHead, FusedProblem
from ..core.loop import LoopSettings, Solution, solve
from ..core.optimizers import COMPILED_OPTIMIZERS, MIN_LEARNING_RATE

BACKENDS: tuple[BackendName, ...] = get_args(BackendName)

Multiply = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _compiled(backend: str) -> ModuleType:
    if backend == "cpp":
        from . import cpp

        return cpp
    from . import triton

    return triton


def resolve_backend(name: str, device: torch.device) -> str:
    check_choice("backend", name, BACKENDS)
    if name == "auto":
        if device.type == "cuda" and _compiled("triton").available():
            return "triton"
        return "cpp" if device.type == "cpu" else "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU but the model is on {device}; use backend='triton' or 'torch'")
        _compiled("cpp").require()
    if name == "triton":
        _compiled("triton").require(device)
    return name


def solve_fused(backend: str, head: FusedHead, constraint: Constraint, initial: torch.Tensor, settings: LoopSettings) -> Solution:
    """The whole optimization of a fused head: the Python loop when the history is recorded, for an
    optimizer or a schedule floor the compiled solvers do not implement (adam_tf1, end_lr != 1e-5), or
    for a nonlinear class-specific loss the backend's loop does not take (its NONLINEAR_LOSSES)."""
    compiled = settings.optimizer in COMPILED_OPTIMIZERS and settings.end_lr == MIN_LEARNING_RATE
    if head.mode == "specific" and not head.is_linear and backend in ("cpp", "triton"):
        compiled = compiled and head.class_loss.name in _compiled(backend).NONLINEAR_LOSSES
    if backend == "torch" or settings.record or not compiled:
        return solve(FusedProblem(head, constraint), initial, settings)

    def dense(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.contiguous()

    laid_out = replace(head, gram=dense(head.gram), linear=dense(head.linear), constant=dense(head.constant),
                       image=dense(head.image))  # fmt: skip
    flat = initial.reshape(initial.shape[0], -1).contiguous()
    params, iterations, loss = _compiled(backend).solve_fused(laid_out, constraint, flat, settings)
    return Solution(params=params.view(initial.shape), iterations=iterations, loss=loss)


def filter_multiply(backend: str, constraint: Constraint) -> Optional[Multiply]:
    """A compiled `features * filter / ||filter||` for the generic tail, or None for plain torch."""
    if backend in ("cpp", "triton") and constraint.on_sphere:
        return _compiled(backend).Hadamard.apply
    return None


def bundle_qp(backend: str) -> Optional[BundleQP]:
    """The compiled QP of solver="fast"'s steps where the C++ module is built (the QP runs on the host
    whatever the model's device), or None for its NumPy twin: always with backend "torch"."""
    if backend != "torch" and _compiled("cpp").available():
        return _compiled("cpp").bundle_qp
    return None
