"""Update rules for a batch of independent filters: the reference learning-rate schedule, SGD, Adam
(torch.optim.Adam's form) and "adam_tf1" (TensorFlow 1's AdamOptimizer, the TensorFlow release's).

Every active problem has taken the same number of steps (problems only ever leave the batch), so
the step count and the learning rate are scalars shared by the batch.
"""

from __future__ import annotations

from typing import get_args

import torch

from .choices import OptimizerName

OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
COMPILED_OPTIMIZERS = ("sgd", "adam")  # what the compiled fused solvers (cpp, triton) implement
MIN_LEARNING_RATE = 1e-5  # where the reference schedule ends (the TensorFlow release's ends at 0)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


def polynomial_lr_decay(
    global_step: int, init_learning_rate: float, max_iter: int, min_learning_rate: float = MIN_LEARNING_RATE
) -> float:
    """The reference schedule: linear decay from the initial rate to `min_learning_rate`."""
    power = 1
    decay = (1 - global_step / max_iter) ** power
    return (init_learning_rate - min_learning_rate) * decay + min_learning_rate


class SGD:
    """Plain gradient descent, as torch.optim.SGD without momentum."""

    def __init__(self, params: torch.Tensor):
        pass

    def step(self, params: torch.Tensor, grad: torch.Tensor, active: torch.Tensor, lr: float) -> None:
        rows = params.index_select(0, active)
        rows.add_(grad, alpha=-lr)
        params.index_copy_(0, active, rows)


class Adam:
    """Adam with torch.optim.Adam's defaults and its bias correction, one state per problem."""

    def __init__(self, params: torch.Tensor, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS):
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.first_moment = torch.zeros_like(params)
        self.second_moment = torch.zeros_like(params)
        self.steps = 0

    def step(self, params: torch.Tensor, grad: torch.Tensor, active: torch.Tensor, lr: float) -> None:
        first, second = self._moments(grad, active)
        step_size = lr / (1 - self.beta1**self.steps)
        denom = (second.sqrt() / (1 - self.beta2**self.steps) ** 0.5).add_(self.eps)
        _descend(params, active, first, denom, step_size)

    def _moments(self, grad: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the step and update the moments of the active rows; returns them (A, D) each."""
        self.steps += 1
        first = self.first_moment.index_select(0, active).lerp_(grad, 1 - self.beta1)
        second = self.second_moment.index_select(0, active).mul_(self.beta2)
        second.addcmul_(grad, grad, value=1 - self.beta2)
        self.first_moment.index_copy_(0, active, first)
        self.second_moment.index_copy_(0, active, second)
        return first, second


def _descend(params: torch.Tensor, active: torch.Tensor, first: torch.Tensor, denom: torch.Tensor, step_size: float) -> None:
    rows = params.index_select(0, active)
    rows.addcdiv_(first, denom, value=-step_size)
    params.index_copy_(0, active, rows)


class AdamTF1(Adam):
    """TensorFlow 1's Adam (tf.compat.v1.train.AdamOptimizer), as the TensorFlow release runs it.

    Its epsilon is the Adam paper's "epsilon hat": added to sqrt(v) before the bias correction is
    folded into the step size, lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t), step = lr_t * m / (sqrt(v) + eps).
    torch's form adds eps to the corrected sqrt(v / (1 - beta2^t)); the two differ where sqrt(v) is
    near eps, that is for gradients below about 1e-6.
    """

    def step(self, params: torch.Tensor, grad: torch.Tensor, active: torch.Tensor, lr: float) -> None:
        first, second = self._moments(grad, active)
        step_size = lr * (1 - self.beta2**self.steps) ** 0.5 / (1 - self.beta1**self.steps)
        _descend(params, active, first, second.sqrt().add_(self.eps), step_size)


def make_optimizer(name: OptimizerName, params: torch.Tensor) -> SGD | Adam:
    return {"sgd": SGD, "adam": Adam, "adam_tf1": AdamTF1}[name](params)
