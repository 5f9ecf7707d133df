"""Synthetic volumes and a small volumetric CNN: a 3-D model to explain with no downloads.

`VolumeNet` is three Conv3d-BatchNorm3d-ReLU blocks, a global average pool over D x H x W and a
Linear, so its head fuses at `block2` (docs/design.md, 'The fused head') and `block1` is an
intermediate breakpoint whose tail starts with a Conv3d and a BatchNorm3d, which fold
(caffast.core.folds).  `ball_volumes` draws noisy volumes, half of them holding a bright ball: the
tests, the benchmarks and scripts/volume_pictures.py explain it on them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())


class VolumeNet(nn.Module):
    """stem (a D x H x W grid), block1 (halved), block2, then global average pool and a Linear."""

    def __init__(self, channels: int = 8, classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = _block(in_channels, channels, 1)
        self.block1 = _block(channels, 2 * channels, 2)
        self.block2 = _block(2 * channels, 2 * channels, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


class Volumes(NamedTuple):
    """volumes (N, 1, S, S, S), labels (N,) (1: a ball is there), centres (N, 3) (D, H, W voxels) and
    masks (N, S, S, S) (True inside the ball)."""

    volumes: torch.Tensor
    labels: torch.Tensor
    centres: torch.Tensor
    masks: torch.Tensor


def ball_volumes(
    count: int, size: int = 16, radius: float = 3.0, generator: Optional[torch.Generator] = None
) -> Volumes:
    """`count` volumes of Gaussian noise (sigma 0.5); the odd-numbered ones hold a ball of brightness
    1.5 and `radius` voxels at a random place wholly inside the volume."""
    generator = generator or torch.Generator().manual_seed(0)
    axis = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, S, S, S)
    low, high = radius, size - 1 - radius
    centres = low + (high - low) * torch.rand(count, 3, generator=generator)
    labels = torch.arange(count) % 2
    distance = (grid[None] - centres[:, :, None, None, None]).square().sum(1).sqrt()
    masks = (distance <= radius) & labels.bool()[:, None, None, None]
    noise = 0.5 * torch.randn(count, 1, size, size, size, generator=generator)
    return Volumes(noise + 1.5 * masks[:, None].float(), labels, centres, masks)
