"""Breakpoints: cut a model at a layer, capture its feature map A and output NT, and build the tail.

The tail is the computation from the breakpoint's output to the model's output.  It is extracted with
torch.fx: the nodes that depend on the breakpoint are copied into a graph of their own, and values the
tail needs from before the breakpoint (a residual connection crossing it, say) are captured once per
image and handed to it.  A model that fx cannot trace gets a tail that reruns the whole model with a
forward hook substituting the filtered map for the layer's output.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as module_hooks

from .layouts import Layout, ReshapeTransform, resolve_layout
from .outputs import describe, leaves, map_tensors, normalize_output, primary_output, select_rows

Layer = Union[str, nn.Module]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def hooks_of(module: nn.Module) -> tuple[int, ...]:
    """The handles of the hooks that run when `module` is called (forward, forward-pre, backward)."""
    return tuple(key for name in _HOOK_DICTS for key in getattr(module, name, {}))


def global_hooks() -> bool:
    """Whether module hooks registered for every module (register_module_forward_hook, ...) exist."""
    return any(getattr(module_hooks, f"_global{name}", None) for name in _HOOK_DICTS)


def map_layers(model: nn.Module, images: torch.Tensor) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The candidate breakpoints: every named module whose output is a 4-D map (5-D on clips and
    volumes), in the order their calls end on `images`, each with the (C, H, W) (or (C, D, H, W)) of
    every call (a reused module, such as a ResNet block's ReLU, runs more than once).  The hooks are
    removed again, also on an error."""
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == images.dim():
                shapes.setdefault(name, []).append(tuple(output.shape[1:]))

        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return list(shapes.items())


class SlowTailWarning(UserWarning):
    """The tail reruns the whole model in every evaluation (torch.fx could not split it)."""


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model inside DataParallel, DistributedDataParallel and torch.compile wrappers, and the
    attribute names passed through ("module", "_orig_mod")."""
    passed = []
    while True:
        if isinstance(model, _WRAPPERS):
            model, attribute = model.module, "module"
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model, attribute = model._orig_mod, "_orig_mod"
        else:
            return model, passed
        passed.append(attribute)


def _inner_name(layer: str, passed: list[str]) -> str:
    """A layer name given from outside the wrappers ("module.layer4") as the inner model's ("layer4")."""
    for attribute in passed:
        if layer.startswith(attribute + "."):
            layer = layer[len(attribute) + 1 :]
    return layer


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
    output: Any
    layout: Optional[Layout] = None


class Tail:
    """The network from the breakpoint to the output, run on filtered feature maps."""

    kind: str

    def __call__(self, filtered: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """`filtered` (P, C, *grid) comes from images `image_index` (P,); returns the output (P, ...)."""
        raise NotImplementedError


def _kind_of(value: Any) -> str:
    for kind in (dict, tuple, list):
        if isinstance(value, kind):
            return kind.__name__
    return type(value).__name__


def check_capture(name: str, features: Any, output: Any) -> Capture:
    if not isinstance(features, torch.Tensor):
        raise ValueError(
            f"layer {name!r} outputs a {_kind_of(features)}; L2-CAF needs a tensor feature map: pick a "
            "convolutional or transformer block"
        )
    raw, output = output, normalize_output(output)
    tensors = leaves(output)
    batch = features.shape[0] if features.dim() else 0
    if not tensors or any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        raise ValueError(
            f"the model returns {describe(raw)}; L2-CAF needs tensors with one row per image (a tensor, "
            "a dict or tuple of them, or an object with .logits): wrap the model to return those"
        )
    if not torch.isfinite(features).all():
        raise ValueError(
            f"the feature map of layer {name!r} holds NaN or Inf; check the input images and the weights"
        )
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise ValueError("the model output holds NaN or Inf; check the input images and the weights")
    return Capture(features=features.detach(), output=map_tensors(torch.Tensor.detach, output))


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
            return normalize_output(self.model(self.images.index_select(0, image_index)))
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
        spread = ", -1" * (images.dim() - 2)
        fix = f"repeat the grayscale channel with images.expand(-1, 3{spread})" if grayscale else (
            f"pass {wanted}-channel images")  # fmt: skip
        return f"the model's first convolution takes {wanted} channels, the images have {channels}: {fix}"
    weight = next((p for p in model.parameters() if p.dtype.is_floating_point), None)
    if weight is not None and weight.dtype != images.dtype:
        return f"the images are {images.dtype}, the model's weights {weight.dtype}: convert them with images.to({weight.dtype})"
    if any(pattern in str(error).lower() for pattern in _TOO_SMALL):
        size = " x ".join(map(str, images.shape[2:]))
        usual = "224 x 224 for ImageNet models" if images.dim() == 4 else "16 x 112 x 112 for torchvision's video models"
        return (
            f"the images ({size}) are too small for the network, or not the size it was built for: "
            f"pass images of the size it takes ({usual})"
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
    """Keeps the breakpoint, the modules in `opaque` and every module with hooks as single calls: the
    breakpoint's output is one node of the graph, and a hooked module traced through would run its
    hooks once on proxies and never again."""

    def __init__(self, breakpoint: nn.Module, opaque: frozenset[int] = frozenset()):
        super().__init__()
        self.breakpoint = breakpoint
        self.opaque = opaque

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        opaque = module is self.breakpoint or id(module) in self.opaque or bool(hooks_of(module))
        return opaque or super().is_leaf_module(module, qualified_name)


def _untraceable_parts(model: nn.Module, breakpoint: nn.Module) -> frozenset[int]:
    """The modules outside the path to the breakpoint that fx cannot trace on their own (by id)."""
    ancestors = {id(m) for m in model.modules() if any(sub is breakpoint for sub in m.modules())}
    parts: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is breakpoint:
                continue
            if id(child) in ancestors:
                visit(child)
                continue
            try:
                fx.Tracer().trace(child)
            except Exception:
                parts.add(id(child))

    visit(model)
    return frozenset(parts)


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
    except Exception as error:
        try:  # again, with the parts that fx cannot trace as single calls
            graph = _BreakpointTracer(module, _untraceable_parts(model, module)).trace(model)
        except Exception:  # any failure to trace means: use the hook tail
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            raise _Untraceable(f"torch.fx could not trace the model: {first_line}") from error
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
            result = node.args[0]
            chosen = primary_output(result, fx.Node)
            tail.output(fx.graph.map_arg(result if chosen is None else chosen, lambda n: env[n]))
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
    chosen = primary_output(output, fx.Node)
    graph.output((env[breakpoint], tuple(env[node] for node in captured), output if chosen is None else chosen))
    return fx.GraphModule(root, graph)


@dataclass
class _Plan:
    """How to split one model at one layer: traced once, reused while the model's modules stay."""

    capture: fx.GraphModule
    tail: fx.GraphModule


@dataclass
class _Entry:
    """A cached plan (None: fx cannot split the model there) and whether the slow tail was announced."""

    signature: tuple[int, ...]
    plan: Optional[_Plan]
    reason: str = ""
    warned: bool = False


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[str, _Entry]]" = weakref.WeakKeyDictionary()


def _entry(model: nn.Module, name: str, module: nn.Module) -> _Entry:
    """The fx plan for `name` (None when the model cannot be split with fx: the hook tail runs).

    Tracing costs about as much as a forward pass, so plans are cached per model; the cache entry
    is dropped when any submodule of the model is replaced or a hook is added or removed.
    """
    signature = (global_hooks(), *((id(module), hooks_of(module)) for module in model.modules()))
    plans = _PLANS.setdefault(model, {})
    if name in plans and plans[name].signature == signature:
        return plans[name]
    if hooks_of(model) or global_hooks():
        plans[name] = _Entry(signature, None, "hooks on the model itself, or on every module, run only in its own call")
        return plans[name]
    try:
        root, breakpoint = _trace(model, name, module)
        tail_module, captured = _tail_graph(root, breakpoint)
        entry = _Entry(signature, _Plan(_capture_module(root, breakpoint, captured), tail_module))
    except _Untraceable as reason:
        entry = _Entry(signature, None, str(reason))
    plans[name] = entry
    return entry


def _same_output(replay: Any, output: Any) -> bool:
    first, second = leaves(replay), leaves(output)
    if len(first) != len(second) or any(a.shape != b.shape for a, b in zip(first, second)):
        return False
    for a, b in zip(first, second):
        scale = b.abs().max().clamp_min(1.0) if b.numel() and b.is_floating_point() else 1.0
        if b.numel() and (a.double() - b.double()).abs().max() > 1e-4 * scale:
            return False
    return True


def _is_constant(value: Any) -> bool:
    """A value the tail may take as a constant: sizes and numbers (the input's shape, say)."""
    if isinstance(value, (list, tuple)):
        return all(_is_constant(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _bake(tail: fx.GraphModule, captured: list[Any]) -> fx.GraphModule:
    """The tail with the constant captured values written into its graph."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in tail.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders[1:], captured))
    for node in tail.graph.nodes:
        if node in values and _is_constant(values[node]):
            env[node] = values[node]
        elif node.op == "output":
            graph.output(fx.graph.map_arg(node.args[0], lambda n: env[n]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(tail, graph)


def _fx_split(plan: _Plan, name: str, images: torch.Tensor) -> tuple[Capture, FxTail]:
    features, captured, output = unfiltered_forward(plan.capture, images)
    capture = check_capture(name, features, output)
    batch = images.shape[0]
    tensors = [value for value in captured if not _is_constant(value)]
    for value in tensors:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            raise _Untraceable("the tail needs a value from before the layer that is not a per-image tensor")
    baked = len(tensors) < len(captured)
    tail = FxTail(_bake(plan.tail, list(captured)) if baked else plan.tail, [value.detach() for value in tensors])
    # with constants baked in, replay twice the rows: a batch size among them would show
    rows = torch.arange(batch, device=images.device).repeat(2 if baked else 1)
    try:
        with torch.no_grad():
            replay = tail(capture.features.index_select(0, rows), rows)
    except Exception as error:
        raise _Untraceable(f"the extracted tail fails on other batch sizes ({error})") from error
    if not _same_output(replay, select_rows(capture.output, rows)):
        raise _Untraceable("the extracted tail does not reproduce the model output")
    return capture, tail


def split(
    model: nn.Module,
    layer: Layer,
    images: torch.Tensor,
    layout: Optional[str] = None,
    reshape_transform: Optional[ReshapeTransform] = None,
) -> tuple[Capture, Tail]:
    """Capture A and NT for `images` and build the tail after `layer` (an fx graph when possible).

    The capture's layout says where the grid lies in A (caffast.core.layouts).
    """
    model, passed = unwrap(model)
    name, module = resolve_layer(model, _inner_name(layer, passed) if isinstance(layer, str) else layer)
    entry = _entry(model, name, module)
    split_at: Optional[tuple[Capture, Tail]] = None
    if entry.plan is not None:
        try:
            split_at = _fx_split(entry.plan, name, images)
        except _Untraceable as reason:
            entry.reason = str(reason)
    if split_at is None:
        if not entry.warned:
            entry.warned = True
            warnings.warn(
                f"{type(model).__name__} cannot be split at {name!r} with torch.fx ({entry.reason}); every "
                "evaluation reruns the whole model, which is much slower",
                SlowTailWarning,
                stacklevel=3,
            )
        split_at = capture_with_hook(model, name, module, images), HookTail(model, module, images)
    capture, tail = split_at
    image = tuple(images.shape[2:])
    capture.layout = resolve_layout(name, capture.features, image, model, module, layout, reshape_transform)
    return capture, tail
