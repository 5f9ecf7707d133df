"""Flat maps: problems whose map carries no information, named instead of returned silently.

A breakpoint followed by a BatchNorm and a clipping activation (ReLU6, ReLU) can switch every unit
of the tail off at the reference's start: the output then does not move with the filter, the
gradient is exactly zero and every solver hands back its uniform start.  explain flags such maps,
warns with a FlatMapWarning, and names the nearest later layer whose map is not flat.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.nn as nn

from ..core.breakpoints import map_layers, resolve_layer, unwrap

_ROUNDING = 4  # cells that differ by at most this many units of rounding (relative to the largest) are equal
_CANDIDATES = 8  # later layers tried when looking for one that works
_searching: ContextVar[bool] = ContextVar("searching", default=False)
T = TypeVar("T")


class FlatMapWarning(UserWarning):
    """A map came back flat: the loss does not depend on the filter at the breakpoint."""


def flat_maps(filters: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(P,) True where the returned filter is uniform, or still the `start` filter."""
    values, start = filters.flatten(1), start.to(filters.dtype).flatten(1)
    resolution = _ROUNDING * torch.finfo(values.dtype).eps * values.abs().amax(dim=1)
    uniform = values.amax(dim=1) - values.amin(dim=1) <= resolution
    unmoved = (values - start).abs().amax(dim=1) <= resolution
    return uniform | unmoved


def warn_flat(
    flat: torch.Tensor,
    gradient_norm: torch.Tensor,
    name_of: Callable[[int], str],
    layer: str,
    nearest: Callable[[], Optional[str]],
) -> None:
    """One FlatMapWarning for every flat problem of a call: which, why, and where to go instead."""
    problems = [int(p) for p in flat.nonzero().flatten()]
    if not problems or _searching.get():
        return
    shown = ", ".join(name_of(p) for p in problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
    if bool((gradient_norm[problems] == 0).all()):
        cause = ("the loss's gradient is exactly 0 there: the layers after the breakpoint are saturated (a "
                 "BatchNorm followed by a clipping activation such as ReLU6 can switch every unit off at the "
                 "start), so no filter changes the output")  # fmt: skip
    else:
        cause = "the solver returned a uniform filter: the loss hardly depends on the filter at this layer"
    better = nearest()
    fix = f"explain at '{better}' instead (the nearest later layer whose map is not flat)" if better else (
        "explain at a later layer, such as the activation after the next BatchNorm")  # fmt: skip
    warnings.warn(f"flat map at layer '{layer}' for {shown}: {cause}; {fix}", FlatMapWarning, stacklevel=3)


def later_layers(model: nn.Module, images: torch.Tensor, layer: str) -> list[str]:
    """The candidate breakpoints that end after `layer` on `images` (in that order), with a grid of
    at least 2 x 2."""
    inner, _ = unwrap(model)
    name, _ = resolve_layer(inner, layer)
    found = map_layers(inner, images)
    names = [n for n, _ in found]
    if name not in names:
        return []
    return [n for n, shapes in found[names.index(name) + 1 :] if min(shapes[0][1:]) >= 2][:_CANDIDATES]



@contextmanager
def unwarned() -> Iterator[None]:
    """explain calls inside neither warn of flat maps nor search for a layer that works (a search
    runs the model on up to _CANDIDATES layers): for trials whose maps nobody looks at."""
    token = _searching.set(True)
    try:
        yield
    finally:
        _searching.reset(token)


def quiet_trial(trial: Callable[[], T]) -> Optional[T]:
    """A trial explanation (a step of explain at some layer, to see whether its map is flat) that
    warns of nothing and searches no further; None when the layer cannot be explained."""
    with unwarned():
        try:
            return trial()
        except (ValueError, TypeError, RuntimeError):
            return None
