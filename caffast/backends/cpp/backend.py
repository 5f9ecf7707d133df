"""The "cpp" backend object: the compiled CPU module caffast._C."""

from __future__ import annotations

import torch

from ..compiled import CompiledBackend
from . import library
from .fused_solver import NONLINEAR_LOSSES, solve_fused
from .hadamard import Hadamard


class CppBackend(CompiledBackend):
    """The whole fused-head loop of a batch in one call, and the Hadamard filter, on the CPU."""

    name = "cpp"
    device_type = "cpu"
    nonlinear_losses = NONLINEAR_LOSSES
    fused_loop = staticmethod(solve_fused)
    hadamard = Hadamard

    def available(self) -> bool:
        return library.available()

    def require(self, device: torch.device) -> None:
        if device.type != self.device_type:
            raise ValueError(f"backend 'cpp' runs on the CPU but the model is on {device}; use backend='triton' or 'torch'")
        library.require()
