"""The "cpp" backend: typed torch wrappers around caffast._C, the C++ CPU kernels.

Tensors cross as zero-copy numpy views of CPU tensors, so every wrapper insists on the dtype,
device and layout the kernels read instead of converting silently (a hidden copy would make an
in-place update vanish and a hidden cast would change the numbers).
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import numpy as np
import torch

from ..heads import FusedHead
from ..solve import LoopSettings

try:
    from .. import _C
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
    _kernels()


def _kernels() -> ModuleType:
    """The extension module, or a RuntimeError that carries the import error and the fix."""
    if _C is None:
        raise RuntimeError(
            f"the caffast C++ backend is unavailable ({_IMPORT_ERROR}); rebuild it with a C++17 compiler: "
            "pip install --no-build-isolation -e ."
        ) from _IMPORT_ERROR
    return _C


def _view(tensor: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> np.ndarray:
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


def _threads() -> int:
    """The kernels use as many threads as torch, so torch.set_num_threads governs both."""
    return torch.get_num_threads()


def solve_fused(
    head: FusedHead, constraint: str, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the whole reference loop for P fused-head problems in one call (DESIGN.md section 3).

    The head's gram (I, S, S, HW, HW), linear (P, S, HW) and constant (P,) and params (P, D) are
    contiguous float64 CPU tensors, image (P,) int64.  The oblivious mode reads gram and image only,
    the specific mode linear and constant only; the others may be None.  Returns the final
    parameters (a new tensor; `params` is left as it was), the iterations run (P,) and the loss of
    the last iteration (P,).
    """
    kernels = _kernels()
    f64, i64 = (torch.float64,), (torch.int64,)
    height, width = head.grid
    cells = height * width
    problems = params.shape[0]
    gram, linear, constant, image = head.gram, head.linear, head.constant, head.image
    if head.mode == "specific":
        if linear is None or constant is None:
            raise ValueError("the specific mode needs linear and constant")
        signs = linear.shape[1]
        gram = torch.empty((0, signs, signs, cells, cells), dtype=torch.float64)
        image = torch.zeros(problems, dtype=torch.int64)
    else:
        if gram is None or image is None:
            raise ValueError("the oblivious mode needs gram and image")
        signs = gram.shape[1]
        linear = torch.zeros((problems, signs, cells), dtype=torch.float64)
        constant = torch.zeros(problems, dtype=torch.float64)
    result = _view(params, "params", f64).copy()
    iterations, loss = kernels.solve_fused(
        _view(gram, "gram", f64),
        _view(linear, "linear", f64),
        _view(constant, "constant", f64),
        _view(image, "image", i64),
        result,
        mode=head.mode,
        constraint=constraint,
        optimizer=settings.optimizer,
        height=height,
        width=width,
        classes=head.classes,
        max_iter=settings.max_iter,
        lr=settings.lr,
        min_error=settings.min_error,
        check_every=settings.check_every,
        threads=_threads(),
    )
    return torch.from_numpy(result), torch.from_numpy(iterations), torch.from_numpy(loss)


def hadamard_forward(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, H, W) * filter (P, H, W) / ||filter||, the norm per problem over H, W."""
    out = _kernels().hadamard_forward(
        _view(features, "features", FLOATING), _view(filter, "filter", (features.dtype,)), threads=_threads()
    )
    return torch.from_numpy(out)


def hadamard_backward(features: torch.Tensor, filter: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of hadamard_forward with respect to the filter, (P, H, W)."""
    grad = _kernels().hadamard_backward(
        _view(features, "features", FLOATING),
        _view(filter, "filter", (features.dtype,)),
        _view(grad_out, "grad_out", (features.dtype,)),
        threads=_threads(),
    )
    return torch.from_numpy(grad)


class Hadamard(torch.autograd.Function):
    """features * F.normalize(filter over H, W), differentiable in the filter only: the features are
    the captured breakpoint activations, which L2-CAF never trains."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, filter)
        return hadamard_forward(features, filter)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None]:
        features, filter = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        # autograd often hands in expanded (stride-0) gradients, e.g. from a sum: make them dense.
        return None, hadamard_backward(features, filter, grad_out.contiguous())


def projected_update(params: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """params (P, D) -= lr * (grad - g (g . grad)) / ||params|| in place, with g = params / ||params||
    per row and `grad` the gradient with respect to g; returns params."""
    _kernels().projected_update(
        _view(params, "params", FLOATING), _view(grad, "grad", (params.dtype,)), lr, threads=_threads()
    )
    return params
