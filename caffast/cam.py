"""A CAM-style front end, for tools built around pytorch-grad-cam's interface.

    with caffast.cam.L2CAF(model, target_layers=[model.layer4]) as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])

returns float32 numpy maps (N, H, W) in [0, 1] at the input's size.  `GradCAM` has the same interface
and is the baseline.  Neither leaves a hook on the model between calls.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .engine.explain import explain, upsample_maps
from .eval.gradcam import grad_cam


def _as_class(target: Any) -> int:
    """An int, or an object with a `category` (pytorch-grad-cam's ClassifierOutputTarget)."""
    if isinstance(target, (int, np.integer)):
        return int(target)
    category = getattr(target, "category", None)
    if isinstance(category, (int, np.integer)):
        return int(category)
    raise TypeError(
        f"a target must be a class index or have an integer `category` attribute "
        f"(like ClassifierOutputTarget); got {type(target).__name__}"
    )


class _CAM:
    """Shared by the methods: targets, the context manager, and maps averaged over target layers."""

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module]):
        if not target_layers:
            raise ValueError("target_layers is empty; pass the layers to explain, e.g. [model.layer4]")
        self.model = model
        self.target_layers = list(target_layers)
        self.outputs: Optional[torch.Tensor] = None

    def __enter__(self) -> "_CAM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """No hook outlives a call; kept for pytorch-grad-cam's interface."""

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Any]] = None) -> np.ndarray:
        classes = None
        if targets is not None:
            if len(targets) != input_tensor.shape[0]:
                raise ValueError(f"{len(targets)} targets for {input_tensor.shape[0]} images; pass one per image")
            classes = torch.tensor([[_as_class(t)] for t in targets], dtype=torch.long)
        size = tuple(input_tensor.shape[-2:])
        per_layer = [upsample_maps(self.maps(input_tensor, layer, classes), size)[:, 0] for layer in self.target_layers]
        mean = torch.stack(per_layer).mean(dim=0)
        return upsample_maps(mean[:, None], size)[:, 0].detach().float().cpu().numpy()

    def maps(self, images: torch.Tensor, layer: nn.Module, classes: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, 1, h, w) maps at the layer's resolution."""
        raise NotImplementedError


class L2CAF(_CAM):
    """L2-CAF maps; `explain_options` go to caffast.explain (mode, max_iter, lr, backend, ...).

    The default is class-specific for the given targets (the top-1 class when None), as a
    class-discriminative CAM method would be.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], mode: str = "specific", **explain_options: Any):
        super().__init__(model, target_layers)
        self.mode = mode
        self.explain_options = explain_options

    def maps(self, images: torch.Tensor, layer: nn.Module, classes: Optional[torch.Tensor]) -> torch.Tensor:
        targets = classes if self.mode == "specific" else None
        result = explain(self.model, images, layer, mode=self.mode, targets=targets, **self.explain_options)
        self.outputs = result.output
        return result.maps


class GradCAM(_CAM):
    """Grad-CAM maps, the baseline, with the same interface."""

    def maps(self, images: torch.Tensor, layer: nn.Module, classes: Optional[torch.Tensor]) -> torch.Tensor:
        result = grad_cam(self.model, images, layer, classes)
        self.outputs = result.output
        return result.maps
