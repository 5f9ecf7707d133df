"""The "triton" backend object: the GPU kernels (imported with triton only once this backend is chosen)."""

from __future__ import annotations

import torch

from ..compiled import CompiledBackend
from . import runtime
from .fused_solver import NONLINEAR_LOSSES, solve_fused
from .hadamard import Hadamard


class TritonBackend(CompiledBackend):
    """The whole fused-head loop of a batch in one launch, and the Hadamard filter, on a CUDA GPU."""

    name = "triton"
    device_type = "cuda"
    nonlinear_losses = NONLINEAR_LOSSES
    fused_loop = staticmethod(solve_fused)
    hadamard = Hadamard

    def available(self) -> bool:
        return runtime.available()

    def require(self, device: torch.device) -> None:
        runtime.require(device)
