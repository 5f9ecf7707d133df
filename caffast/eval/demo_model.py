"""A small trained CNN for the procedural scenes of caffast.eval.scenes: a model to explain with no downloads.

Its head is fused (docs/design.md, 'The fused head': global average pool -> Linear), and its breakpoint
`features` ends in a ReLU with an 8 x 8 map at 64 x 64 input, so both the fused and the autograd
paths apply to it.  Inputs are scenes passed through caffast.eval.scenes.normalize.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scenes import CLASS_NAMES, NUM_CLASSES

WEIGHTS = "demo_cnn.pt"
WIDTHS = (16, 32, 64, 128)

__all__ = ["CLASS_NAMES", "DemoCNN", "load_demo_model"]


def _block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return layers + [nn.MaxPool2d(2)] if pool else layers


class DemoCNN(nn.Module):
    """Four conv-BN-ReLU blocks (the first three halve the grid: 64 -> 8), global average pool, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        channels = (3, *widths)
        last = len(widths) - 1
        self.features = nn.Sequential(
            *[layer for i in range(len(widths)) for layer in _block(channels[i], channels[i + 1], pool=i < last)]
        )
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def load_demo_model() -> nn.Module:
    """The trained DemoCNN in eval mode on the CPU (weights shipped in caffast/eval/assets)."""
    model = DemoCNN()
    with resources.as_file(resources.files("caffast.eval") / "assets" / WEIGHTS) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
