"""The "torch" backend object: plain PyTorch, on any device."""

from __future__ import annotations

from typing import Optional

import torch

from ...core.constraints import Constraint
from ...core.fast import BundleQP
from ...core.heads import FusedHead
from ...core.loop import LoopSettings, Solution
from ..interface import Multiply


class TorchBackend:
    """Nothing compiled: the shared loop runs every fused head on its closed form, the generic tail
    multiplies by the constraint's own filter, and solver="fast" takes the NumPy QP."""

    name = "torch"
    device_type: Optional[str] = None
    nonlinear_losses: tuple[str, ...] = ()

    def available(self) -> bool:
        return True

    def require(self, device: torch.device) -> None:
        pass

    def solve_fused(
        self, head: FusedHead, constraint: Constraint, initial: torch.Tensor, settings: LoopSettings
    ) -> Optional[Solution]:
        return None

    def filter_multiply(self, constraint: Constraint) -> Optional[Multiply]:
        return None

    @property
    def bundle_qp(self) -> Optional[BundleQP]:
        return None
