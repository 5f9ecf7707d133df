"""The "triton" backend: GPU kernels, one module per operation, each beside its autograd Function.

- hadamard: features * f / ||f|| and its gradient in f (the generic tail's filter multiply);
- fused_head: the truncated forward FT = M_sigma g / HW + b of a fused head, and its gradient in g;
- projected_update: `projected_step`, the gradient through g = f / ||f||, the learning-rate schedule and SGD or Adam, fused;
- fused_solver: the whole fused-head optimization of a batch, one program per problem, one launch.

Each op's plain PyTorch twin is in caffast.backends.torch, and the tests hold them equal.
"""

from .fused_head import FusedHeadForward, fused_head_backward, fused_head_forward
from .fused_solver import NONLINEAR_LOSSES, solve_fused
from .hadamard import Hadamard, hadamard_backward, hadamard_forward
from .projected_update import projected_step
from .runtime import available, require

__all__ = [
    "NONLINEAR_LOSSES", "FusedHeadForward", "Hadamard", "available", "fused_head_backward", "fused_head_forward", "hadamard_backward",
    "hadamard_forward", "projected_step", "require", "solve_fused",
]  # fmt: skip
