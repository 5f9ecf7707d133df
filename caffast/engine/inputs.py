"""The inputs of an explanation, checked once: the images, the targets, the model's device."""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

Targets = Union[None, int, Sequence[int], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
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
    return images


def check_settings(max_iter: int, lr: float, min_error: float, check_every: int, tolerance: float) -> None:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not min_error >= 0:
        raise ValueError(f"min_error must be zero or positive, got {min_error!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")


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
        if not classes_each or not all(isinstance(c, int) for c in classes_each):
            raise ValueError(f"targets must be None, an int, a list of ints or an (N, T) tensor; got {targets!r}")
        resolved = torch.tensor(classes_each, dtype=torch.long).repeat(batch, 1)
    resolved = resolved.to(output.device)
    if resolved.numel() == 0 or resolved.min() < 0 or resolved.max() >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}); got {resolved.tolist()}")
    return resolved
