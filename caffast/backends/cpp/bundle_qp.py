"""solver="fast"'s bundle QP on the CPU (csrc/bundle_qp.cpp); its twin is caffast.core.fast.bundle_qp."""

from __future__ import annotations

import numpy as np

from .library import kernels


def bundle_qp(gram: np.ndarray, alpha: np.ndarray, t: np.ndarray, valid: np.ndarray, iterations: int) -> np.ndarray:
    """The multipliers (A, K) of the bundle's dual QP, as caffast.core.fast.bundle_qp computes them."""
    def dense(array: np.ndarray, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=dtype)

    return kernels().bundle_qp(dense(gram, np.float64), dense(alpha, np.float64), dense(t, np.float64),
                               dense(valid, np.bool_), iterations)  # fmt: skip
