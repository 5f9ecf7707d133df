"""Backends: how the loss of a batch of problems and its gradient are computed.

"torch" works everywhere: autograd through the real tail, or the fused head's closed form driven by
the shared loop.  "cpp" (the compiled CPU module) and "triton" (GPU kernels) run the whole fused-head
loop in one call and supply the Hadamard filter of the generic tail.  `resolve_backend` turns a name
into the object (caffast.backends.interface.Backend) that explain holds; "auto" picks "triton" for
CUDA models, "cpp" for CPU models.
"""

from __future__ import annotations

from typing import get_args

import torch

from ..core.choices import BackendName, check_choice
from .cpp.backend import CppBackend
from .interface import Backend
from .torch.backend import TorchBackend

BACKENDS: tuple[BackendName, ...] = get_args(BackendName)

__all__ = ["BACKENDS", "Backend", "resolve_backend"]


def _triton() -> Backend:
    """The triton backend; importing it imports triton, which takes seconds, so only here."""
    from .triton.backend import TritonBackend

    return TritonBackend()


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend `name` for a model on `device`, or the clear error of one that cannot compute there."""
    check_choice("backend", name, BACKENDS)
    if name == "auto":
        if device.type == "cuda":
            triton = _triton()
            if triton.available():
                return triton
        return CppBackend() if device.type == "cpu" else TorchBackend()
    backend = {"torch": TorchBackend, "cpp": CppBackend, "triton": _triton}[name]()
    backend.require(device)
    return backend
