"""The inputs of an explanation, checked once: the images, the targets, the model's device (its settings:
caffast.core.settings)."""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..core.losses import Score
from ..core.outputs import describe, leaves, primary_output

Target = Union[int, Score]
Targets = Union[None, Target, Sequence[Target], Sequence[Sequence[Target]], torch.Tensor, np.ndarray]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (found without listing them all)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_meta:
            raise ValueError(
                "the model is on the meta device: its weights have no values; build it on a real device, "
                "or give it storage with model.to_empty(device='cpu') and then load its weights"
            )
        return tensor.device
    return torch.device("cpu")


def check_images(images: object) -> torch.Tensor:
    """A batch of images (N, C, H, W), or of clips or volumes (N, C, D, H, W): any rank with at
    least two spatial axes after the channels, as the model takes it."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, C, H, W), not {type(images).__name__}")
    if images.dim() < 4:
        hint = " (add the batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(
            f"images must have shape (N, C, H, W), or (N, C, D, H, W) for clips and volumes; got "
            f"{tuple(images.shape)}{hint}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch; pass at least one image")
    if images.is_meta:
        raise ValueError("images are on the meta device and hold no values; pass a tensor with data")
    if not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be a floating-point tensor, got {images.dtype}: convert them with images.float() "
            "(and scale and normalize them as the model expects, e.g. / 255, then the mean and std)"
        )
    return images


class TargetError(TypeError, ValueError):
    """A target of the wrong kind (a bool, a float, an object that is neither a class nor a callable):
    a TypeError by its cause and a ValueError as explain's other refused arguments, so either
    `except` catches it."""


class TargetTable(NamedTuple):
    """The problems of each image: `classes` (N, T), -1 where a callable scores the problem, and
    `scores` (N * T, row-major) the callables, None where every target is a class."""

    classes: torch.Tensor
    scores: Optional[list[Optional[Score]]]


def resolve_targets(mode: str, targets: Targets, output: Any) -> torch.Tensor:
    """(N, T) class indices: the top-1 class when none are given (class targets only)."""
    table = target_table(mode, targets, output)
    if table.scores is not None:
        raise ValueError("these targets are callables; here only class indices are accepted")
    return table.classes


def target_table(mode: str, targets: Targets, output: Any) -> TargetTable:
    """Every form of targets as one table.

    None: the top-1 class of each image.  An int or a callable: that target for every image.  A list
    of them: each for every image.  A list of N per-image lists, or an (N, T) tensor or array: each
    image's own.  A 1-D tensor or array of N labels: one class per image.  A callable takes one
    image's model output and returns the score to raise (pytorch-grad-cam's targets); its
    ClassifierOutputTarget(c) is the class c, scored by explain's class-specific `loss`.
    """
    scores = primary_output(output)
    batch = leaves(output)[0].shape[0]
    ranked = scores if scores is not None and scores.dim() == 2 else None
    if mode == "oblivious":
        if targets is not None:
            raise ValueError("targets apply to mode='specific'; class-oblivious explains the whole output")
        if ranked is not None:
            return TargetTable(ranked.argmax(dim=1, keepdim=True), None)
        return TargetTable(torch.full((batch, 1), -1, dtype=torch.long, device=ranked_device(output)), None)
    if targets is None:
        if ranked is None:
            raise ValueError(
                f"mode='specific' without targets explains each image's top class, which needs class scores of "
                f"shape (N, K); the model outputs {describe(output)}: pass targets (callables that score one "
                "image's output, such as pytorch-grad-cam's SemanticSegmentationTarget), or use mode='oblivious'"
            )
        return TargetTable(ranked.argmax(dim=1, keepdim=True), None)
    rows = _target_rows(targets, batch)
    indices = [t for row in rows for t in row if isinstance(t, int)]
    if indices:  # checked before they become int64, which a huge index would overflow
        if ranked is None:
            raise ValueError(
                f"class targets need class scores of shape (N, K); the model outputs {describe(output)}: pass "
                "callables that score one image's output instead"
            )
        count = ranked.shape[1]
        if min(indices) < 0 or max(indices) >= count:
            shown = [[t if isinstance(t, int) else "callable" for t in row] for row in rows]
            raise ValueError(f"targets must be class indices in [0, {count}); got {shown}")
    classes = torch.tensor([[t if isinstance(t, int) else -1 for t in row] for row in rows], dtype=torch.long)
    classes = classes.to(ranked_device(output))
    callables = [t if callable(t) else None for row in rows for t in row]
    return TargetTable(classes, callables if any(c is not None for c in callables) else None)


def ranked_device(output: Any) -> torch.device:
    return leaves(output)[0].device


_FORMS = (
    "targets must be None, a class index (an int, or an object with an integer `category` such as "
    "ClassifierOutputTarget), a callable target, a list of those (each for every image), a list of "
    "per-image lists, an (N, T) integer tensor or array, or a 1-D one of N labels (one class per image)"
)


def _target(value: Any) -> Union[int, Score]:
    """One target: a class index or a callable."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item() if isinstance(value, torch.Tensor) else value[()]
    if isinstance(value, (bool, np.bool_)):
        raise TargetError(f"targets must be class indices (integers) or callables, not booleans; got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        raise TargetError(f"targets must be class indices (integers), not floats; got {value!r} (use int(...) or .long())")
    category = getattr(value, "category", None)
    is_class = type(value).__name__ == "ClassifierOutputTarget" or not callable(value)
    if is_class and isinstance(category, (int, np.integer)) and not isinstance(category, (bool, np.bool_)):
        return int(category)
    if callable(value):
        return value
    raise TargetError(f"{_FORMS}; got a {type(value).__name__}")


def _array_rows(targets: Union[torch.Tensor, np.ndarray], batch: int) -> list[list[Union[int, Score]]]:
    dtype = str(targets.dtype)
    if "bool" in dtype:
        raise TargetError("targets must be class indices (integers), not booleans: e.g. mask.nonzero()")
    if "float" in dtype or "complex" in dtype:
        raise TargetError(f"targets must be class indices (integers), not {dtype} (use .long() or .astype(int))")
    values = targets.tolist()
    if targets.ndim == 1:
        if len(values) != batch:
            raise ValueError(
                f"a 1-D targets tensor or array gives one class per image: {len(values)} labels for {batch} images; "
                "for the same classes for every image pass a list"
            )
        return [[_target(v)] for v in values]
    if targets.ndim != 2 or len(values) != batch:
        raise ValueError(f"an integer targets tensor or array must have shape (N, T) = ({batch}, T); got {tuple(targets.shape)}")
    return [[_target(v) for v in row] for row in values]


def _target_rows(targets: Targets, batch: int) -> list[list[Union[int, Score]]]:
    """The targets of each image, N rows of T."""
    if isinstance(targets, (torch.Tensor, np.ndarray)) and targets.ndim > 0:
        rows = _array_rows(targets, batch)
    elif isinstance(targets, (list, tuple)):
        nested = [isinstance(t, (list, tuple)) or (isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim > 0) for t in targets]
        if not targets:
            raise ValueError(f"targets is empty; {_FORMS}")
        if any(nested) and not all(nested):
            raise ValueError(f"targets mixes lists and single targets; {_FORMS}")
        if all(nested):
            if len(targets) != batch:
                raise ValueError(f"{len(targets)} per-image target lists for {batch} images; pass one list per image")
            rows = [[_target(t) for t in row] for row in targets]
        else:
            rows = [[_target(t) for t in targets]] * batch
    else:
        rows = [[_target(targets)]] * batch
    counts = {len(row) for row in rows}
    if 0 in counts or len(counts) != 1:
        raise ValueError(f"every image needs the same number of targets (at least one); got {[len(r) for r in rows]}")
    return rows
