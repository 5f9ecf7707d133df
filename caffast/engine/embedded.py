"""What the front ends (caffast.cam, caffast.captum, caffast.quantus) share: explain's keywords
read as its Settings, the adapters' optional library checked with the extra that installs it, and
autograd where the caller turned it off."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from ..core.settings import SETTING_NAMES, Settings


def settings_and_others(keywords: Mapping[str, Any], **defaults: Any) -> tuple[Settings, dict[str, Any]]:
    """explain's `keywords` as its Settings (the caller's over the front end's `defaults`), checked
    here, and the keywords that are not settings (layout, objective, ...), which go to explain beside
    them."""
    named = {name: value for name, value in keywords.items() if name in SETTING_NAMES}
    others = {name: value for name, value in keywords.items() if name not in SETTING_NAMES}
    return Settings(**{**defaults, **named}), others


def require(library: str, extra: str) -> None:
    """An ImportError naming the extra to install when `library` is not installed."""
    try:
        found = importlib.util.find_spec(library) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(
            f"caffast.{extra} needs {library}, which is not installed: pip install \"caffast[{extra}]\"",
            name=library,
        )


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd for the duration, also inside torch.inference_mode() or torch.no_grad(): the
    libraries call attribution methods from evaluation code that often runs under either, and
    L2-CAF differentiates the network's tail with respect to its filter."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def outside_inference(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may save: a copy of one made under torch.inference_mode(), else itself.
    Call it inside autograd_on()."""
    return tensor.clone() if tensor.is_inference() else tensor
