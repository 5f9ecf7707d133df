"""What the filter optimizes: the class-oblivious and class-specific losses, or a user's objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODES = ("oblivious", "specific")

UserObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_signs(targets: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """+1 for every class and -1 at the target: minimizing sum(s * FT) raises the target's logit and
    lowers the rest.  `targets` (P,) gives (P, classes)."""
    signs = torch.ones(targets.shape[0], classes, dtype=dtype, device=targets.device)
    signs.scatter_(1, targets[:, None], -1.0)
    return signs


@dataclass
class Objective:
    """The loss of each problem; `reference` is NT for each problem's image, (P, ...)."""

    mode: str
    reference: torch.Tensor
    signs: Optional[torch.Tensor] = None
    custom: Optional[UserObjective] = None

    def __call__(self, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        output = output.to(self.reference.dtype)
        if self.custom is not None:
            loss = self.custom(output, self.reference.index_select(0, rows))
            if not isinstance(loss, torch.Tensor) or loss.shape != (rows.numel(),):
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"objective(FT, NT) returned {shape}; it must return one loss per sample, "
                    f"shape ({rows.numel()},): reduce over every dimension but the first"
                )
            return loss
        if self.mode == "specific":
            return (output * self.signs.index_select(0, rows)).sum(dim=1)
        difference = output - self.reference.index_select(0, rows)
        return (difference * difference).flatten(1).mean(dim=1)
