"""What the commands share: the one-line error, the progress bar, models, images and explain's options.

The commands (caffast.apps.cli) and dataset runs (caffast.apps.runner) both build on this module,
and neither imports the other.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from ..models.zoo import build_model, timm_default_layer, timm_name
from .imagefiles import IMAGENET, ImageReadError, read_image

DEFAULT_LAYERS = {"resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4", "googlenet": "inception5b",
                  "inception_v3": "Mixed_7c", "densenet": "features", "mobilenet": "features", "efficientnet": "features",
                  "vgg": "features", "regnet": "trunk_output", "shufflenet": "conv5", "mnasnet": "layers"}


class CliError(Exception):
    """A problem with the command's input: printed as one line, exit code 2."""


def show_progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def load_image(path: str, size: int = 224) -> tuple[np.ndarray, torch.Tensor]:
    """The reference's preprocessing: shorter side to 256, centre crop 224, ImageNet normalization.
    Returns the crop as an (H, W, 3) float array in [0, 1] and the normalized (3, H, W) tensor."""
    try:
        return read_image(path, replace(IMAGENET, size=size))
    except ImageReadError as error:
        raise CliError(str(error)) from None


def default_layer(arch: str) -> str:
    for family, layer in DEFAULT_LAYERS.items():
        if arch.startswith(family) and timm_name(arch) is None:
            return layer
    layer = timm_default_layer(arch)
    if layer is not None:
        return layer
    raise CliError(f"no default breakpoint for {arch!r}: pass --layer (a dotted module name)")


def class_names(arch: str, classes: int) -> list[str]:
    """ImageNet category names for 1000-class torchvision models (offline, from torchvision's metadata)."""
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"]
    except (ValueError, KeyError, AttributeError):
        categories = []
    return list(categories) if len(categories) == classes else [str(k) for k in range(classes)]


def load_model(arch: str, weights: Optional[str], device: str) -> torch.nn.Module:
    try:
        return build_model(arch, None if weights == "random" else weights).to(device)
    except FileNotFoundError as error:
        raise CliError(f"{error} (or pass --weights random for an untrained model)") from None
    except ValueError as error:
        raise CliError(str(error)) from None


def parse_classes(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"classes must be comma-separated integers, e.g. 207,323; got {text!r}") from None


def explain_options(args: argparse.Namespace) -> dict:
    """caffast.explain's keyword arguments that shape the results, from the command's flags.

    The one place they are built: an option added here reaches every command, and `caffast run`'s
    config.json (which refuses to mix results of different values).  The backend is not among them:
    every backend gives the same results.
    """
    return {"mode": args.mode, "targets": parse_classes(getattr(args, "classes", None)), "max_iter": args.max_iter,
            "lr": args.lr, "min_error": args.min_error, "map": args.map, "solver": args.solver}
