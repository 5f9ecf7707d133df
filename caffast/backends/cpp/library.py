"""caffast._C, the compiled CPU kernels: importing it, and handing it tensors without copies.

Tensors cross as zero-copy numpy views of CPU tensors, so every wrapper insists on the dtype,
device and layout the kernels read instead of converting silently (a hidden copy would make an
in-place update vanish and a hidden cast would change the numbers).
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import numpy as np
import torch

try:
    from ... import _C
except ImportError as error:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

FLOATING = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the C++ extension imported; `import_error()` says why not."""
    return _C is not None


def import_error() -> ImportError | None:
    """The error that kept caffast._C from importing, or None."""
    return _IMPORT_ERROR


def require() -> None:
    """Raise the clear error of an unavailable extension, or do nothing."""
    kernels()


def kernels() -> ModuleType:
    """The extension module, or a RuntimeError that carries the import error and the fix."""
    if _C is None:
        raise RuntimeError(
            f"the caffast C++ backend is unavailable ({_IMPORT_ERROR}); rebuild it with a C++17 compiler: "
            "pip install --no-build-isolation -e ."
        ) from _IMPORT_ERROR
    return _C


def view(tensor: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> np.ndarray:
    """A zero-copy numpy view of a contiguous CPU tensor of one of `dtypes`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the cpp backend takes CPU tensors")
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise TypeError(f"{name} must be {wanted}, got {str(tensor.dtype).removeprefix('torch.')}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")
    return tensor.detach().numpy()


def threads() -> int:
    """The kernels use as many threads as torch, so torch.set_num_threads governs both."""
    return torch.get_num_threads()
