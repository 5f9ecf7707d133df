"""Grad-CAM (Selvaraju et al., 2017) at a breakpoint: the baseline L2-CAF is compared with."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..engine.inputs import Targets, check_images, model_device, resolve_targets
from ..core.guard import frozen
from ..core.breakpoints import Layer, check_capture, resolve_layer


class GradCamResult(NamedTuple):
    maps: torch.Tensor  # (N, T, H, W) at the breakpoint's resolution ((N, T, D, H, W) for 3-D maps)
    output: torch.Tensor  # the model output


def grad_cam(model: nn.Module, images: torch.Tensor, layer: Layer, targets: Targets = None) -> GradCamResult:
    """Grad-CAM maps, one per (image, target): targets as in caffast.explain(mode="specific").

    One forward pass; one backward pass per target column.  The breakpoint's output is cut from the
    graph before it (a leaf that requires grad), so no parameter gradient is ever computed.
    """
    images = check_images(images)
    name, module = resolve_layer(model, layer)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cut(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        # the rest of the network runs on a copy of the leaf, so that an in-place op after the
        # breakpoint (densenet's ReLU) changes the copy, as it changes the activations a hook sees
        leaf = output.detach().requires_grad_(True)
        passed = leaf.clone()
        captured.append((leaf, passed))
        return passed

    with frozen(model), torch.enable_grad():
        handle = module.register_forward_hook(cut)
        try:
            output = model(images.to(model_device(model)))
        finally:
            handle.remove()
        check_capture(name, captured[0][0] if len(captured) == 1 else None, output)
        if captured[0][0].dim() not in (4, 5):
            raise ValueError(
                f"layer {name!r} outputs {tuple(captured[0][0].shape)}; the Grad-CAM baseline needs a 4-D "
                "(N, C, H, W) feature map, or a 5-D (N, C, D, H, W) one on clips and volumes: pick a "
                "convolutional layer or block"
            )
        targets = resolve_targets("specific", targets, output.detach())
        leaf, activations = captured[0][0], captured[0][1].detach()
        maps = []
        for column in range(targets.shape[1]):
            score = output.gather(1, targets[:, column : column + 1]).sum()
            (grad,) = torch.autograd.grad(score, leaf, retain_graph=column + 1 < targets.shape[1])
            weights = grad.mean(dim=tuple(range(2, grad.dim())), keepdim=True)
            maps.append(torch.relu((weights * activations).sum(dim=1)).detach())
    return GradCamResult(torch.stack(maps, dim=1), output.detach())
