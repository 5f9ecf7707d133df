"""Backends: how the loss of a batch of problems and its gradient with respect to the filters are
computed.  "torch" runs the real tail with autograd and works for every model and layer."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch")


def resolve_backend(name: str, device: torch.device) -> str:
    from ..filters import check_choice

    check_choice("backend", name, BACKENDS)
    return "torch" if name == "auto" else name
