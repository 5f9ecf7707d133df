"""What the filter optimizes: the class-oblivious and class-specific losses, or a user's objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union, get_args

import torch

from .choices import LossName, Mode
from .outputs import flat_rows, leaves, map_tensors, one_image, select_rows

MODES: tuple[Mode, ...] = get_args(Mode)

UserObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = Callable[[Any], torch.Tensor]


class ClassLoss:
    """A class-specific loss: a function of the tail's output FT (R, K) and each row's class, lower when
    the filter makes the model see more of that class.

    `weights` is the (P, K) vector s of a loss linear in FT (loss = s . FT), None for a nonlinear one;
    linear losses get the fused head's closed form and compiled loops (caffast.core.heads).
    """

    name: str = ""
    summary: str = ""

    def weights(self, targets: torch.Tensor, classes: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None

    def __call__(self, output: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"ClassLoss({self.name!r})"


class LinearClassLoss(ClassLoss):
    """s . FT with s = -1 at the target and `others(K)` at every other class."""

    def __init__(self, name: str, others: Callable[[int], float], summary: str):
        self.name, self.others, self.summary = name, others, summary

    def weights(self, targets: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
        """(P, K); a negative target (a problem scored by a callable) gets all zeros."""
        weights = torch.full((targets.shape[0], classes), self.others(classes), dtype=dtype, device=targets.device)
        weights.scatter_(1, targets.clamp_min(0)[:, None], -1.0)
        return weights * (targets >= 0)[:, None]

    def __call__(self, output: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        if weights is None:
            weights = self.weights(targets, output.shape[1], output.dtype)
        return (output * weights).sum(dim=1)


class LogSoftmaxLoss(ClassLoss):
    """-log softmax(FT)_t: the target's log-probability, raised."""

    name = "log_softmax"
    summary = "minus the target's log-probability (log-softmax of the logits)"

    def __call__(self, output: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        return -torch.log_softmax(output, dim=1).gather(1, targets.clamp_min(0)[:, None])[:, 0]


CLASS_LOSSES: dict[str, ClassLoss] = {
    loss.name: loss
    for loss in (
        LinearClassLoss("release", lambda classes: 1.0,
                        "the official releases': raise the target logit and lower the sum of all the others "
                        "(on a trained network with many classes its maps hardly depend on the class)"),
        LinearClassLoss("margin", lambda classes: 1.0 / max(classes - 1, 1),
                        "raise the target logit above the mean of the others"),
        LinearClassLoss("logit", lambda classes: 0.0, "raise the target logit alone"),
        LogSoftmaxLoss(),
    )
}  # fmt: skip
DEFAULT_CLASS_LOSS: LossName = "margin"
ClassLossLike = Union[str, ClassLoss]


def as_class_loss(loss: ClassLossLike) -> ClassLoss:
    """The loss object for a name of CLASS_LOSSES (or the object itself)."""
    if isinstance(loss, ClassLoss):
        return loss
    if isinstance(loss, str) and loss in CLASS_LOSSES:
        return CLASS_LOSSES[loss]
    raise ValueError(f"loss must be one of {', '.join(map(repr, CLASS_LOSSES))}, got {loss!r}")


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
    dict or tuple of them).  Class-specific problems have a class in `targets` (P,) scored by
    `class_loss` (with its `weights`, (P, K), when it is linear); `scores` holds, per problem, the
    callable target that scores it instead (None where the problem has a class)."""

    mode: str
    reference: Any
    class_loss: Optional[ClassLoss] = None
    targets: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
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
                return self._classes(output, rows)
            return torch.stack([self._specific(output, k, p) for k, p in enumerate(rows.tolist())])
        difference = flat_rows(output) - flat_rows(select_rows(self.reference, rows))
        return (difference * difference).mean(dim=1)

    def _specific(self, output: Any, row: int, problem: int) -> torch.Tensor:
        score = self.scores[problem]
        if score is None:
            return self._classes(output[row : row + 1], torch.tensor([problem], device=output.device))[0]
        return score_loss(score, one_image(output, row)).to(self.dtype)

    def _classes(self, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        weights = None if self.weights is None else self.weights.index_select(0, rows)
        return self.class_loss(output, self.targets.index_select(0, rows), weights)

    @property
    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in leaves(self.reference) if t.is_floating_point()), torch.float32)


def as_dtype(value: Any, dtype: torch.dtype) -> Any:
    """The floating-point tensors of an output in `dtype` (labels and indices stay integer)."""
    return map_tensors(lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor, value)
