"""Update rules for a batch of independent filters: the reference learning-rate schedule, SGD and Adam.

Every active problem has taken the same number of steps (problems only ever leave the batch), so
the step count and the learning rate are scalars shared by the batch.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam")
MIN_LEARNING_RATE = 1e-5  # where the reference schedule ends
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
        self.steps += 1
        first = self.first_moment.index_select(0, active).lerp_(grad, 1 - self.beta1)
        second = self.second_moment.index_select(0, active).mul_(self.beta2)
        second.addcmul_(grad, grad, value=1 - self.beta2)
        self.first_moment.index_copy_(0, active, first)
        self.second_moment.index_copy_(0, active, second)
        step_size = lr / (1 - self.beta1**self.steps)
        denom = (second.sqrt() / (1 - self.beta2**self.steps) ** 0.5).add_(self.eps)
        rows = params.index_select(0, active)
        rows.addcdiv_(first, denom, value=-step_size)
        params.index_copy_(0, active, rows)


def make_optimizer(name: str, params: torch.Tensor) -> SGD | Adam:
    return {"sgd": SGD, "adam": Adam}[name](params)
