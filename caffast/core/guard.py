"""Hand the user's model back exactly as it came in."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode and no parameter gradients for the duration, restored afterwards.

    Explaining needs the eval-mode network (running batch-norm statistics, no dropout) and gradients
    only with respect to the filter.  Each module's own training flag and each parameter's own
    requires_grad flag are restored, also when the body raises.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in requires_grad:
            param.requires_grad_(False)
        yield model
    finally:
        for module, flag in training:
            module.training = flag
        for param, flag in requires_grad:
            param.requires_grad_(flag)
