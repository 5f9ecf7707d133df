"""Model outputs of any structure: a tensor, a dict (torchvision segmentation), a tuple, or an object
with `.logits` (HuggingFace's ModelOutput).

An output stands for one tensor where that is certain (itself, its `logits`, or its only tensor); the
losses then work on that tensor and the fused path can apply.  Anything else is kept as it is: the
class-oblivious loss compares every tensor in it and a callable target receives one image's part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch


def leaves(value: Any, leaf: type = torch.Tensor) -> list[Any]:
    """The tensors (or fx nodes, with `leaf=fx.Node`) in a nested dict, list or tuple, in order."""
    if isinstance(value, leaf):
        return [value]
    if isinstance(value, Mapping):
        return [found for item in value.values() for found in leaves(item, leaf)]
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in leaves(item, leaf)]
    return []


def primary_output(value: Any, leaf: type = torch.Tensor) -> Optional[Any]:
    """The one tensor an output stands for: itself, its `logits`, or its only tensor; None when it
    holds several (or none)."""
    if isinstance(value, leaf):
        return value
    logits = value.get("logits") if isinstance(value, Mapping) else getattr(value, "logits", None)
    if isinstance(logits, leaf):
        return logits
    found = leaves(value, leaf)
    return found[0] if len(found) == 1 else None


def normalize_output(value: Any) -> Any:
    """The output's tensor where it stands for one, the structure otherwise."""
    primary = primary_output(value)
    return value if primary is None else primary


def map_tensors(function: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`function` applied to every tensor of a nested output; other leaves (None) stay."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, Mapping):
        return {key: map_tensors(function, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [map_tensors(function, item) for item in value]
        if hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return items if isinstance(value, list) else tuple(items)
    return value


def select_rows(value: Any, index: torch.Tensor) -> Any:
    """The rows `index` of every tensor of a batched output."""
    return map_tensors(lambda tensor: tensor.index_select(0, index), value)


def one_image(value: Any, row: int) -> Any:
    """Row `row` of every tensor: what a callable target receives, one image's output."""
    return map_tensors(lambda tensor: tensor[row], value)


def flat_rows(value: Any) -> torch.Tensor:
    """Every tensor of a batched output flattened and side by side: (P, D)."""
    return torch.cat([tensor.flatten(1) for tensor in leaves(value)], dim=1)


def describe(value: Any) -> str:
    """A short account of an output for error messages: its shape, or its kind and tensor count."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return f"a {type(value).__name__} of {len(leaves(value))} tensors"
