"""The "cpp" backend: typed torch wrappers around caffast._C, one module per csrc/ operation.

- hadamard: features * f / ||f|| and its gradient in f (csrc/hadamard.cpp);
- fused_solver: the whole fused-head loop of a batch in one call (csrc/solve_fused.cpp);
- bundle_qp: the small QP of each step of solver="fast" (csrc/bundle_qp.cpp).
"""

from .bundle_qp import bundle_qp

from .fused_solver import NONLINEAR_LOSSES, solve_fused
from .hadamard import Hadamard, hadamard_backward, hadamard_forward
from .library import available, import_error, require

__all__ = [
    "NONLINEAR_LOSSES",
    "Hadamard", "available", "bundle_qp", "hadamard_backward", "hadamard_forward", "import_error", "require",
    "solve_fused",
]  # fmt: skip
