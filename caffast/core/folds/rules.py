"""How each op of a tail folds: one table of rules, keyed by module class, function and Tensor method.

A rule reads a node's arguments by parameter name, as torch.fx normalizes them against the module's
forward or the function's schema, or against the rule's own signature where torch.fx cannot
(operators, Tensor methods, overloaded functions).  A call whose arguments do not normalize (a keyword
the signature lacks, a module class from outside torch.nn) stays unfolded.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from .affine import (
    Dense,
    Rep,
    Spatial,
    Static,
    Unfoldable,
    as_const,
    combine,
    concat,
    convolve,
    global_mean,
    linear,
    scale,
    shift,
)

Arguments = dict[str, Any]  # a call's arguments by parameter name: folded values, Static values, literals


@dataclass(frozen=True)
class FoldContext:
    """What a rule needs of the fold: `like` (the features: dtype and device of the folded values),
    the number of images `n`, the filter's grid and the budget of elements per image."""

    like: torch.Tensor
    n: int
    grid: tuple[int, ...]
    budget: int


class Folding(NamedTuple):
    """What a rule makes of a node: its folded value, the op's name, and the multiply-adds per problem
    the op costs unfolded (what its folded value may cost more than its inputs and still pay)."""

    rep: Rep
    op: str
    work: int


# ------------------------------------------------------------------------------------------------
# reading arguments


def is_folded(value: Any) -> bool:
    """Whether an argument depends on the filter (it is then a folded value)."""
    return isinstance(value, (Spatial, Dense))


def _static_tensor(value: Any, what: str) -> Optional[torch.Tensor]:
    """A weight or bias argument as the tensor it holds (or None); it must be the same for every image."""
    if is_folded(value):
        raise Unfoldable(f"{what} depends on the filter")
    if isinstance(value, Static):
        if value.batched:
            raise Unfoldable(f"{what} differs per image")
        value = value.value
    return value


def _sizes(value: Any, rank: int) -> tuple[Any, ...]:
    """A size, stride or padding as one entry per grid axis (an int stands for all of them)."""
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            raise Unfoldable("asymmetric 'same' padding")
        return tuple(t // 2 for t in totals)
    return _sizes(padding, len(kernel))


def _is_unit(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _spatial_dims(dims: Any, ndim: int) -> bool:
    """Whether `dims` are the grid's axes (all after the channels) of an ndim-dimensional value."""
    return isinstance(dims, (tuple, list)) and sorted(d % ndim for d in dims) == list(range(2, ndim))


def _numel(rep: Rep) -> int:
    return math.prod(rep.shape)


# ------------------------------------------------------------------------------------------------
# ops shared by a module's rule and a function's


def _conv(context: FoldContext, x: Any, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: tuple[int, ...],
          padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Folding:  # fmt: skip
    if not isinstance(x, Spatial):
        raise Unfoldable("convolution of a pooled value")
    weight = weight.detach().to(context.like.dtype)
    bias = None if bias is None else bias.detach().to(context.like.dtype)
    rep, _ = convolve(x, weight, bias, stride, padding, dilation, groups, context.grid, context.budget)
    out_c, per_group, *kernel = weight.shape
    op = f"conv {'x'.join(map(str, kernel))} s{stride[0]} p{padding[0]} d{dilation[0]} g{groups}"
    return Folding(rep, op, out_c * per_group * math.prod(kernel) * math.prod(rep.grid_shape[1:]))


def _linear(context: FoldContext, x: Any, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Folding:
    if not is_folded(x):
        raise Unfoldable("linear form")
    weight = weight.detach().to(context.like.dtype)
    bias = None if bias is None else bias.detach().to(context.like.dtype)
    rep = linear(x, weight, bias, context.grid, context.budget)
    return Folding(rep, f"linear {weight.shape[1]}->{weight.shape[0]}", weight.numel())


def _flatten(x: Any, start: int, end: int) -> Folding:
    if not is_folded(x):
        raise Unfoldable("flatten form")
    ndim = len(x.shape) + 1
    if start % ndim != 1 or end % ndim != ndim - 1:
        raise Unfoldable("flatten other than from dim 1")
    if isinstance(x, Dense):
        return Folding(Dense(x.matrix, x.const, (math.prod(x.shape),)), "flatten", 0)
    return Folding(Spatial(x.bases, x.keys, x.const, flat=True), "flatten", 0)


def _global_pool(context: FoldContext, x: Rep, keepdim: bool, op: str) -> Folding:
    if isinstance(x, Dense):
        if x.shape[1:] != (1,) * len(context.grid):
            raise Unfoldable("pooling a pooled value of another shape")
        return Folding(Dense(x.matrix, x.const, x.shape if keepdim else x.shape[:1]), op, 0)
    if x.flat:
        raise Unfoldable("pooling a flattened map")
    return Folding(global_mean(x, context.grid, keepdim), op, _numel(x))


def _adaptive_pool(context: FoldContext, x: Any, size: Any) -> Folding:
    rank = len(context.grid)
    if not is_folded(x) or len(x.shape) != 1 + rank:
        raise Unfoldable("adaptive pool form")
    cells = x.shape[1:]
    size = tuple(have if want is None else want for have, want in zip(cells, _sizes(size, rank)))
    if size == cells:
        return Folding(x, "adaptive pool (identity)", 0)
    if _is_unit(size):
        return _global_pool(context, x, True, f"adaptive pool {'x'.join('1' * rank)}")
    raise Unfoldable(f"adaptive pool {'x'.join(map(str, cells))} -> {'x'.join(map(str, size))}")


def _avg_pool(context: FoldContext, x: Any, kernel: Any, padding: Any, divisor: Optional[int]) -> Folding:
    """Only the pool over the whole grid folds (its stride does not matter then)."""
    rank = len(context.grid)
    if not is_folded(x) or len(x.shape) != 1 + rank:
        raise Unfoldable("avg pool form")
    if divisor is not None or any(_sizes(padding, rank)) or _sizes(kernel, rank) != tuple(x.shape[1:]):
        raise Unfoldable("avg pool over less than the whole grid")
    return _global_pool(context, x, True, "avg pool (global)")


def _scale(context: FoldContext, x: Any, factor: Any, divide: bool = False) -> Folding:
    if not is_folded(x) or is_folded(factor):
        raise Unfoldable("product of filtered values")
    return Folding(scale(x, as_const(factor, x.shape, context.n, context.like), divide), "scale", _numel(x))


def _sum(context: FoldContext, a: Any, b: Any, sign: float) -> Folding:
    """a + sign * b, either of them a constant."""
    if is_folded(a) and is_folded(b):
        return Folding(combine(a, b, sign), "add" if sign > 0 else "sub", _numel(a))
    if is_folded(a):
        const = as_const(b, a.shape, context.n, context.like)
        return Folding(shift(a, const * sign), "add constant", _numel(a))
    # constant - value or constant + value
    const = as_const(a, b.shape, context.n, context.like)
    rep = b if sign > 0 else scale(b, as_const(-1.0, b.shape, context.n, context.like))
    return Folding(shift(rep, const), "add constant", _numel(b))


# ------------------------------------------------------------------------------------------------
# rules of modules: `module` is the called module, the arguments hold its folded input


def _eval_identity(context: FoldContext, module: nn.Module, args: Arguments) -> Folding:
    """Dropout and Identity: the identity in eval mode."""
    if module.training:
        raise Unfoldable("dropout in training mode")
    return Folding(args["input"], type(module).__name__.lower(), 0)


def _conv_module(context: FoldContext, conv: nn.modules.conv._ConvNd, args: Arguments) -> Folding:
    """nn.Conv2d, and nn.Conv3d on a (D, H, W) grid."""
    if conv.padding_mode != "zeros":
        raise Unfoldable(f"padding mode {conv.padding_mode}")
    rank = len(conv.kernel_size)
    dilation = _sizes(conv.dilation, rank)
    padding = _conv_padding(conv.padding, _sizes(conv.kernel_size, rank), dilation)
    stride = _sizes(conv.stride, rank)
    return _conv(context, args["input"], conv.weight, conv.bias, stride, padding, dilation, conv.groups)


def _batch_norm_module(context: FoldContext, norm: nn.modules.batchnorm._BatchNorm, args: Arguments) -> Folding:
    if norm.training or norm.running_mean is None:
        raise Unfoldable("batch norm with batch statistics")
    x = args["input"]
    if isinstance(x, Spatial) and x.flat:
        raise Unfoldable("batch norm of a flattened map")
    dtype = context.like.dtype
    inv = torch.rsqrt(norm.running_var.detach().to(dtype) + norm.eps)
    factor = inv if norm.weight is None else inv * norm.weight.detach().to(dtype)
    offset = -norm.running_mean.detach().to(dtype) * factor
    if norm.bias is not None:
        offset = offset + norm.bias.detach().to(dtype)
    view = (-1,) + (1,) * (len(x.shape) - 1)
    factor = as_const(factor.view(view), x.shape, context.n, context.like)
    offset = as_const(offset.view(view), x.shape, context.n, context.like)
    return Folding(shift(scale(x, factor), offset), "batchnorm", _numel(x))


def _adaptive_pool_module(context: FoldContext, pool: nn.AdaptiveAvgPool2d, args: Arguments) -> Folding:
    return _adaptive_pool(context, args["input"], pool.output_size)


def _avg_pool_module(context: FoldContext, pool: nn.AvgPool2d, args: Arguments) -> Folding:
    return _avg_pool(context, args["input"], pool.kernel_size, pool.padding, pool.divisor_override)


def _flatten_module(context: FoldContext, flatten: nn.Flatten, args: Arguments) -> Folding:
    return _flatten(args["input"], flatten.start_dim, flatten.end_dim)


def _linear_module(context: FoldContext, layer: nn.Linear, args: Arguments) -> Folding:
    return _linear(context, args["input"], layer.weight, layer.bias)


# ------------------------------------------------------------------------------------------------
# rules of functions and Tensor methods (`module` is None)


def _add(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _sum(context, args["input"], args["other"], 1.0)


def _sub(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _sum(context, args["input"], args["other"], -1.0)


def _mul(context: FoldContext, _: None, args: Arguments) -> Folding:
    a, b = args["input"], args["other"]
    if is_folded(a) and is_folded(b):
        raise Unfoldable("product of two filtered values")
    if not is_folded(a):
        a, b = b, a
    return _scale(context, a, b)


def _div(context: FoldContext, _: None, args: Arguments) -> Folding:
    if args["rounding_mode"] is not None:
        raise Unfoldable("rounding division")
    if not is_folded(args["input"]) or is_folded(args["other"]):
        raise Unfoldable("division by a filtered value")
    return _scale(context, args["input"], args["other"], divide=True)


def _neg(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _scale(context, args["input"], -1.0)


def _cat(context: FoldContext, _: None, args: Arguments) -> Folding:
    tensors = args["tensors"]
    reps = [t for t in tensors if is_folded(t)]
    if not reps:
        raise Unfoldable("cat of constants")
    ndim = len(reps[0].shape) + 1
    if args["dim"] % ndim != 1:
        raise Unfoldable("cat along a non-channel dim")
    rep = concat(list(tensors), context.n, reps[0])
    return Folding(rep, "cat", _numel(rep))


def _flatten_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _flatten(args["input"], args["start_dim"], args["end_dim"])


def _mean(context: FoldContext, _: None, args: Arguments) -> Folding:
    x = args["input"]
    ndim = 2 + len(context.grid)
    if not is_folded(x) or len(x.shape) != ndim - 1 or not _spatial_dims(args["dim"], ndim):
        raise Unfoldable("mean other than over the spatial dims")
    return _global_pool(context, x, bool(args["keepdim"]), "mean")


def _adaptive_pool_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _adaptive_pool(context, args["input"], args["output_size"])


def _avg_pool_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    return _avg_pool(context, args["input"], args["kernel_size"], args["padding"], args["divisor_override"])


def _dropout_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    if args["training"]:
        raise Unfoldable("dropout in training mode")
    return Folding(args["input"], "dropout", 0)


def _conv_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    """F.conv2d, and F.conv3d on a (D, H, W) grid."""
    weight = _static_tensor(args["weight"], "conv weight")
    bias = _static_tensor(args["bias"], "conv bias")
    rank = weight.dim() - 2
    dilation = _sizes(args["dilation"], rank)
    padding = _conv_padding(args["padding"], tuple(weight.shape[2:]), dilation)
    stride = _sizes(args["stride"], rank)
    return _conv(context, args["input"], weight, bias, stride, padding, dilation, args["groups"])


def _linear_function(context: FoldContext, _: None, args: Arguments) -> Folding:
    weight, bias = _static_tensor(args["weight"], "weight"), _static_tensor(args["bias"], "bias")
    return _linear(context, args["input"], weight, bias)


def _contiguous(context: FoldContext, _: None, args: Arguments) -> Folding:
    return Folding(args["input"], "contiguous", 0)


def _permute(context: FoldContext, _: None, args: Arguments) -> Folding:
    x, dims = args["input"], list(args["dims"])
    if not isinstance(x, Dense) or len(dims) != len(x.shape) + 1 or dims[0] % len(dims) != 0:
        raise Unfoldable("permute of a spatial value")
    perm = [d % len(dims) - 1 for d in dims[1:]]
    n, f, hw = x.matrix.shape
    matrix = x.matrix.view(n, *x.shape, hw).permute(0, *(p + 1 for p in perm), len(dims)).reshape(n, f, hw)
    const = None
    if x.const is not None:
        c = x.const.view(x.const.shape[0], *x.shape).permute(0, *(p + 1 for p in perm))
        const = c.reshape(c.shape[0], f)
    shape = tuple(x.shape[p] for p in perm)
    return Folding(Dense(matrix, const, shape), "permute", 0)


# ------------------------------------------------------------------------------------------------
# the signatures that calls of operators, Tensor methods and overloaded functions are read with;
# a call with any other argument (alpha=, out=, dtype=) does not bind and stays unfolded


def _binary(input, other): ...
def _division(input, other, *, rounding_mode=None): ...
def _unary(input): ...
def _flatten_signature(input, start_dim=0, end_dim=-1): ...
def _mean_signature(input, dim=None, keepdim=False): ...
def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _contiguous_signature(input, memory_format=torch.contiguous_format): ...
def _permute_signature(input, dims): ...


# ------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Rule:
    """How one op folds: `fold(context, module, arguments)` (module: the called module, None for
    functions and methods).  `signature`: the stub whose parameters the call is read with, where
    torch.fx cannot read it on its own; `variadic`: the call may also list the last parameter's items
    one by one, as Tensor.permute(0, 2, 3, 1) does."""

    fold: Callable[[FoldContext, Any, Arguments], Folding]
    signature: Optional[Callable[..., None]] = None
    variadic: bool = False


_ADD = Rule(_add, _binary)
_SUB = Rule(_sub, _binary)
_MUL = Rule(_mul, _binary)
_DIV = Rule(_div, _division)

# keyed by module class (a module takes the rule of the first of its classes in the table), by
# function, and by Tensor method name
RULES: dict[Any, Rule] = {
    # modules
    nn.Dropout: Rule(_eval_identity),
    nn.Dropout2d: Rule(_eval_identity),
    nn.Dropout3d: Rule(_eval_identity),
    nn.Identity: Rule(_eval_identity),
    nn.Conv2d: Rule(_conv_module),
    nn.Conv3d: Rule(_conv_module),
    nn.modules.batchnorm._BatchNorm: Rule(_batch_norm_module),
    nn.AdaptiveAvgPool2d: Rule(_adaptive_pool_module),
    nn.AdaptiveAvgPool3d: Rule(_adaptive_pool_module),
    nn.AvgPool2d: Rule(_avg_pool_module),
    nn.AvgPool3d: Rule(_avg_pool_module),
    nn.Flatten: Rule(_flatten_module),
    nn.Linear: Rule(_linear_module),
    # functions and Tensor methods
    **dict.fromkeys([operator.add, operator.iadd, torch.add, "add", "__add__", "__radd__"], _ADD),
    **dict.fromkeys([operator.sub, operator.isub, torch.sub, "sub", "__sub__"], _SUB),
    **dict.fromkeys([operator.mul, operator.imul, torch.mul, "mul", "__mul__", "__rmul__"], _MUL),
    **dict.fromkeys([operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "__truediv__"], _DIV),
    **dict.fromkeys([operator.neg, torch.neg, "neg"], Rule(_neg, _unary)),
    **dict.fromkeys([torch.flatten, "flatten"], Rule(_flatten_function, _flatten_signature)),
    **dict.fromkeys([torch.mean, "mean"], Rule(_mean, _mean_signature)),
    torch.cat: Rule(_cat),
    **dict.fromkeys([F.adaptive_avg_pool2d, F.adaptive_avg_pool3d], Rule(_adaptive_pool_function)),
    **dict.fromkeys([F.avg_pool2d, F.avg_pool3d], Rule(_avg_pool_function)),
    F.dropout: Rule(_dropout_function),
    **dict.fromkeys([F.conv2d, F.conv3d], Rule(_conv_function, _conv_signature)),
    F.linear: Rule(_linear_function),
    "contiguous": Rule(_contiguous, _contiguous_signature),
    "permute": Rule(_permute, _permute_signature, variadic=True),
}


def rule_of(node: fx.Node, module: Optional[nn.Module]) -> Optional[Rule]:
    """The rule of a call: of the called module's class, of the function, or of the method's name."""
    if module is not None:
        return next((RULES[cls] for cls in type(module).__mro__ if cls in RULES), None)
    if node.op in ("call_function", "call_method"):
        return RULES.get(node.target)
    return None


def normalized_arguments(node: fx.Node, root: nn.Module, rule: Rule) -> Optional[Arguments]:
    """The node's arguments by parameter name, defaults filled in; None where they cannot be read."""
    args = node.args
    if rule.variadic and len(args) > 1 and not (len(args) == 2 and isinstance(args[1], (tuple, list))):
        args = (args[0], tuple(args[1:]))
    try:
        if rule.signature is None:
            pair = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
        else:
            pair = normalize_function(rule.signature, tuple(args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    except (TypeError, RuntimeError, ValueError):  # the call binds no signature, or more than one
        return None
    return None if pair is None else dict(pair.kwargs)
