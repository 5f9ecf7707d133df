"""Backends: how the loss of a batch of problems and its gradient are computed.

"torch" works everywhere: autograd through the real tail, or the fused head's closed form driven by
the shared loop.  "cpp" is the compiled CPU module: the fused-head loop in one call and the Hadamard
filter of the generic tail.  "auto" picks "cpp" for CPU models.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..filters import check_choice
from ..heads import FusedHead, FusedProblem
from ..solve import LoopSettings, Solution, solve

BACKENDS = ("auto", "torch", "cpp")

Multiply = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_backend(name: str, device: torch.device) -> str:
    check_choice("backend", name, BACKENDS)
    if name == "auto":
        return "cpp" if device.type == "cpu" else "torch"
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on the CPU but the model is on {device}; use backend='torch'")
    if name == "cpp":
        from . import cpp

        cpp.require()
    return name


def solve_fused(backend: str, head: FusedHead, constraint: str, initial: torch.Tensor, settings: LoopSettings) -> Solution:
    """The whole optimization of a fused head (the Python loop when the history is recorded)."""
    if backend != "cpp" or settings.record:
        return solve(FusedProblem(head, constraint), initial, settings)
    from . import cpp

    def dense(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.contiguous()

    params, iterations, loss = cpp.solve_fused(
        dense(head.gram), dense(head.linear), dense(head.constant), dense(head.image),
        initial.reshape(initial.shape[0], -1).contiguous(),
        mode=head.mode, constraint=constraint, optimizer=settings.optimizer, grid=head.grid,
        classes=head.classes, max_iter=settings.max_iter, lr=settings.lr, min_error=settings.min_error,
        check_every=settings.check_every,
    )  # fmt: skip
    return Solution(params=params.view(initial.shape), iterations=iterations, loss=loss)


def filter_multiply(backend: str, constraint: str) -> Optional[Multiply]:
    """A compiled `features * filter / ||filter||` for the generic tail, or None for plain torch."""
    if backend == "cpp" and constraint == "l2norm":
        from . import cpp

        return cpp.Hadamard.apply
    return None
