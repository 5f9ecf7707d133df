"""A model named as the commands name it, an architecture and its weights, with all that explaining
it takes: the module, its default breakpoint, its input, its class names, and what a dataset run
records of it."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn
import torchvision

from ..eval.demo_model import CLASS_NAMES as DEMO_CLASS_NAMES
from ..eval.demo_model import DemoCNN, load_demo_model
from .preprocessing import DEMO, IMAGENET, Preprocessing
from .zoo import (
    UnknownArchitecture, build_model, file_sha256, load_state_dict, timm_default_layer, timm_name, timm_num_classes,
    timm_preprocessing, weights_source,
)  # fmt: skip

DEMO_ARCH = "demo"  # the shipped demo CNN (caffast.eval.demo_model)
DEMO_LAYER = "features"
DEFAULT_WEIGHTS = "DEFAULT"
RANDOM_WEIGHTS = "random"
# ImageNet-1k's class names in the order of its class indices (offline, from torchvision's metadata)
IMAGENET_CATEGORIES = tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
# random weights are drawn from this seed, so that "random" names one model in every process and rerun
RANDOM_WEIGHTS_SEED = 0

# the last block of torchvision's families, by the prefix of their names
DEFAULT_LAYERS = {"resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4", "googlenet": "inception5b",
                  "inception_v3": "Mixed_7c", "densenet": "features", "mobilenet": "features", "efficientnet": "features",
                  "vgg": "features", "regnet": "trunk_output", "shufflenet": "conv5", "mnasnet": "layers"}

# how torch.load, torchvision and timm refuse weights: a missing or damaged file, a download that
# fails, an unsafe pickle, the state dict of another architecture
WEIGHTS_FAILURES = (ValueError, OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError, TypeError,
                    AttributeError)  # fmt: skip

Device = Union[str, torch.device]


class ModelSourceError(Exception):
    """A model that cannot be had as named: the message says why and what to pass instead."""


class WeightsError(ModelSourceError):
    """Weights that do not load into the architecture; `cause` is the loader's own error, which tells
    a refused pickle from a missing file or the state dict of another architecture."""

    def __init__(self, arch: str, weights: str, cause: BaseException) -> None:
        super().__init__(f"the weights {weights!r} do not load into {arch!r}: {cause}")
        self.arch = arch
        self.weights = weights
        self.cause = cause


@dataclass(frozen=True)
class ModelSource:
    """A model as the commands name it.

    arch: a torchvision classification architecture, a name only timm knows (with timm installed),
    or "demo" for the shipped demo CNN.  weights: "DEFAULT" (torchvision's or timm's default
    pretrained weights, the demo's shipped ones), torchvision weights ("IMAGENET1K_V1"), a timm
    pretrained tag ("a1_in1k"), a local state-dict file, or "random".
    """

    arch: str
    weights: str = DEFAULT_WEIGHTS

    @property
    def is_demo(self) -> bool:
        return self.arch == DEMO_ARCH

    def load(self, device: Device = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
        """The model in eval mode on `device` (and in `dtype` when given).  Named torchvision or timm
        weights missing from their cache are downloaded; cached ones are checked against their hash."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = self._load_demo() if self.is_demo else self._load_zoo()
        try:
            return model.to(device=device, dtype=dtype)
        except (RuntimeError, AssertionError) as error:
            raise ModelSourceError(f"cannot use device {device!r}: {error}") from None

    def _load_zoo(self) -> nn.Module:
        try:
            return build_model(self.arch, None if self.weights == RANDOM_WEIGHTS else self.weights)
        except UnknownArchitecture as error:
            raise ModelSourceError(str(error)) from None
        except WEIGHTS_FAILURES as error:
            raise WeightsError(self.arch, self.weights, error) from None

    def _load_demo(self) -> nn.Module:
        if self.weights == DEFAULT_WEIGHTS:
            return load_demo_model()
        model = DemoCNN()
        if self.weights != RANDOM_WEIGHTS:
            if not os.path.isfile(self.weights):
                raise ModelSourceError(
                    f"--arch demo takes --weights DEFAULT (the shipped weights), random, or a state-dict file; "
                    f"{self.weights!r} is none of these"
                )
            try:
                model.load_state_dict(load_state_dict(DEMO_ARCH, self.weights))
            except Exception as error:  # torch.load and load_state_dict raise many kinds
                raise WeightsError(DEMO_ARCH, self.weights, error) from None
        return model.eval()

    def default_layer(self) -> Optional[str]:
        """The breakpoint explain takes when none is named: the last block of torchvision's families,
        timm's last feature map (caffast.models.zoo.timm_default_layer), the demo's `features`; None
        for architectures without a rule."""
        if self.is_demo:
            return DEMO_LAYER
        for family, layer in DEFAULT_LAYERS.items():
            if self.arch.startswith(family) and timm_name(self.arch) is None:
                return layer
        return timm_default_layer(self.arch)

    def preprocessing(self) -> Preprocessing:
        """How images are prepared for the model: timm's models by their pretrained config (size,
        crop, resize filter, mean and std), torchvision's by the reference's ImageNet preprocessing,
        the demo as its scenes."""
        if self.is_demo:
            return DEMO
        config = timm_preprocessing(self.arch, None if self.weights == RANDOM_WEIGHTS else self.weights)
        if config is None:
            return IMAGENET
        _, height, width = config["input_size"]
        if height != width or config["crop_mode"] not in (None, "center"):
            raise ModelSourceError(
                f"timm's {self.arch!r} takes {height} x {width} inputs cropped by {config['crop_mode']!r}; caffast "
                "prepares square centre crops only: explain it through caffast.explain with your own preprocessing"
            )
        return replace(IMAGENET, size=height, crop_pct=config["crop_pct"], interpolation=config["interpolation"],
                       mean=tuple(config["mean"]), std=tuple(config["std"]))  # fmt: skip

    def class_names(self, classes: int) -> list[str]:
        """The names of the model's `classes` outputs: the demo's shapes, ImageNet's categories for
        1000-class torchvision models (offline, from torchvision's metadata), else their numbers."""
        categories = self._listed_class_names()
        return categories if len(categories) == classes else [str(k) for k in range(classes)]

    def class_name(self, index: int, classes: int) -> Optional[str]:
        """The name of class `index` of the model's `classes` outputs, as `class_names` has it; None
        where the classes have no names (a file name then holds the number alone)."""
        categories = self._listed_class_names()
        return categories[index] if len(categories) == classes and 0 <= index < classes else None

    def known_class_names(self) -> list[str]:
        """The class names the architecture is known to have, without loading it: those of
        `class_names`, and ImageNet's for timm's 1000-class models; empty where none are known."""
        listed = self._listed_class_names()
        if not listed and timm_num_classes(self.arch) == len(IMAGENET_CATEGORIES):  # timm's order is ImageNet's
            return list(IMAGENET_CATEGORIES)
        return listed

    def _listed_class_names(self) -> list[str]:
        if self.is_demo:
            return list(DEMO_CLASS_NAMES)
        try:
            return list(torchvision.models.get_model_weights(self.arch).DEFAULT.meta["categories"])
        except (ValueError, KeyError, AttributeError):
            return []

    def weights_identity(self) -> str:
        """What a run's results depend on, as its config.json records it: the content of a weights
        file (its sha256), else the weights' name."""
        return f"sha256:{file_sha256(self.weights)}" if os.path.isfile(self.weights) else self.weights

    def weights_origin(self) -> Optional[str]:
        """Where named weights come from today (caffast.models.zoo.weights_source); None for the demo,
        random weights and files."""
        return None if self.is_demo else weights_source(self.arch, self.weights)

    def explainable(
        self, layer: Optional[str] = None, device: Device = "cpu", dtype: Optional[torch.dtype] = None
    ) -> ExplainableModel:
        """The model loaded on `device`, with its breakpoint (`layer`, else the default) and its input."""
        model = self.load(device, dtype)
        layer = layer or self.default_layer()
        if layer is None:
            raise ModelSourceError(f"no default breakpoint for {self.arch!r}: pass --layer (a dotted module name)")
        return ExplainableModel(model, layer, self.preprocessing(), self)


@dataclass
class ExplainableModel:
    """A loaded model with the breakpoint it is explained at and the input it expects."""

    model: nn.Module
    layer: str
    preprocessing: Preprocessing
    source: ModelSource

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# the demo CNN with its shipped weights: a model to explain with no downloads
SHIPPED_DEMO = ModelSource(DEMO_ARCH, DEFAULT_WEIGHTS)
