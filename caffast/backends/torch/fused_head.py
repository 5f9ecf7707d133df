"""The truncated forward of a fused head in plain PyTorch: the twin of triton.fused_head."""

from __future__ import annotations

from typing import Optional

import torch

from ...core.heads import filter_parts


def fused_head_forward_torch(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Twin of `FusedHeadForward`: parts (P, S, K, HW), g (P, HW), bias (K,) or None -> FT (P, K)."""
    cells = g.shape[1]
    pieces = filter_parts(g, parts.shape[1])
    out = sum(torch.einsum("pkj,pj->pk", parts[:, a], piece) for a, piece in enumerate(pieces)) / cells
    return out if bias is None else out + bias
