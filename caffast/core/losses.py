"""What the filter optimizes: the class-oblivious and class-specific losses, or a user's objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .outputs import flat_rows, leaves, map_tensors, one_image, select_rows

MODES = ("oblivious", "specific")

UserObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = Callable[[Any], torch.Tensor]


def class_signs(targets: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """+1 for every class and -1 at the target: minimizing sum(s * FT) raises the target's logit and
    lowers the rest.  `targets` (P,) gives (P, classes); a negative target (a problem scored by a
    callable) gets no signs."""
    signs = torch.ones(targets.shape[0], classes, dtype=dtype, device=targets.device)
    signs.scatter_(1, targets.clamp_min(0)[:, None], -1.0)
    return signs * (targets >= 0)[:, None]


def score_loss(score: Score, output: Any) -> torch.Tensor:
    """-score(one image's output): the filter raises what the target scores.  A target that returns
    several values (pytorch-grad-cam's RawScoresOutputTarget) raises their sum."""
    value = score(output)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(
            f"a target returned {kind}; it must return a float tensor computed from the model output of "
            "one image (a scalar, or scores that are summed)"
        )
    return -value.sum()


@dataclass
class Objective:
    """The loss of each problem; `reference` is NT for each problem's image, (P, ...) (a tensor, or a
    dict or tuple of them).  `scores` holds, per problem, the callable target that scores it (None
    where the problem has a class and `signs`)."""

    mode: str
    reference: Any
    signs: Optional[torch.Tensor] = None
    custom: Optional[UserObjective] = None
    scores: Optional[Sequence[Optional[Score]]] = None

    def __call__(self, output: Any, rows: torch.Tensor) -> torch.Tensor:
        output = as_dtype(output, self.dtype)
        if self.custom is not None:
            loss = self.custom(output, select_rows(self.reference, rows))
            if not isinstance(loss, torch.Tensor) or loss.shape != (rows.numel(),):
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"objective(FT, NT) returned {shape}; it must return one loss per sample, "
                    f"shape ({rows.numel()},): reduce over every dimension but the first"
                )
            return loss
        if self.mode == "specific":
            if self.scores is None:
                return (output * self.signs.index_select(0, rows)).sum(dim=1)
            return torch.stack([self._specific(output, k, p) for k, p in enumerate(rows.tolist())])
        difference = flat_rows(output) - flat_rows(select_rows(self.reference, rows))
        return (difference * difference).mean(dim=1)

    def _specific(self, output: Any, row: int, problem: int) -> torch.Tensor:
        score = self.scores[problem]
        if score is None:
            return (output[row] * self.signs[problem]).sum()
        return score_loss(score, one_image(output, row)).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in leaves(self.reference) if t.is_floating_point()), torch.float32)


def as_dtype(value: Any, dtype: torch.dtype) -> Any:
    """The floating-point tensors of an output in `dtype` (labels and indices stay integer)."""
    return map_tensors(lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor, value)
