"""What a backend is: the one interface through which `explain` uses the backend it chose."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from ..core.constraints import Constraint
from ..core.fast import BundleQP
from ..core.heads import FusedHead
from ..core.loop import LoopSettings, Solution

Multiply = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # features (P, C, H, W), filter (P, H, W)


@runtime_checkable
class Backend(Protocol):
    """A way to compute L2-CAF's losses and gradients on one kind of device.

    Every backend runs what plain PyTorch does: the shared loop (caffast.core.loop) on autograd
    through the tail or on a fused head's closed form.  A backend states what it computes instead:
    its own whole fused-head loop, the Hadamard filter of the generic tail, the bundle QP of
    solver="fast"; None or () where it has none.
    """

    name: str  # as explain(backend=...) takes it and Explanation.backend reports it
    device_type: Optional[str]  # the device type of the models it takes ("cpu", "cuda"); None: any
    nonlinear_losses: tuple[str, ...]  # the nonlinear class-specific losses its own fused loop takes

    def available(self) -> bool:
        """Whether it can compute here (its module built or installed, a device for it)."""
        ...

    def require(self, device: torch.device) -> None:
        """Raise the clear error of a backend that cannot compute for a model on `device`."""
        ...

    def solve_fused(
        self, head: FusedHead, constraint: Constraint, initial: torch.Tensor, settings: LoopSettings
    ) -> Optional[Solution]:
        """The whole loop on a fused head from `initial` (P, *shape), as caffast.core.loop.solve on
        caffast.core.problems.FusedProblem gives it; None where this backend's own loop does not take the problem."""
        ...

    def filter_multiply(self, constraint: Constraint) -> Optional[Multiply]:
        """The compiled `features * filter / ||filter||` of the generic tail, or None for plain torch."""
        ...

    @property
    def bundle_qp(self) -> Optional[BundleQP]:
        """The compiled QP of solver="fast"'s steps, or None for its NumPy twin (caffast.core.fast.bundle_qp)."""
        ...
