"""What the compiled backends (cpp and triton) share: which fused heads their own loop takes, how a
head is handed to it, their Hadamard filter, and the C++ bundle QP."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from ..core.constraints import Constraint
from ..core.fast import BundleQP
from ..core.heads import FusedHead
from ..core.loop import LoopSettings, Solution
from ..core.optimizers import COMPILED_OPTIMIZERS, MIN_LEARNING_RATE
from .cpp.bundle_qp import bundle_qp as cpp_bundle_qp
from .cpp.library import available as cpp_available
from .interface import Multiply

# a module's solve_fused: the head's tensors dense and the parameters (P, D) in; the final parameters,
# the iterations run (P,) and the loss of the last iteration (P,) out
FusedLoop = Callable[[FusedHead, Constraint, torch.Tensor, LoopSettings], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def loop_takes(head: FusedHead, settings: LoopSettings, nonlinear_losses: tuple[str, ...]) -> bool:
    """Whether a compiled fused loop runs this problem: not when the history is recorded, for an
    optimizer or a schedule floor it does not implement (adam_tf1, end_lr != 1e-5), or for a
    nonlinear class-specific loss not among `nonlinear_losses`."""
    if settings.record or settings.optimizer not in COMPILED_OPTIMIZERS or settings.end_lr != MIN_LEARNING_RATE:
        return False
    return head.mode != "specific" or head.is_linear or head.class_loss.name in nonlinear_losses


class CompiledBackend:
    """A backend with its own fused-head loop (`fused_loop`) and Hadamard filter (`hadamard`)."""

    name: str
    device_type: str
    nonlinear_losses: tuple[str, ...]
    fused_loop: FusedLoop
    hadamard: type[torch.autograd.Function]  # features * f / ||f||, differentiable in f

    def solve_fused(
        self, head: FusedHead, constraint: Constraint, initial: torch.Tensor, settings: LoopSettings
    ) -> Optional[Solution]:
        if not loop_takes(head, settings, self.nonlinear_losses):
            return None

        def dense(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else tensor.contiguous()

        laid_out = replace(head, gram=dense(head.gram), linear=dense(head.linear), constant=dense(head.constant),
                           image=dense(head.image))  # fmt: skip
        flat = initial.reshape(initial.shape[0], -1).contiguous()
        params, iterations, loss = self.fused_loop(laid_out, constraint, flat, settings)
        return Solution(params=params.view(initial.shape), iterations=iterations, loss=loss)

    def filter_multiply(self, constraint: Constraint) -> Optional[Multiply]:
        return self.hadamard.apply if constraint.on_sphere else None

    @property
    def bundle_qp(self) -> Optional[BundleQP]:
        """The C++ QP where caffast._C is built: it runs on the host whatever the model's device."""
        return cpp_bundle_qp if cpp_available() else None
