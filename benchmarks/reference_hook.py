"""The reference loop restated at any breakpoint: a forward hook substitutes the filtered map and the
whole model reruns, one image and one class at a time (neither release can cut an arbitrary model)."""

from __future__ import annotations

import torch
import torch.nn as nn

from reference_fast import reference_fast_loop


def reference_hook_loop(model: nn.Module, image: torch.Tensor, layer: str, target=None, **loop) -> int:
    """image (1, 3, H, W); returns the optimizer steps taken."""
    module = model.get_submodule(layer)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: seen.append(output.detach()))
    try:
        with torch.no_grad():
            output = model(image)
    finally:
        handle.remove()
    features = seen[0]

    def rerun(filtered: torch.Tensor) -> torch.Tensor:
        substitute = module.register_forward_hook(lambda _m, _i, _o: filtered)
        try:
            return model(image)
        finally:
            substitute.remove()

    return reference_fast_loop(rerun, features, output, target, **loop)
