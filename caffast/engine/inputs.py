"""The inputs of an explanation, checked once: the images, the targets, the model's device."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

Targets = Union[None, int, Sequence[int], torch.Tensor]

MAX_COUNT = 2**63 - 1  # iterations are counted in int64, by the compiled solvers too
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_meta:
            raise ValueError(
                "the model is on the meta device: its weights have no values; build it on a real device, "
                "or give it storage with model.to_empty(device='cpu') and then load its weights"
            )
        return tensor.device
    return torch.device("cpu")


def check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, C, H, W), not {type(images).__name__}")
    if images.dim() != 4:
        hint = " (add the batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape (N, C, H, W); got {tuple(images.shape)}{hint}")
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


class Settings(NamedTuple):
    """The numeric options of explain, checked: Python ints and floats."""

    max_iter: int
    lr: float
    min_error: float
    check_every: int
    tolerance: float
    seed: Optional[int]


def _integer(name: str, value: object, low: int, high: int) -> int:
    """An int in [low, high]; bools are refused (True would count as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise ValueError(f"{name} must be an integer, got {value!r} ({kind})")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise ValueError(f"{name} must be a number, got {value!r} ({kind})")
    return float(value)


def check_settings(
    max_iter: object, lr: object, min_error: object, check_every: object, tolerance: object, seed: object = None
) -> Settings:
    """The settings as Python numbers, or a ValueError naming the one that is wrong and why."""
    max_iter = _integer("max_iter", max_iter, 1, MAX_COUNT)
    check_every = _integer("check_every", check_every, 1, MAX_COUNT)
    lr = _number("lr", lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    min_error = _number("min_error", min_error)
    if not min_error >= 0:
        raise ValueError(f"min_error must be zero or positive, got {min_error!r}")
    tolerance = _number("tolerance", tolerance)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    if seed is not None:
        seed = _integer("seed", seed, *SEED_RANGE)
    return Settings(max_iter, lr, min_error, check_every, tolerance, seed)


def resolve_targets(mode: str, targets: Targets, output: torch.Tensor) -> torch.Tensor:
    """(N, T) class indices: the top-1 class when none are given."""
    batch = output.shape[0]
    if mode == "oblivious":
        if targets is not None:
            raise ValueError("targets apply to mode='specific'; class-oblivious explains the whole output")
        if output.dim() == 2:
            return output.argmax(dim=1, keepdim=True)
        return torch.full((batch, 1), -1, dtype=torch.long, device=output.device)
    if output.dim() != 2:
        raise ValueError(
            f"mode='specific' needs class scores of shape (N, K); the model outputs {tuple(output.shape)}: "
            "use mode='oblivious' for other outputs"
        )
    classes = output.shape[1]
    if isinstance(targets, bool) or (isinstance(targets, torch.Tensor) and targets.dtype == torch.bool):
        got = repr(targets) if isinstance(targets, bool) else "a torch.bool tensor"
        raise ValueError(f"targets must be class indices, not booleans; got {got}")
    if targets is None:
        resolved = output.argmax(dim=1, keepdim=True)
    elif isinstance(targets, int):
        resolved = torch.full((batch, 1), targets, dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.dim() != 2 or targets.shape[0] != batch or targets.dtype.is_floating_point:
            raise ValueError(
                f"a targets tensor must be integer with shape (N, T) = ({batch}, T); got {targets.dtype} "
                f"{tuple(targets.shape)} (for one class per image use targets.view(-1, 1))"
            )
        resolved = targets.long()
    else:
        classes_each = list(targets)
        if not classes_each or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes_each):
            raise ValueError(f"targets must be None, an int, a list of ints or an (N, T) tensor; got {targets!r}")
        resolved = torch.tensor(classes_each, dtype=torch.long).repeat(batch, 1)
    resolved = resolved.to(output.device)
    if resolved.numel() == 0 or resolved.min() < 0 or resolved.max() >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}); got {resolved.tolist()}")
    return resolved
