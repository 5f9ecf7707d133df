"""The "triton" backend: GPU kernels, one module per operation, each beside its autograd Function.

- hadamard: features * f / ||f|| and its gradient in f (the generic tail's filter multiply);
- fused_solver: the whole fused-head optimization of a batch, one program per problem, one launch;
- fused_head and device: the device functions the kernels share (the fused head's truncated forward
  and its gradient; the unit sphere, the learning-rate schedule, SGD and Adam);
- backend: TritonBackend, the object explain holds.

The tests hold each kernel and each group of device functions equal to a plain PyTorch twin.
"""

from .fused_solver import NONLINEAR_LOSSES, solve_fused
from .hadamard import Hadamard, hadamard_backward, hadamard_forward
from .runtime import available, require

__all__ = ["NONLINEAR_LOSSES", "Hadamard", "available", "hadamard_backward", "hadamard_forward", "require", "solve_fused"]
