"""Breakpoints: cut a model at a layer, capture its feature map A and output NT, and build the tail.

The tail is the computation from the breakpoint's output to the model's output.  It is extracted with
torch.fx: the nodes that depend on the breakpoint are copied into a graph of their own, and values the
tail needs from before the breakpoint (a residual connection crossing it, say) are captured once per
image and handed to it.  A model that fx cannot trace gets a tail that reruns the whole model with a
forward hook substituting the filtered map for the layer's output.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as module_hooks

Layer = Union[str, nn.Module]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def hooks_of(module: nn.Module) -> tuple[int, ...]:
    """The handles of the hooks that run when `module` is called (forward, forward-pre, backward)."""
    return tuple(key for name in _HOOK_DICTS for key in getattr(module, name, {}))


def global_hooks() -> bool:
    """Whether module hooks registered for every module (register_module_forward_hook, ...) exist."""
    return any(getattr(module_hooks, f"_global{name}", None) for name in _HOOK_DICTS)


def resolve_layer(model: nn.Module, layer: Layer) -> tuple[str, nn.Module]:
    """The dotted name and the module of a breakpoint given by either."""
    named = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in named.items():
            if module is layer:
                return name, module
        raise ValueError(
            f"the layer module {type(layer).__name__} is not part of the model; pass a submodule of it "
            "or its dotted name (see model.named_modules())"
        )
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module name or a module, not {type(layer).__name__}")
    if layer not in named or layer == "":
        nearest = difflib.get_close_matches(layer, [n for n in named if n], n=5, cutoff=0.0)
        raise ValueError(
            f"no layer named {layer!r} in {type(model).__name__}; nearest names: {', '.join(nearest)}"
        )
    return layer, named[layer]


@dataclass
class Capture:
    """The unfiltered forward: the breakpoint's feature map and the model's output."""

    features: torch.Tensor
    output: torch.Tensor


class Tail:
    """The network from the breakpoint to the output, run on filtered feature maps."""

    kind: str

    def __call__(self, filtered: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """`filtered` (P, C, H, W) comes from images `image_index` (P,); returns the output (P, ...)."""
        raise NotImplementedError


def _kind_of(value: Any) -> str:
    for kind in (dict, tuple, list):
        if isinstance(value, kind):
            return kind.__name__
    return type(value).__name__


def check_capture(name: str, features: Any, output: Any) -> Capture:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"layer {name!r} outputs {shape}; L2-CAF needs a 4-D (N, C, H, W) feature map: pick a "
            "convolutional layer or block"
        )
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"the model returns a {_kind_of(output)}; L2-CAF needs a tensor output: wrap the model "
            "so that it returns the logits or the embedding"
        )
    if not torch.isfinite(features).all():
        raise ValueError(
            f"the feature map of layer {name!r} holds NaN or Inf; check the input images and the weights"
        )
    if not torch.isfinite(output).all():
        raise ValueError("the model output holds NaN or Inf; check the input images and the weights")
    return Capture(features=features.detach(), output=output.detach())


class HookTail(Tail):
    """Reruns the whole model with a forward hook that substitutes the filtered map."""

    kind = "hook"

    def __init__(self, model: nn.Module, module: nn.Module, images: torch.Tensor):
        self.model = model
        self.module = module
        self.images = images

    def __call__(self, filtered: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        handle = self.module.register_forward_hook(lambda _module, _inputs, _output: filtered)
        try:
            return self.model(self.images.index_select(0, image_index))
        finally:
            handle.remove()


_TOO_SMALL = ("can't be greater than actual input size", "output size is too small", "shapes cannot be multiplied")


def _misfit(model: nn.Module, images: torch.Tensor, error: BaseException) -> Optional[str]:
    """What about the images makes the model's forward fail, and the fix; None when it is not them."""
    convolution = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = images.shape[1]
    if convolution is not None and convolution.in_channels != channels:
        wanted = convolution.in_channels
        grayscale = channels == 1 and wanted == 3
        fix = "repeat the grayscale channel with images.expand(-1, 3, -1, -1)" if grayscale else f"pass {wanted}-channel images"
        return f"the model's first convolution takes {wanted} channels, the images have {channels}: {fix}"
    weight = next((p for p in model.parameters() if p.dtype.is_floating_point), None)
    if weight is not None and weight.dtype != images.dtype:
        return f"the images are {images.dtype}, the model's weights {weight.dtype}: convert them with images.to({weight.dtype})"
    if any(pattern in str(error).lower() for pattern in _TOO_SMALL):
        height, width = images.shape[2:]
        return (
            f"the images ({height} x {width}) are too small for the network, or not the size it was built for: "
            "pass images of the size it takes (224 x 224 for ImageNet models)"
        )
    return None


def unfiltered_forward(model: nn.Module, images: torch.Tensor) -> Any:
    """model(images) without gradients.  When the model fails because of the images (channels, dtype,
    size), its error is re-raised as a ValueError that names the images' shape and the fix."""
    try:
        with torch.no_grad():
            return model(images)
    except Exception as error:
        misfit = _misfit(model, images, error)
        if misfit is None:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"the model cannot run on images of shape {tuple(images.shape)}: {misfit} (the model's error: {message})"
        ) from error


def capture_with_hook(model: nn.Module, name: str, module: nn.Module, images: torch.Tensor) -> Capture:
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    try:
        output = unfiltered_forward(model, images)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(
            f"layer {name!r} runs {len(seen)} times in one forward pass; pick a layer that runs exactly once"
        )
    return check_capture(name, seen[0], output)


class FxTail(Tail):
    """The tail as its own fx graph: (filtered, *captured values) -> output."""

    kind = "fx"

    def __init__(self, graph_module: fx.GraphModule, captured: list[torch.Tensor]):
        self.graph_module = graph_module
        self.captured = captured

    def __call__(self, filtered: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        return self.graph_module(filtered, *(value.index_select(0, image_index) for value in self.captured))


class _BreakpointTracer(fx.Tracer):
    """Keeps the breakpoint as one opaque call, so that its output is one node of the graph, and so
    every module with hooks: traced through, its hooks would run once on proxies and never again."""

    def __init__(self, breakpoint: nn.Module):
        super().__init__()
        self.breakpoint = breakpoint

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        hooked = bool(hooks_of(module))
        return module is self.breakpoint or hooked or super().is_leaf_module(module, qualified_name)


class _Untraceable(Exception):
    pass


def _descendants(graph: fx.Graph, roots: set[fx.Node]) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node in roots or any(arg in found or arg in roots for arg in node.all_input_nodes):
            found.add(node)
    return found - roots


def _trace(model: nn.Module, name: str, module: nn.Module) -> tuple[fx.GraphModule, fx.Node]:
    try:
        graph = _BreakpointTracer(module).trace(model)
    except Exception as error:  # any failure to trace means: use the hook tail
        raise _Untraceable(f"torch.fx could not trace the model: {error}") from error
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise _Untraceable(f"layer {name!r} appears {len(calls)} times in the traced graph")
    return fx.GraphModule(model, graph), calls[0]


def _tail_graph(root: fx.GraphModule, breakpoint: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Copy the nodes that depend on the breakpoint; what they need from before it becomes an input."""
    graph = root.graph
    inputs = {n for n in graph.nodes if n.op == "placeholder"}
    depends_on_input = _descendants(graph, inputs) | inputs
    after_breakpoint = _descendants(graph, {breakpoint})

    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {breakpoint: tail.placeholder("feature")}
    needed = [
        arg
        for node in graph.nodes
        if node in after_breakpoint
        for arg in node.all_input_nodes
        if arg in depends_on_input and arg is not breakpoint and arg not in after_breakpoint
    ]
    captured = list(dict.fromkeys(needed))
    for index, node in enumerate(captured):
        env[node] = tail.placeholder(f"captured_{index}")
    for node in graph.nodes:
        if node.op == "output":
            if node not in after_breakpoint:
                raise ValueError("the model output does not depend on the chosen layer; pick a layer before the output")
            tail.output(fx.graph.map_arg(node.args[0], lambda n: env[n]))
        elif node not in depends_on_input or node in after_breakpoint:
            env[node] = tail.node_copy(node, lambda n: env[n])
    tail_module = fx.GraphModule(root, tail)
    tail_module.graph.eliminate_dead_code()
    tail_module.recompile()
    return tail_module, captured


def _capture_module(root: fx.GraphModule, breakpoint: fx.Node, captured: list[fx.Node]) -> fx.GraphModule:
    """The traced model, returning (breakpoint value, captured values, output) in one forward."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(root.graph, env)
    graph.output((env[breakpoint], tuple(env[node] for node in captured), output))
    return fx.GraphModule(root, graph)


@dataclass
class _Plan:
    """How to split one model at one layer: traced once, reused while the model's modules stay."""

    capture: fx.GraphModule
    tail: fx.GraphModule


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[int, ...], Optional[_Plan]]]]"
_PLANS = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, name: str, module: nn.Module) -> Optional[_Plan]:
    """The fx plan for `name`, or None when the model cannot be split with fx (use the hook tail).

    Tracing costs about as much as a forward pass, so plans are cached per model; the cache entry
    is dropped when any submodule of the model is replaced or a hook is added or removed.
    """
    signature = tuple((id(module), hooks_of(module)) for module in model.modules())
    plans = _PLANS.setdefault(model, {})
    if name in plans and plans[name][0] == signature:
        return plans[name][1]
    try:
        root, breakpoint = _trace(model, name, module)
        tail_module, captured = _tail_graph(root, breakpoint)
        plan: Optional[_Plan] = _Plan(_capture_module(root, breakpoint, captured), tail_module)
    except _Untraceable:
        plan = None
    plans[name] = (signature, plan)
    return plan


def _fx_split(plan: _Plan, name: str, images: torch.Tensor) -> tuple[Capture, FxTail]:
    features, captured, output = unfiltered_forward(plan.capture, images)
    capture = check_capture(name, features, output)
    batch = images.shape[0]
    for value in captured:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            raise _Untraceable("the tail needs a value from before the layer that is not a per-image tensor")
    tail = FxTail(plan.tail, [value.detach() for value in captured])
    with torch.no_grad():
        replay = tail(capture.features.clone(), torch.arange(batch, device=images.device))
    scale = capture.output.abs().max().clamp_min(1.0)
    if replay.shape != capture.output.shape or (replay - capture.output).abs().max() > 1e-4 * scale:
        raise _Untraceable("the extracted tail does not reproduce the model output")
    return capture, tail


def split(model: nn.Module, layer: Layer, images: torch.Tensor) -> tuple[Capture, Tail]:
    """Capture A and NT for `images` and build the tail after `layer` (an fx graph when possible)."""
    name, module = resolve_layer(model, layer)
    plan = None if hooks_of(model) or global_hooks() else _plan(model, name, module)
    if plan is not None:
        try:
            return _fx_split(plan, name, images)
        except _Untraceable:
            pass
    return capture_with_hook(model, name, module, images), HookTail(model, module, images)

