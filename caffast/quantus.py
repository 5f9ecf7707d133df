"""L2-CAF as a Quantus explanation function, so that Quantus's metrics evaluate it as they do Grad-CAM:

    import quantus
    from caffast.quantus import explain

    scores = quantus.PointingGame()(model=model, x_batch=x, y_batch=y, s_batch=masks,
                                    explain_func=explain, explain_func_kwargs={"layer": "layer4"})

`explain(model, inputs, targets, layer=..., **settings)` returns the class-specific maps of each
input's target at the input's size, (N, 1, H, W) float32 numpy.  `settings` are caffast.explain's
keywords, with its defaults.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .core.breakpoints import Layer
from .engine.embedded import autograd_on, outside_inference, require, settings_and_others
from .engine.explain import explain as explain_maps

require("quantus", "quantus")

__all__ = ["explain"]

Array = Union[np.ndarray, torch.Tensor]


def _model(model: Any) -> nn.Module:
    """The torch model, also when Quantus hands over its own wrapper (ModelInterface.get_model())."""
    if not isinstance(model, nn.Module) and callable(getattr(model, "get_model", None)):
        model = model.get_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"caffast.quantus.explain explains torch models (nn.Module), not {type(model).__name__}")
    return model


def _images(inputs: Array, model: nn.Module) -> torch.Tensor:
    """Quantus's channel-first batch as a tensor in the model's floating-point dtype."""
    images = torch.as_tensor(np.asarray(inputs)) if not isinstance(inputs, torch.Tensor) else inputs
    if images.dim() != 4:
        raise ValueError(
            f"inputs have shape {tuple(images.shape)}; caffast.quantus.explain takes a channel-first batch of "
            "images (N, C, H, W)"
        )
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return images.detach().to(weight.dtype if weight is not None else torch.float32)


def explain(
    model: Any,
    inputs: Array,
    targets: Optional[Union[Array, int, list[int]]],
    *,
    layer: Optional[Layer] = None,
    device: Optional[Union[str, torch.device]] = None,
    **settings: Any,
) -> np.ndarray:
    """(N, 1, H, W) float32 maps in [0, 1] at the inputs' size: one caffast.explain call for the batch.

    `targets`: one class per input (Quantus's y_batch), or None for the class-oblivious map.
    `layer`: the breakpoint, by dotted name or module (pass it in explain_func_kwargs).  `device`,
    which Quantus's metrics pass, is accepted and not needed: explain runs where the model is.
    """
    if layer is None:
        raise ValueError(
            "caffast.quantus.explain needs the breakpoint layer: pass explain_func_kwargs={'layer': 'layer4'} "
            "(a dotted module name or the module)"
        )
    if "targets" in settings or "mode" in settings:
        raise TypeError("the targets are Quantus's y_batch, one class per input: do not pass targets= or mode=")
    chosen, others = settings_and_others(settings, mode="oblivious" if targets is None else "specific")
    model = _model(model)
    with autograd_on():
        images = outside_inference(_images(inputs, model))
        rows = None
        if targets is not None:
            labels = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
            labels = np.broadcast_to(labels, (len(images),)) if labels.ndim == 0 else labels
            if labels.shape != (len(images),):
                raise ValueError(f"targets have shape {labels.shape}; pass one class per input, shape ({len(images)},)")
            rows = [[label] for label in labels]
        explained = explain_maps(model, images, layer, rows, settings=chosen, **others)
    return explained.upsample(tuple(images.shape[-2:])).float().cpu().numpy()
