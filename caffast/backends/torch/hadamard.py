"""The Hadamard filter in plain PyTorch: the twin of the compiled ones (cpp and triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hadamard_torch(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, H, W) * filter (P, H, W) / ||filter||; twin of the `Hadamard` Functions: autograd gives its backward."""
    return features * F.normalize(filter.flatten(1), dim=1).view_as(filter)[:, None]
