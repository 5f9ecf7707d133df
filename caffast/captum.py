"""L2-CAF as a Captum layer attribution, so that code built on Captum takes it as it takes LayerGradCam:

    from caffast.captum import LayerL2CAF

    l2caf = LayerL2CAF(model, model.layer4)
    maps = l2caf.attribute(images, target=labels, solver="fast")        # (N, 1, h, w), layer-shaped
    heat = LayerL2CAF.interpolate(maps, images.shape[-2:], "bilinear")  # at the input's size

`target` means what it means to Captum (one output index per input, or one for all of them): the
filter raises that output (`loss="logit"`, as Captum's attributions differentiate it; pass `loss=`
for another); `target=None` gives the class-oblivious map.  Every other keyword is caffast.explain's,
with its defaults, and the maps equal explain's with the same settings.
"""

from __future__ import annotations

from .engine.embedded import require

require("captum", "captum")

from typing import Any, Callable, Optional, Sequence, Union  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from captum.attr import LayerAttribution  # noqa: E402

from .core.breakpoints import resolve_layer, unwrap  # noqa: E402
from .engine.embedded import autograd_on, outside_inference, settings_and_others  # noqa: E402
from .engine.explain import explain  # noqa: E402

Inputs = Union[torch.Tensor, np.ndarray, Sequence[torch.Tensor]]
CaptumTarget = Union[None, int, tuple, torch.Tensor, Sequence[Union[int, tuple]]]

__all__ = ["LayerL2CAF"]


class OutputAt:
    """Captum's tuple target for outputs of more than two dimensions: one image's output at `index`."""

    def __init__(self, index: tuple):
        self.index = tuple(int(i) for i in index)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[self.index]

    def __repr__(self) -> str:
        return f"OutputAt({self.index})"


def _index(value: Any) -> int:
    """One output index: an int, a numpy integer, or a one-element integer tensor or array."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and _single(value):
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"a target must be an output index (an integer) or a tuple of them, got {value!r}")
    return int(value)


def _single(target: Union[torch.Tensor, np.ndarray]) -> bool:
    return (target.size if isinstance(target, np.ndarray) else target.numel()) == 1


def per_image_targets(target: CaptumTarget, batch: int) -> list[list[Any]]:
    """Captum's target as explain's per-image lists: an int (or a one-element tensor) or a tuple is the
    target of every input; a list or a 1-D tensor of N holds one per input."""
    if isinstance(target, (torch.Tensor, np.ndarray)):
        if _single(target):
            return [[_index(target)]] * batch
        if target.ndim != 1:
            raise ValueError(
                f"target is a tensor of shape {tuple(target.shape)}; pass an int, or a 1-D tensor of one index per "
                "input (a list of tuples for outputs of more than two dimensions)"
            )
        target = target.tolist()
    if isinstance(target, tuple):
        return [[OutputAt(target)]] * batch
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(
                f"target holds {len(target)} entries for {batch} inputs: Captum's list gives one target per input "
                f"(for several classes of every input, call attribute once per class)"
            )
        return [[OutputAt(t) if isinstance(t, tuple) else _index(t)] for t in target]
    return [[_index(target)]] * batch


def _owner(forward_func: Callable, layer: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The module whose forward `forward_func` runs: the function itself, the module of a bound method,
    or a module holding `layer` that a plain function names (a closure or a global, `lambda x: model(x)`)."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    code = getattr(forward_func, "__code__", None)
    named = [cell.cell_contents for cell in getattr(forward_func, "__closure__", None) or () if _filled(cell)]
    if code is not None:
        scope = getattr(forward_func, "__globals__", {})
        named += [scope[name] for name in code.co_names if name in scope]
    holders = (value for value in named if isinstance(value, nn.Module))
    return next((module for module in holders if any(m is layer for m in module.modules())), None)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


class CaptumForward(nn.Module):
    """Captum's forward function as the one-tensor model explain takes.

    The images are input `position`; the other inputs and the additional forward arguments ride
    along.  Those with a row per example are picked for each row of the images explain passes in (it
    repeats an image once per target, and reruns single images), by the row index the images carry
    in one extra channel when `carries_rows`.  The model is a submodule, so that explain finds the
    layer in it and hands it back unchanged; a bare function's layer is registered alone."""

    def __init__(self, forward_func: Callable, owner: Optional[nn.Module], layer: nn.Module, position: int,
                 inputs: tuple, arguments: tuple, carries_rows: bool):  # fmt: skip
        super().__init__()
        self.function = None if forward_func is owner else forward_func
        if owner is not None:
            # the model itself runs without its DataParallel or torch.compile wrapper, as explain runs it
            self.model = unwrap(owner)[0] if self.function is None else owner
        else:
            self.layer = layer
        self.position = position
        self.others = inputs
        self.arguments = arguments
        self.batch = inputs[position].shape[0]
        self.carries_rows = carries_rows

    def forward(self, images: torch.Tensor) -> Any:
        others, arguments = list(self.others), list(self.arguments)
        if self.carries_rows:
            rows = images[:, -1, 0, 0].round().long()
            images = images[:, :-1]
            others = [value.index_select(0, rows) if _per_row(value, self.batch) else value for value in others]
            arguments = [value.index_select(0, rows) if _per_row(value, self.batch) else value for value in arguments]
        others[self.position] = images
        run = self.model if self.function is None else self.function
        return run(*others, *arguments)


def _per_row(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _as_inputs(inputs: Inputs) -> tuple:
    if isinstance(inputs, np.ndarray):
        return (torch.from_numpy(inputs),)
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"inputs must be a tensor or a tuple of tensors with one row per example, not {type(inputs).__name__}")


def _image_position(inputs: tuple) -> int:
    """The input that holds the images: the first floating-point (N, C, H, W) tensor."""
    for position, tensor in enumerate(inputs):
        if tensor.dim() == 4 and tensor.is_floating_point():
            return position
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
    raise ValueError(
        f"L2-CAF explains images, and no input is a floating-point (N, C, H, W) tensor ({shapes}): pass the "
        "images as one of the inputs (e.g. images.unsqueeze(0) for a single image, images.float() for integers)"
    )


def _with_rows(images: torch.Tensor) -> torch.Tensor:
    """The images with one more channel holding each row's index."""
    batch, _, height, width = images.shape
    exact = round(2 / torch.finfo(images.dtype).eps)  # integers up to 2**(mantissa bits + 1) are exact
    if batch > exact:
        raise ValueError(
            f"{batch} {images.dtype} inputs with per-input arguments: their row numbers are not exact in "
            f"{images.dtype}; pass at most {exact} at a time, or the inputs in float32"
        )
    rows = torch.arange(batch, device=images.device, dtype=images.dtype)
    return torch.cat([images, rows.view(batch, 1, 1, 1).expand(batch, 1, height, width)], dim=1)


class LayerL2CAF(LayerAttribution):
    """L2-CAF's attention map at a layer's output, constructed and called as Captum's LayerGradCam.

    `forward_func` is the model or any function of the inputs that runs it; `layer` the module (or,
    for a model, its dotted name) whose output is filtered.  `device_ids` is accepted as Captum's
    layer methods take it: a DataParallel model is explained through its inner module.
    """

    def __init__(self, forward_func: Callable, layer: Union[nn.Module, str], device_ids: Optional[list[int]] = None):
        if not callable(forward_func):
            raise TypeError(f"forward_func must be the model or a function that runs it, not {type(forward_func).__name__}")
        owner = _owner(forward_func)
        if isinstance(layer, str):
            if owner is None:
                raise TypeError(f"layer {layer!r} is a name, and forward_func is not a module to look it up in: pass the layer module")
            layer = resolve_layer(owner, layer)[1]
        elif isinstance(layer, (list, tuple)):
            raise TypeError("LayerL2CAF explains one layer; pass one module (one LayerL2CAF per layer for several)")
        elif not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a module of the model or its dotted name, not {type(layer).__name__}")
        if owner is not None and all(module is not layer for module in owner.modules()):
            raise ValueError(f"the layer {type(layer).__name__} is not a module of {type(owner).__name__}; pass one of its submodules")
        owner = owner or _owner(forward_func, layer)
        super().__init__(forward_func, layer, device_ids)
        self.owner = owner

    def attribute(
        self,
        inputs: Inputs,
        target: CaptumTarget = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        **settings: Any,
    ) -> torch.Tensor:
        """(N, 1, h, w) maps at the layer, on the inputs' device: one caffast.explain call for the batch.

        `inputs`: a tensor or a tuple of tensors, one row per example; the images are the first
        floating-point (N, C, H, W) one.  `target`: Captum's (None for the class-oblivious map).
        `settings`: caffast.explain's keywords (solver, max_iter, loss, map, ...).
        """
        if attribute_to_layer_input:
            raise ValueError(
                "L2-CAF filters a layer's output; attribute_to_layer_input=True is not available: pass the module "
                "whose output feeds this layer as the layer instead"
            )
        for name in ("targets", "layer", "device"):
            if name in settings:
                fix = {"targets": "pass target= (Captum's: one per input)", "layer": "the layer is given to LayerL2CAF",
                       "device": "the maps come back on the inputs' device, and explain runs where the model is"}[name]  # fmt: skip
                raise TypeError(f"attribute() takes no {name}= keyword: {fix}")
        inputs = _as_inputs(inputs)
        if additional_forward_args is None:
            arguments: tuple = ()
        elif isinstance(additional_forward_args, tuple):
            arguments = additional_forward_args
        else:
            arguments = (additional_forward_args,)
        position = _image_position(inputs)
        batch = inputs[position].shape[0]
        if any(t.shape[0] != batch for t in inputs):
            raise ValueError(f"the inputs have {[t.shape[0] for t in inputs]} rows; each must have one per example")
        targets = None if target is None else per_image_targets(target, batch)
        defaults = {} if target is None else {"mode": "specific", "loss": "logit"}
        chosen, others = settings_and_others(settings, **defaults)
        with autograd_on():
            inputs = tuple(outside_inference(t) for t in inputs)
            arguments = tuple(outside_inference(a) if isinstance(a, torch.Tensor) else a for a in arguments)
            riders = [t for i, t in enumerate(inputs) if i != position] + list(arguments)
            carries_rows = any(_per_row(value, batch) for value in riders)
            images = inputs[position].detach()
            model = CaptumForward(self.forward_func, self.owner, self.layer, position, inputs, arguments, carries_rows)
            explained = explain(model, _with_rows(images) if carries_rows else images, self.layer, targets, settings=chosen,
                                **others)  # fmt: skip
        return explained.maps.to(inputs[position].device)

