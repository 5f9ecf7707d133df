"""What every Triton kernel of caffast shares: the import of triton, jit helpers, input checks.

The kernels take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported (the interpreter, which is how the tests run without a GPU).

Precision: Triton types a Python float kernel argument as float32, so every float setting reaches a
kernel in a small tensor of the compute dtype; float literals inside kernels meet a tensor in a binary
operation or tl.where, where they take that tensor's dtype (tl.maximum would round them to float32).
Every module with kernels imports `tl` and `tl_core` from here: the interpreter patches the language
modules that a kernel's globals hold (see _InterpretedDeviceFunction).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

try:
    import triton
    import triton.language as tl
    import triton.language.core as tl_core  # seen by the interpreter: see _InterpretedDeviceFunction
except ImportError as error:  # the module still imports; available() says False
    triton = tl = tl_core = None
    _IMPORT_ERROR: Optional[ImportError] = error
else:
    _IMPORT_ERROR = None


# Triton decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOATING = (torch.float32, torch.float64)


def jit(fn: Callable) -> Any:
    """triton.jit when triton imported; otherwise the plain function, never launched."""
    return fn if triton is None else triton.jit(fn)


class _InterpretedDeviceFunction:
    """A device function under TRITON_INTERPRET=1, called without re-patching triton.language.

    The interpreter patches the language for the whole launch, yet also again at every device
    function call (an inspect.getmembers sweep), which was 70% of the interpreted solver's time.
    A launch patches the triton.language modules that the kernel's globals hold: this module holds
    triton.language.core too, which tl.sum and tl.max use, so they can be called this way as well.
    """

    def __init__(self, interpreted: Any):
        self.interpreted = interpreted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.interpreted.rewrite()(*args, **kwargs)


def fast(jitted: Any) -> Any:
    """A jitted device function, wrapped as _InterpretedDeviceFunction when interpreted."""
    return _InterpretedDeviceFunction(jitted) if hasattr(jitted, "rewrite") else jitted


def device_function(fn: Callable) -> Any:
    """jit for functions called from kernels."""
    return fast(jit(fn))


# tl.sum and tl.max are jitted device functions too: the kernels call them through these names
tl_sum = None if tl is None else fast(tl.sum)
tl_max = None if tl is None else fast(tl.max)


def constexpr(value: float) -> Any:
    """Kernels may read a global only when it is a tl.constexpr."""
    return value if tl is None else tl.constexpr(value)


def available() -> bool:
    """Whether the kernels can run here: triton imported, and a CUDA device or the interpreter."""
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def require(device: torch.device) -> None:
    """Raise a clear RuntimeError unless the kernels can run on `device`."""
    if triton is None:
        raise RuntimeError(
            f"the caffast Triton backend needs triton ({_IMPORT_ERROR}); install it with: pip install triton"
        ) from _IMPORT_ERROR
    if device.type == "cuda" or INTERPRETED:
        return
    raise RuntimeError(
        f"the caffast Triton kernels run on CUDA tensors, got {device}; for CPU tensors set TRITON_INTERPRET=1 "
        "before triton is first imported (the interpreter: slow, for tests)"
    )


def checked(
    tensor: Any, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """`tensor`, contiguous, after checking its type, dtype, shape and device (nothing is converted)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise TypeError(f"{name} must be {wanted}, got {str(tensor.dtype).removeprefix('torch.')}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other inputs on {device}")
    return tensor.contiguous()


def block_size(count: int, least: int = 1) -> int:
    return max(triton.next_power_of_2(max(count, 1)), least)


def scalars(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Float settings for a kernel, in the compute dtype (a float argument would be float32)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)
