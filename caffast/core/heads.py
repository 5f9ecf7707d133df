"""Fused heads: tails of the form [ReLU] -> global average pool -> flatten -> [Dropout] -> Linear.

For such a tail the filtered output is an explicit function of the filter g (docs/design.md, 'The fused head'):
FT = M_s g / HW + b, with M = W A (K x HW) and, after a ReLU, M_s choosing per cell between
M+ = W relu(A) (cells with g >= 0) and M- = W min(A, 0) (cells with g < 0).  On the (D, H, W) grid of
a clip or a volume (a 3-D pool before the Linear) HW stands for its D * H * W cells: nothing else
changes.  One batched product and the HW x HW Grams are computed once; after that no iteration
touches the C channels or the K outputs.
Everything here is float64: the Grams are small and the loss differences that decide stopping stay
exact at the 1e-6 level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .constraints import Grid
from .breakpoints import FxTail, Tail, hooks_of
from .losses import ClassLoss


@dataclass
class HeadSpec:
    """A recognised head: whether a ReLU precedes the pooling, and the final Linear layer."""

    relu: bool
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


_RELUS = (F.relu, torch.relu, torch.relu_)
_FUSED_FORMS = (
    ["pool", "flatten", "linear"],
    ["relu", "pool", "flatten", "linear"],
    ["pool", "linear"],
    ["relu", "pool", "linear"],
)


def _is_unit(size: Any) -> bool:
    return size == 1 or all(s == 1 for s in size) if isinstance(size, (int, tuple, list)) else False


def _is_spatial_dims(dims: Any, grid: Grid) -> bool:
    """Whether `dims` are the grid's axes of an (N, C, *grid) map, in any order or sign."""
    rank = 2 + len(grid)
    return isinstance(dims, (tuple, list)) and sorted(d % rank for d in dims) == list(range(2, rank))


# the average pools of a map with a 2-D and a 3-D grid, as modules and as functions
_ADAPTIVE_POOLS = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_AVERAGE_POOLS = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_POOL_FUNCTIONS = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_AVERAGE_POOL_FUNCTIONS = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _classify(node: fx.Node, modules: dict[str, nn.Module], grid: Grid) -> Optional[str]:
    """The role of one tail node in a fused head: relu, pool, flatten, identity or linear."""
    rank = len(grid)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, _ADAPTIVE_POOLS.get(rank, ())) and _is_unit(module.output_size):
            return "pool"
        if isinstance(module, _AVERAGE_POOLS.get(rank, ())) and module.padding == 0 \
                and _sizes(module.kernel_size, rank) == grid:  # fmt: skip
            return "pool"
        if isinstance(module, nn.Flatten) and module.start_dim == 1:
            return "flatten"
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return "identity"
        if isinstance(module, nn.Linear):
            return "linear"
        return None
    args = node.args[1:]
    kwargs = node.kwargs
    if node.op == "call_function":
        if node.target in _RELUS:
            return "relu"
        size = args[0] if args else kwargs.get("output_size")
        if node.target is _ADAPTIVE_POOL_FUNCTIONS.get(rank) and _is_unit(size):
            return "pool"
        if node.target is torch.mean and _is_spatial_dims(args[0] if args else kwargs.get("dim"), grid):
            return "pool"
        if node.target is _AVERAGE_POOL_FUNCTIONS.get(rank):
            kernel = args[0] if args else kwargs.get("kernel_size")
            if _sizes(kernel, rank) == grid and not kwargs.get("padding"):
                return "pool"
        if node.target is torch.flatten and (args[0] if args else kwargs.get("start_dim", 0)) == 1:
            return "flatten"
        if node.target is F.dropout:
            return "identity"
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target == "mean" and _is_spatial_dims(args[0] if args else kwargs.get("dim"), grid):
            return "pool"
        if node.target == "flatten" and (args[0] if args else kwargs.get("start_dim", 0)) == 1:
            return "flatten"
    return None


def _sizes(value: Any, rank: int) -> tuple[int, ...]:
    """A kernel size as one int per grid axis."""
    return (value,) * rank if isinstance(value, int) else tuple(value)


def detect_head(tail: Tail, grid: Grid) -> Optional[HeadSpec]:
    """The fused form of `tail`, or None when it is anything else (the generic path then runs).

    A tail module with hooks is not fused: the closed form reads the Linear's weights and would skip
    them, the generic path calls the modules and so runs them."""
    if not isinstance(tail, FxTail) or tail.captured:
        return None
    graph_module = tail.graph_module
    modules = dict(graph_module.named_modules())
    if any(hooks_of(module) for module in modules.values()):
        return None
    nodes = [n for n in graph_module.graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    roles: list[str] = []
    previous = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    for node in nodes:
        role = _classify(node, modules, grid)
        if role is None or node.all_input_nodes != [previous] or len(previous.users) != 1:
            return None
        roles.append(role)
        previous = node
    if output.args[0] is not previous or len(previous.users) != 1:
        return None
    core = [r for r in roles if r != "identity"]
    if core not in _FUSED_FORMS:
        return None
    pool = nodes[roles.index("pool")]
    if "flatten" not in core and not _pool_drops_spatial(pool):
        return None
    linear = modules[nodes[roles.index("linear")].target]
    return HeadSpec(relu="relu" in roles, weight=linear.weight, bias=linear.bias)


def _pool_drops_spatial(node: fx.Node) -> bool:
    """A mean over the grid's axes without keepdim already gives (N, C): no flatten is needed."""
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return node.op in ("call_method", "call_function") and node.target in ("mean", torch.mean) and not keepdim


@dataclass
class FusedHead:
    """Everything an iteration needs, precomputed (float64).

    S parts: 2 after a ReLU (a = 0: the cells where g >= 0 use M+, a = 1: the cells where g < 0 use
    M-), else 1.  Class-oblivious reads only gram (I, S, S, HW, HW), gram[i, a, b] = M_a^T M_b for
    image i: FT - NT = [M+ | M-] z / HW with z = [g+ - 1, g-] (g+ and g- the filter on its
    non-negative and negative cells), so the loss z^T G z / (K HW^2) is a sum over the Grams with no
    large constant to cancel.  Class-specific with a linear loss s . FT: linear (P, S, HW) = M_a^T s
    and constant (P,) = s . b, the loss being sum_a g_a . linear_a / HW + constant.  With a nonlinear
    loss: products (I, S, K, HW) = M_a and bias (K,), FT = sum_a M_a g_a / HW + b, scored by
    `class_loss` against `targets` (P,).  image (P,): each problem's image.
    """

    gram: Optional[torch.Tensor]
    linear: Optional[torch.Tensor]
    constant: Optional[torch.Tensor]
    image: torch.Tensor
    mode: str
    classes: int
    grid: Grid
    products: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    class_loss: Optional[ClassLoss] = None
    targets: Optional[torch.Tensor] = None

    @property
    def parts(self) -> int:
        if self.mode == "oblivious":
            return self.gram.shape[1]
        return (self.products if self.linear is None else self.linear).shape[1]

    @property
    def is_linear(self) -> bool:
        """A class-specific loss linear in the filter: the closed form and the compiled loops apply."""
        return self.mode == "specific" and self.linear is not None


def precompute(
    spec: HeadSpec,
    features: torch.Tensor,
    image_index: torch.Tensor,
    mode: str,
    class_loss: Optional[ClassLoss] = None,
    targets: Optional[torch.Tensor] = None,
) -> FusedHead:
    """The truncated forward: M (or M+ and M-) by one batched product, then what the mode and the
    loss read: the Grams (class-oblivious), the linear terms (a linear class-specific loss) or the
    products themselves (a nonlinear one)."""
    # M in the network's own precision (float32 for float32 features, as the tail would compute it);
    # the Grams, the loop and the stopping decisions in float64
    cells = features.flatten(2)
    weight = spec.weight.detach().to(cells.dtype)
    parts = [cells.clamp_min(0), cells.clamp_max(0)] if spec.relu else [cells]
    products = torch.stack([weight @ part for part in parts], dim=1).to(torch.float64)  # (N, S, K, HW)
    classes = spec.weight.shape[0]
    grid = tuple(features.shape[2:])
    if mode == "oblivious":
        gram = torch.einsum("naki,nbkj->nabij", products, products)
        return FusedHead(gram, None, None, image_index, mode, classes, grid)
    bias = torch.zeros(classes, dtype=torch.float64, device=products.device)
    if spec.bias is not None:
        bias = spec.bias.detach().to(torch.float64)
    weights = class_loss.weights(targets, classes, torch.float64)
    if weights is None:
        return FusedHead(None, None, None, image_index, mode, classes, grid, products, bias, class_loss, targets)
    linear = torch.einsum("pskj,pk->psj", products.index_select(0, image_index), weights)
    return FusedHead(None, linear, weights @ bias, image_index, mode, classes, grid)


def filter_parts(g: torch.Tensor, parts: int, zeros_negative: bool = False) -> list[torch.Tensor]:
    """The filter split by sign, one part per Gram block: [g] for a plain head, [g+, g-] after a ReLU.

    Cells at exactly zero count as non-negative, or as negative with `zeros_negative`: the loss is
    the same either way, its gradient is that of the piece on the chosen side of the ReLU's kink.
    """
    if parts == 1:
        return [g]
    positive = g > 0 if zeros_negative else g >= 0
    return [torch.where(positive, g, 0), torch.where(positive, 0, g)]
