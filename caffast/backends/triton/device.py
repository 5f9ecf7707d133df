"""Device functions shared by the kernels: the unit sphere, the learning-rate schedule, SGD and Adam.

Their plain PyTorch twins are caffast.core.optimizers and, for the sphere, one in tests/backends/test_triton.py,
where a probe kernel (tests/backends/triton_probes.py) runs them on their own.
"""

from __future__ import annotations

from ...core.constraints import NORM_EPS
from ...core.optimizers import ADAM_BETAS, ADAM_EPS, MIN_LEARNING_RATE
from .runtime import constexpr, device_function, tl, tl_core, tl_sum  # noqa: F401 (tl_core: see runtime)

BETA1, BETA2 = ADAM_BETAS
_NORM_EPS, _MIN_LR = constexpr(NORM_EPS), constexpr(MIN_LEARNING_RATE)
_BETA1, _BETA2, _ADAM_EPS = constexpr(BETA1), constexpr(BETA2), constexpr(ADAM_EPS)


@device_function
def sphere(f):
    """g = f / max(||f||, eps) over a row held in registers (F.normalize), and the clamped norm."""
    norm = tl.sqrt(tl_sum(f * f, axis=0))
    norm = tl.where(norm > _NORM_EPS, norm, _NORM_EPS)
    return f / norm, norm


@device_function
def sphere_grad(f, grad_g):
    """(grad_g - g (g . grad_g)) / n; with the clamp active the norm is constant and only grad_g / eps stays."""
    g, norm = sphere(f)
    radial = tl.where(norm > _NORM_EPS, tl_sum(g * grad_g, axis=0), 0.0)
    return (grad_g - g * radial) / norm


@device_function
def scheduled_lr(lr, step, total):
    """caffast.core.optimizers.polynomial_lr_decay; the step and the iteration count arrive as floats."""
    return (lr - _MIN_LR) * (1 - step / total) + _MIN_LR


@device_function
def optimizer_step(f, grad, m, v, lr, beta1_power, beta2_power, OPTIMIZER: tl.constexpr):
    """One step of caffast.core.optimizers' SGD or Adam, operation by operation as torch.optim.Adam (single
    tensor) does it; beta*_power are beta ** k for the k-th step."""
    if OPTIMIZER == "adam":
        m = m + (1 - _BETA1) * (grad - m)
        v = v * _BETA2 + (1 - _BETA2) * grad * grad
        step_size = lr / (1 - beta1_power)
        denom = tl.sqrt(v) / tl.sqrt(1 - beta2_power) + _ADAM_EPS
        f = f - step_size * (m / denom)
    else:
        f = f - lr * grad
    return f, m, v
