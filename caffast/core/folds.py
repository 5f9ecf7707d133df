"""Fold the linear prefix of a tail: apply the ops that are affine in the filter once per image.

The tail after a breakpoint runs on the filtered map X = A * g (A the features (N, C, H, W), g the
multiplier (P, H, W) of P problems, each on image image_index[p]).  The ops right after the breakpoint
are often affine in X, hence in g: 1 x 1 and k x k convolutions, eval BatchNorm, global average
pooling, flatten, Linear, additions of captured values, concatenation ...  Those ops are applied to the
feature map once, here, and every evaluation starts after them (the algebra of fused heads, carried past the head).

Representation of an affine-in-g value (one per folded fx node):

* `Spatial` (a (P, O, H', W') value): a sum of terms plus a constant,

      V[p, :, y, x] = sum_t B_t[n, :, y, x] * g[p, oy_t + sy_t * y, ox_t + sx_t * x] + c[n, :, y, x]

  with n = image_index[p] and g taken as zero outside its H x W grid.  A term is a basis B_t (stored
  per image, (N, O, H', W')) and a placement key (oy, ox, sy, sx): where the output cell (y, x) reads
  the filter.  The feature map itself is one term, key (0, 0, 1, 1).  A k x k convolution maps every
  term to k^2 terms (one per kernel offset, B_d = W_d applied to the shifted basis; strides multiply,
  offsets add), and terms with equal keys are summed, so two stacked 3 x 3 convolutions give the 25
  keys of a 5 x 5 window, not 81 terms.  Elementwise affine ops (BatchNorm, scaling, adding a constant)
  act on every basis and on the constant.  `flat` marks a value that was flattened to (P, O*H'*W')
  (kept spatial until a Linear consumes it).
* `Dense` (a value of any per-problem shape S, F = prod(S) entries, reached by pooling or a Linear):
  V[p] = (M[n] @ g[p].flatten() + c[n]).view(S), M (N, F, HW).

Folding walks the tail graph in order and stops, per node, at the first op that is not affine in g
(ReLU, LayerNorm, max-pool, the product of two g-dependent values, a shape query, ...) or that does not
pay (its folded representation would cost more per evaluation than running it, or exceed the memory
budget per image).  At the frontier each folded value that feeds a remaining op is materialized per
evaluation from its representation; the remaining ops form a new fx graph
`rest(*materialized, *captured)` that runs with autograd.  Nothing here needs more than torch and fx.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .breakpoints import FxTail, Tail, hooks_of

Key = tuple[int, int, int, int]  # (offset_y, offset_x, stride_y, stride_x) of a term's placement
IDENTITY: Key = (0, 0, 1, 1)

DEFAULT_BUDGET = 1 << 24  # elements stored per image for one folded value (64 MiB in float32)


class _Stop(Exception):
    """Folding stops at this node; the message says why."""


# ------------------------------------------------------------------------------------------------
# representations


@dataclass
class Spatial:
    """sum_t bases[:, t] * g[placement keys[t]] + const, a (P, O, H', W') value (or its flattening)."""

    bases: torch.Tensor  # (N, T, O, H', W')
    keys: list[Key]
    const: Optional[torch.Tensor]  # 4-D, broadcastable to (N, O, H', W'), leading dim N or 1
    flat: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-problem shape of the value."""
        o, h, w = self.bases.shape[2:]
        return (o * h * w,) if self.flat else (o, h, w)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.bases.shape[2:])

    def cost(self) -> int:
        """Multiply-adds per problem to materialize it (and the elements stored per image)."""
        return self.bases[0].numel()


@dataclass
class Dense:
    """(matrix @ g.flatten() + const).view(shape): any value that no longer has the filter's grid."""

    matrix: torch.Tensor  # (N, F, HW)
    const: Optional[torch.Tensor]  # (N or 1, F)
    shape: tuple[int, ...]

    def cost(self) -> int:
        return self.matrix[0].numel()


Rep = Union[Spatial, Dense]


@dataclass
class Static:
    """A value that does not depend on the filter; `batched`: its leading dim is the image (N)."""

    value: Any
    batched: bool


@dataclass
class FoldStep:
    """One node of the tail: folded or not, and why."""

    node: str
    op: str
    folded: bool
    detail: str


# ------------------------------------------------------------------------------------------------
# placements


def _placement_index(key: Key, out_hw: tuple[int, int], grid: tuple[int, int], device) -> torch.Tensor:
    """Flat index into g (HW, with HW meaning 'outside the grid, zero') of each output cell."""
    oy, ox, sy, sx = key
    height, width = grid
    ys = oy + sy * torch.arange(out_hw[0], device=device)
    xs = ox + sx * torch.arange(out_hw[1], device=device)
    inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
    index = ys[:, None] * width + xs[None, :]
    return torch.where(inside, index, torch.full_like(index, height * width)).flatten()


def _touches_grid(key: Key, out_hw: tuple[int, int], grid: tuple[int, int]) -> bool:
    oy, ox, sy, sx = key
    rows = any(0 <= oy + sy * y < grid[0] for y in range(out_hw[0]))
    cols = any(0 <= ox + sx * x < grid[1] for x in range(out_hw[1]))
    return rows and cols


# ------------------------------------------------------------------------------------------------
# constants


def _as_const(operand: Any, shape: tuple[int, ...], n_images: int, like: torch.Tensor) -> torch.Tensor:
    """A static operand as a (N or 1, *shape)-broadcastable tensor of len(shape) + 1 dims.

    Refuses operands that would broadcast the value to a larger shape.
    """
    if isinstance(operand, Static):
        value, batched = operand.value, operand.batched
    else:
        value, batched = operand, False
    if isinstance(value, (int, float, bool)):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        raise _Stop(f"operand of type {type(value).__name__}")
    value = value.to(dtype=like.dtype, device=like.device)
    dims = len(shape) + 1
    if batched:
        rest = value.shape[1:]
        if len(rest) > len(shape):
            raise _Stop("a per-image operand of higher rank")
        value = value.reshape(value.shape[0], *(1,) * (len(shape) - len(rest)), *rest)
    else:
        if value.dim() > dims:
            raise _Stop("an operand of higher rank")
        value = value.reshape(*(1,) * (dims - value.dim()), *value.shape)
        if value.shape[0] != 1:
            raise _Stop("an operand with its own batch dimension")
    try:
        broadcast = torch.broadcast_shapes(value.shape[1:], shape)
    except RuntimeError as error:
        raise _Stop("operand shapes do not broadcast") from error
    if tuple(broadcast) != tuple(shape):
        raise _Stop("the operand broadcasts the value to a larger shape")
    if value.shape[0] not in (1, n_images):
        raise _Stop("operand batch mismatch")
    return value


def _flat_const(const: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A (n, *shape)-broadcastable constant as (n, F)."""
    return const.expand(const.shape[0], *shape).reshape(const.shape[0], -1)


def _add_consts(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


# ------------------------------------------------------------------------------------------------
# affine algebra on representations


def scale(rep: Rep, factor: torch.Tensor, divide: bool = False) -> Rep:
    """rep * factor (or rep / factor), factor a constant broadcastable to the value (see _as_const)."""
    op = torch.div if divide else torch.mul
    if isinstance(rep, Spatial):
        if rep.flat:
            raise _Stop("scaling a flattened map")
        const = None if rep.const is None else op(rep.const, factor)
        return Spatial(op(rep.bases, factor.unsqueeze(1)), rep.keys, const)
    flat = _flat_const(factor, rep.shape)
    const = None if rep.const is None else op(rep.const, flat)
    return Dense(op(rep.matrix, flat[..., None]), const, rep.shape)


def shift(rep: Rep, offset: torch.Tensor) -> Rep:
    """rep + offset, offset a constant broadcastable to the value."""
    if isinstance(rep, Spatial):
        if rep.flat:
            raise _Stop("shifting a flattened map")
        return Spatial(rep.bases, rep.keys, _add_consts(rep.const, offset))
    return Dense(rep.matrix, _add_consts(rep.const, _flat_const(offset, rep.shape)), rep.shape)


def combine(a: Rep, b: Rep, sign: float = 1.0) -> Rep:
    """a + sign * b for two affine values of the same kind and shape."""
    if type(a) is not type(b) or a.shape != b.shape:
        raise _Stop("adding values of different kinds or shapes")
    b_const = None if b.const is None else b.const * sign
    if isinstance(a, Dense):
        return Dense(a.matrix + sign * b.matrix, _add_consts(a.const, b_const), a.shape)
    if a.flat or b.flat:
        raise _Stop("adding flattened maps")
    terms = {key: a.bases[:, t] for t, key in enumerate(a.keys)}
    for t, key in enumerate(b.keys):
        part = sign * b.bases[:, t]
        terms[key] = terms[key] + part if key in terms else part
    keys = list(terms)
    return Spatial(torch.stack([terms[k] for k in keys], 1), keys, _add_consts(a.const, b_const))


def concat(reps: list[Any], n_images: int, like_rep: Rep) -> Rep:
    """Concatenation along the channel dim of affine values and static tensors."""
    kinds = {type(r) for r in reps if isinstance(r, (Spatial, Dense))}
    if len(kinds) != 1:
        raise _Stop("concatenating spatial and pooled values")
    like = like_rep.bases if isinstance(like_rep, Spatial) else like_rep.matrix
    if kinds == {Dense}:
        shapes = [r.shape if isinstance(r, Dense) else None for r in reps]
        tail_shape = next(s for s in shapes if s is not None)[1:]
        parts_m, parts_c, channels = [], [], 0
        hw = like.shape[-1]
        for r in reps:
            if isinstance(r, Dense):
                if r.shape[1:] != tail_shape:
                    raise _Stop("concatenating pooled values of different shapes")
                parts_m.append(r.matrix)
                const = r.const if r.const is not None else like.new_zeros(1, r.matrix.shape[1])
                parts_c.append(const)
                channels += r.shape[0]
            else:
                value = r.value if isinstance(r, Static) else r
                shape = (value.shape[-len(tail_shape) - 1],) + tail_shape
                const = _flat_const(_as_const(r, shape, n_images, like), shape)
                parts_m.append(like.new_zeros(1, const.shape[1], hw).expand(n_images, -1, -1))
                parts_c.append(const)
                channels += shape[0]
        n = max(c.shape[0] for c in parts_c)
        const = torch.cat([c.expand(n, -1) for c in parts_c], 1)
        return Dense(torch.cat(parts_m, 1), const, (channels,) + tail_shape)
    spatial = [r for r in reps if isinstance(r, Spatial)]
    if any(r.flat for r in spatial):
        raise _Stop("concatenating flattened maps")
    _, height, width = spatial[0].grid_shape
    if any(r.grid_shape[1:] != (height, width) for r in spatial):
        raise _Stop("concatenating maps of different grids")
    keys = list(dict.fromkeys(k for r in spatial for k in r.keys))
    n_b = like.shape[0]
    bases, consts, has_const = [], [], False
    for r in reps:
        if isinstance(r, Spatial):
            channels = r.grid_shape[0]
            block = like.new_zeros(n_b, len(keys), channels, height, width)
            for t, key in enumerate(r.keys):
                block[:, keys.index(key)] = r.bases[:, t]
            const = r.const
        else:
            value = r.value if isinstance(r, Static) else r
            channels = value.shape[-3]
            block = like.new_zeros(1, len(keys), channels, height, width).expand(n_b, -1, -1, -1, -1)
            const = _as_const(r, (channels, height, width), n_images, like)
        has_const = has_const or const is not None
        bases.append(block)
        consts.append((const, channels))
    const = None
    if has_const:
        n = max(c.shape[0] for c, _ in consts if c is not None)
        const = torch.cat(
            [
                (c if c is not None else like.new_zeros(1, ch, 1, 1)).expand(n, ch, height, width)
                for c, ch in consts
            ],
            1,
        )
    return Spatial(torch.cat(bases, 2), keys, const)


def conv2d(
    rep: Spatial,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    grid: tuple[int, int],
    budget: int,
) -> tuple[Spatial, int]:
    """A zero-padded convolution of a spatial value: every term becomes one term per kernel offset.

    Returns the new value and its cost per problem.  Raises _Stop when it would not fit the budget.
    """
    if rep.flat:
        raise _Stop("convolving a flattened map")
    n, _, channels, height, width = rep.bases.shape
    out_c, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    targets: dict[Key, list[tuple[int, int, int]]] = {}
    for t, (oy, ox, sy, sx) in enumerate(rep.keys):
        for i in range(kh):
            for j in range(kw):
                key = (oy + sy * (dh * i - ph), ox + sx * (dw * j - pw), sy * sh, sx * sw)
                if _touches_grid(key, (out_h, out_w), grid):
                    targets.setdefault(key, []).append((t, i, j))
    cost = max(len(targets), 1) * out_c * out_h * out_w
    if cost > budget:
        raise _Stop(f"{len(targets)} terms x {out_c}x{out_h}x{out_w} exceed the budget")
    # all k^2 one-offset products of a term at once: a 1 x 1 convolution with O * k^2 outputs
    wide = weight.permute(0, 2, 3, 1).reshape(out_c * kh * kw, -1, 1, 1)
    products = {}
    for t in {t for parts in targets.values() for t, _, _ in parts}:
        padded = F.pad(rep.bases[:, t], (pw, pw, ph, ph))
        products[t] = F.conv2d(padded, wide, groups=groups).view(n, out_c, kh, kw, *padded.shape[2:])
    keys, bases = [], []
    for key, parts in targets.items():
        total = None
        for t, i, j in parts:
            y0, x0 = dh * i, dw * j
            piece = products[t][:, :, i, j, y0 : y0 + sh * (out_h - 1) + 1 : sh, x0 : x0 + sw * (out_w - 1) + 1 : sw]
            total = piece if total is None else total + piece
        keys.append(key)
        bases.append(total)
    if not bases:  # every term falls outside the grid: only the constant is left
        keys, bases = [IDENTITY], [rep.bases.new_zeros(n, out_c, out_h, out_w)]
    const = None
    if rep.const is not None:
        full = rep.const.expand(rep.const.shape[0], channels, height, width)
        const = F.conv2d(full, weight, bias, stride, padding, dilation, groups)
    elif bias is not None:
        const = bias.view(1, -1, 1, 1)
    return Spatial(torch.stack(bases, 1), keys, const), cost


def global_mean(rep: Spatial, grid: tuple[int, int], keepdim: bool) -> Dense:
    """Mean over the spatial dims of a spatial value: a (O, HW) matrix per image."""
    n, _, channels, height, width = rep.bases.shape
    cells = height * width
    hw = grid[0] * grid[1]
    matrix = rep.bases.new_zeros(n, channels, hw + 1)
    for t, key in enumerate(rep.keys):
        index = _placement_index(key, (height, width), grid, rep.bases.device)
        matrix.index_add_(2, index, rep.bases[:, t].reshape(n, channels, cells) / cells)
    const = None if rep.const is None else rep.const.mean(dim=(2, 3))
    shape = (channels, 1, 1) if keepdim else (channels,)
    return Dense(matrix[..., :hw], const, shape)


def linear(rep: Rep, weight: torch.Tensor, bias: Optional[torch.Tensor], grid: tuple[int, int], budget: int) -> Dense:
    """y = x W^T + b for a flat value: a dense value, or a flattened map (the W1 contraction of VGG)."""
    out_f = weight.shape[0]
    hw = grid[0] * grid[1]
    if out_f * hw > budget:
        raise _Stop(f"a {out_f} x {hw} matrix exceeds the budget")
    if isinstance(rep, Dense):
        if len(rep.shape) != 1:
            raise _Stop("Linear over a non-flat pooled value")
        matrix = torch.matmul(weight, rep.matrix)
        const = None if rep.const is None else rep.const @ weight.t()
    else:
        if not rep.flat:
            raise _Stop("Linear over the last dim of a spatial map")
        n, _, channels, height, width = rep.bases.shape
        cells = height * width
        reshaped = weight.view(out_f, channels, cells)
        matrix = rep.bases.new_zeros(n, out_f, hw + 1)
        # C_t[:, k, q] = sum_o W[k, o, q] B_t[:, o, q], by cell chunks (bounded temporary memory)
        chunk = max(1, (1 << 24) // max(1, out_f * channels))
        for t, key in enumerate(rep.keys):
            index = _placement_index(key, (height, width), grid, rep.bases.device)
            basis = rep.bases[:, t].reshape(n, channels, cells)
            for q0 in range(0, cells, chunk):
                q1 = min(cells, q0 + chunk)
                w = reshaped[:, :, q0:q1].permute(2, 0, 1)  # (q, K, O)
                b = basis[:, :, q0:q1].permute(2, 1, 0)  # (q, O, N)
                part = torch.bmm(w, b).permute(2, 1, 0)  # (N, K, q)
                matrix.index_add_(2, index[q0:q1], part)
        matrix = matrix[..., :hw]
        const = None
        if rep.const is not None:
            full = rep.const.expand(rep.const.shape[0], channels, height, width).reshape(rep.const.shape[0], -1)
            const = full @ weight.t()
    if bias is not None:
        const = _add_consts(const, bias.view(1, -1))
    return Dense(matrix, const, (out_f,))


# ------------------------------------------------------------------------------------------------
# materialization


class Materializer:
    """Evaluates one folded value for a batch of problems: (g_ext (P, HW + 1), image_index) -> value."""

    def __init__(self, rep: Rep, grid: tuple[int, int]):
        self.rep = rep
        self.grid = grid
        if isinstance(rep, Spatial):
            _, _, _, height, width = rep.bases.shape
            self.direct = rep.keys == [IDENTITY] and (height, width) == grid
            self.index = torch.stack(
                [_placement_index(k, (height, width), grid, rep.bases.device) for k in rep.keys]
            )
        else:
            # (N, HW, F): g as a row vector times a (HW, F) matrix is a fast product on CPU, unlike
            # a batched matrix-vector product (3 to 6 times slower, forward and backward)
            rep.matrix = rep.matrix.transpose(1, 2).contiguous().transpose(1, 2)  # one storage
            self.transposed = rep.matrix.transpose(1, 2)

    def __call__(self, g: torch.Tensor, g_ext: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        rep = self.rep
        if isinstance(rep, Spatial):
            bases = rep.bases.index_select(0, image_index)  # (P, T, O, H', W')
            p, terms, _, height, width = bases.shape
            if self.direct:
                value = bases[:, 0] * g[:, None]
            else:
                cells = g_ext[:, self.index].view(p, terms, 1, height, width)
                value = (bases[:, 0] * cells[:, 0]) if terms == 1 else (bases * cells).sum(1)
            if rep.const is not None:
                const = rep.const if rep.const.shape[0] == 1 else rep.const.index_select(0, image_index)
                value = value + const
            return value.flatten(1) if rep.flat else value
        matrix = self.transposed.index_select(0, image_index)
        value = torch.bmm(g.flatten(1)[:, None, :], matrix)[:, 0]
        if rep.const is not None:
            value = value + (rep.const if rep.const.shape[0] == 1 else rep.const.index_select(0, image_index))
        return value.view(value.shape[0], *rep.shape)


# ------------------------------------------------------------------------------------------------
# the folded tail


class FoldedTail:
    """The tail with its affine prefix folded: (g (P, H, W), image_index (P,)) -> output.

    `steps` lists every node that depends on the filter and whether it was folded (`report()` prints
    them); `frontier` names the folded values materialized per evaluation; `rest` is the fx graph of
    the remaining ops, run with autograd.
    """

    def __init__(
        self,
        frontier: list[tuple[str, Materializer]],
        rest: fx.GraphModule,
        captured: list[torch.Tensor],
        grid: tuple[int, int],
        dtype: torch.dtype,
        steps: list[FoldStep],
    ):
        self.frontier = frontier
        self.rest = rest
        self.captured = captured
        self.grid = grid
        self.dtype = dtype
        self.steps = steps

    @property
    def folded(self) -> list[FoldStep]:
        return [s for s in self.steps if s.folded]

    def __call__(self, g: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        g = g.to(self.dtype)
        g_ext = torch.cat([g.flatten(1), g.new_zeros(g.shape[0], 1)], 1)
        values = [m(g, g_ext, image_index) for _, m in self.frontier]
        captured = [c.index_select(0, image_index) for c in self.captured]
        return self.rest(*values, *captured)

    def report(self) -> str:
        lines = []
        for s in self.steps:
            mark = "folded " if s.folded else "stop   "
            lines.append(f"{mark} {s.node:<40} {s.op:<22} {s.detail}")
        lines.append("frontier: " + ", ".join(f"{name} ({_describe(m.rep)})" for name, m in self.frontier))
        return "\n".join(lines)


def _describe(rep: Rep) -> str:
    if isinstance(rep, Spatial):
        o, h, w = rep.grid_shape
        return f"{len(rep.keys)} term{'s' if len(rep.keys) > 1 else ''} x {o}x{h}x{w}" + (" flat" if rep.flat else "")
    return f"dense {rep.matrix.shape[1]}x{rep.matrix.shape[2]} -> {rep.shape}"


# ------------------------------------------------------------------------------------------------
# the fold pass


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            raise _Stop("asymmetric 'same' padding")
        return tuple(t // 2 for t in totals)
    return _pair(padding)


def _is_unit(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _spatial_dims(dims: Any, ndim: int) -> bool:
    return isinstance(dims, (tuple, list)) and sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]


_ADD = (operator.add, torch.add, operator.iadd)
_SUB = (operator.sub, torch.sub, operator.isub)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)
_NEG = (operator.neg, torch.neg)
_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node mutates its first argument."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and not module.training:
            return False  # identity in eval
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace", False):
            return True
        return getattr(node.target, "__name__", "").endswith("_")
    return False


class _Folder:
    def __init__(self, graph_module: fx.GraphModule, features: torch.Tensor, captured: list[torch.Tensor], budget: int):
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.features = features.detach()
        self.captured = [c.detach() for c in captured]
        self.n, _, height, width = features.shape
        self.grid = (height, width)
        self.budget = budget
        self.like = self.features
        self.placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.feature = self.placeholders[0]
        self.reps: dict[fx.Node, Rep] = {}
        self.statics: dict[fx.Node, Static] = {}
        self.order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
        self.depends = {self.feature}
        for node in graph_module.graph.nodes:
            if any(a in self.depends for a in node.all_input_nodes):
                self.depends.add(node)

    # static values -------------------------------------------------------------------------------

    def static(self, node: fx.Node) -> Static:
        if node in self.statics:
            return self.statics[node]
        if node.op == "placeholder":
            index = self.placeholders.index(node) - 1
            result = Static(self.captured[index].clone(), True)
        elif node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            result = Static(value.detach() if isinstance(value, torch.Tensor) else value, False)
        else:
            batched = False

            def load(n: fx.Node):
                nonlocal batched
                s = self.static(n)
                batched = batched or s.batched
                return s.value

            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = self.modules[node.target](*args, **kwargs)
            result = Static(value, batched)
        self.statics[node] = result
        return result

    def operand(self, arg: Any) -> Any:
        """An argument as a Rep (folded), a Static, or a literal; raises _Stop for unfolded ones."""
        if isinstance(arg, fx.Node):
            if arg in self.reps:
                return self.reps[arg]
            if arg in self.depends:
                raise _Stop(f"input {arg.name} is not folded")
            return self.static(arg)
        return arg

    def static_tensor(self, arg: Any, what: str) -> Optional[torch.Tensor]:
        value = self.operand(arg)
        if isinstance(value, (Spatial, Dense)):
            raise _Stop(f"{what} depends on the filter")
        if isinstance(value, Static):
            if value.batched:
                raise _Stop(f"{what} differs per image")
            value = value.value
        return value

    # one node ------------------------------------------------------------------------------------

    def fold(self, node: fx.Node) -> tuple[Rep, str, str]:
        """The folded value of a node: (rep, op name, detail), or raises _Stop."""
        for arg in node.all_input_nodes:
            if arg in self.depends and arg not in self.reps:
                raise _Stop(f"input {arg.name} is not folded")
            if arg in self.reps:
                for user in arg.users:
                    if user is not node and self.order[user] < self.order[node] and _is_inplace(user, self.modules):
                        raise _Stop(f"{arg.name} was modified in place by {user.name}")
        inputs = [self.reps[a] for a in node.all_input_nodes if a in self.reps]
        before = sum(r.cost() for r in inputs)
        rep, op, work = self._fold(node)
        cost = rep.cost()
        if cost > self.budget:
            raise _Stop(f"{_describe(rep)} exceeds the budget")
        if cost > before + work:
            raise _Stop(f"does not pay ({cost} > {before} + {work} per problem)")
        return rep, op, _describe(rep)

    def _fold(self, node: fx.Node) -> tuple[Rep, str, int]:
        """(rep, op name, multiply-adds per problem the op would cost unfolded)."""
        args = [fx.node.map_arg(a, self.operand) if isinstance(a, (list, tuple)) else self.operand(a) for a in node.args]
        kwargs = {k: self.operand(v) for k, v in node.kwargs.items()}
        first = args[0] if args else None
        if node.op == "call_module":
            return self._module(self.modules[node.target], first, args, kwargs)
        if node.op == "call_function":
            return self._function(node.target, args, kwargs)
        if node.op == "call_method":
            return self._method(node.target, args, kwargs)
        raise _Stop(f"{node.op} node")

    def _numel(self, rep: Rep) -> int:
        return math.prod(rep.shape)

    def _module(self, module: nn.Module, x: Any, args: list, kwargs: dict) -> tuple[Rep, str, int]:
        if hooks_of(module):  # folded, the module would never be called, nor its hooks
            raise _Stop(f"{type(module).__name__} has hooks")
        if not isinstance(x, (Spatial, Dense)) or len(args) != 1 or kwargs:
            raise _Stop(f"{type(module).__name__} call form")
        if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            if module.training:
                raise _Stop("dropout in training mode")
            return x, type(module).__name__.lower(), 0
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise _Stop(f"padding mode {module.padding_mode}")
            kernel = _pair(module.kernel_size)
            padding = _conv_padding(module.padding, kernel, _pair(module.dilation))
            return self._conv(x, module.weight, module.bias, _pair(module.stride), padding, _pair(module.dilation), module.groups)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                raise _Stop("batch norm with batch statistics")
            return self._batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return self._adaptive_pool(x, module.output_size)
        if isinstance(module, nn.AvgPool2d):
            return self._avg_pool(x, module.kernel_size, module.stride, module.padding, module.divisor_override)
        if isinstance(module, nn.Flatten):
            return self._flatten(x, module.start_dim, module.end_dim)
        if isinstance(module, nn.Linear):
            return self._linear(x, module.weight, module.bias)
        raise _Stop(f"{type(module).__name__} is not affine")

    def _function(self, target: Callable, args: list, kwargs: dict) -> tuple[Rep, str, int]:
        if target in _ADD or target in _SUB:
            if "alpha" in kwargs or len(args) != 2:
                raise _Stop("add with alpha")
            return self._add(args[0], args[1], -1.0 if target in _SUB else 1.0)
        if target in _MUL:
            return self._mul(args[0], args[1])
        if target in _DIV:
            if kwargs.get("rounding_mode") is not None or len(args) != 2:
                raise _Stop("rounding division")
            if not isinstance(args[0], (Spatial, Dense)) or isinstance(args[1], (Spatial, Dense)):
                raise _Stop("division by a filtered value")
            return self._scale(args[0], args[1], divide=True)
        if target in _NEG:
            return self._scale(args[0], -1.0)
        if target is torch.cat:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self._cat(tensors, dim)
        if target is torch.flatten:
            return self._flatten(args[0], *(args[1:] or [kwargs.get("start_dim", 0)]), kwargs.get("end_dim", -1))
        if target is torch.mean:
            return self._mean(args[0], args[1] if len(args) > 1 else kwargs.get("dim"), args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if target is F.adaptive_avg_pool2d:
            return self._adaptive_pool(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        if target is F.avg_pool2d:
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            params = dict(zip(names, args[1:]), **kwargs)
            return self._avg_pool(args[0], params["kernel_size"], params.get("stride"), params.get("padding", 0), params.get("divisor_override"))
        if target is F.dropout:
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if training:
                raise _Stop("dropout in training mode")
            return args[0], "dropout", 0
        if target is F.conv2d:
            names = ["weight", "bias", "stride", "padding", "dilation", "groups"]
            params = dict(zip(names, args[1:]), **kwargs)
            weight = self.static_tensor(params["weight"], "conv weight")
            bias = self.static_tensor(params.get("bias"), "conv bias")
            kernel = tuple(weight.shape[2:])
            dilation = _pair(params.get("dilation", 1))
            padding = _conv_padding(params.get("padding", 0), kernel, dilation)
            return self._conv(args[0], weight, bias, _pair(params.get("stride", 1)), padding, dilation, params.get("groups", 1))
        if target is F.linear:
            params = dict(zip(["weight", "bias"], args[1:]), **kwargs)
            return self._linear(args[0], self.static_tensor(params["weight"], "weight"), self.static_tensor(params.get("bias"), "bias"))
        raise _Stop(f"{getattr(target, '__name__', target)} is not affine")

    def _method(self, name: str, args: list, kwargs: dict) -> tuple[Rep, str, int]:
        x = args[0]
        if name in ("add", "sub", "__add__", "__sub__", "__radd__"):
            if "alpha" in kwargs:
                raise _Stop("add with alpha")
            return self._add(x, args[1], -1.0 if "sub" in name else 1.0)
        if name in ("mul", "__mul__", "__rmul__"):
            return self._mul(x, args[1])
        if name in ("div", "__truediv__") and not kwargs:
            return self._scale(x, args[1], divide=True)
        if name == "neg":
            return self._scale(x, -1.0)
        if name == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self._flatten(x, start, end)
        if name == "mean":
            return self._mean(x, args[1] if len(args) > 1 else kwargs.get("dim"), args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if name == "contiguous":
            return x, "contiguous", 0
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return self._permute(x, list(dims))
        raise _Stop(f".{name}() is not folded")

    # op implementations -------------------------------------------------------------------------

    def _conv(self, x, weight, bias, stride, padding, dilation, groups) -> tuple[Rep, str, int]:
        if not isinstance(x, Spatial):
            raise _Stop("convolution of a pooled value")
        weight = weight.detach().to(self.like.dtype)
        bias = None if bias is None else bias.detach().to(self.like.dtype)
        rep, _ = conv2d(x, weight, bias, stride, padding, dilation, groups, self.grid, self.budget)
        out_c, per_group, kh, kw = weight.shape
        _, out_h, out_w = rep.grid_shape
        op = f"conv {kh}x{kw} s{stride[0]} p{padding[0]} d{dilation[0]} g{groups}"
        return rep, op, out_c * per_group * kh * kw * out_h * out_w

    def _batch_norm(self, x, mean, var, weight, bias, eps) -> tuple[Rep, str, int]:
        if isinstance(x, Spatial) and x.flat:
            raise _Stop("batch norm of a flattened map")
        dtype = self.like.dtype
        inv = torch.rsqrt(var.detach().to(dtype) + eps)
        factor = inv if weight is None else inv * weight.detach().to(dtype)
        offset = -mean.detach().to(dtype) * factor
        if bias is not None:
            offset = offset + bias.detach().to(dtype)
        shape = x.shape
        view = (-1,) + (1,) * (len(shape) - 1)
        factor = _as_const(factor.view(view), shape, self.n, self.like)
        offset = _as_const(offset.view(view), shape, self.n, self.like)
        return shift(scale(x, factor), offset), "batchnorm", self._numel(x)

    def _scale(self, x, factor, divide: bool = False) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)) or isinstance(factor, (Spatial, Dense)):
            raise _Stop("product of filtered values")
        return scale(x, _as_const(factor, x.shape, self.n, self.like), divide), "scale", self._numel(x)

    def _mul(self, a, b) -> tuple[Rep, str, int]:
        if isinstance(a, (Spatial, Dense)) and isinstance(b, (Spatial, Dense)):
            raise _Stop("product of two filtered values")
        if not isinstance(a, (Spatial, Dense)):
            a, b = b, a
        return self._scale(a, b)

    def _add(self, a, b, sign: float) -> tuple[Rep, str, int]:
        a_rep, b_rep = isinstance(a, (Spatial, Dense)), isinstance(b, (Spatial, Dense))
        if a_rep and b_rep:
            return combine(a, b, sign), "add" if sign > 0 else "sub", self._numel(a)
        if a_rep:
            const = _as_const(b, a.shape, self.n, self.like)
            return shift(a, const * sign), "add constant", self._numel(a)
        # constant - value or constant + value
        const = _as_const(a, b.shape, self.n, self.like)
        rep = b if sign > 0 else scale(b, _as_const(-1.0, b.shape, self.n, self.like))
        return shift(rep, const), "add constant", self._numel(b)

    def _cat(self, tensors, dim) -> tuple[Rep, str, int]:
        reps = [t for t in tensors if isinstance(t, (Spatial, Dense))]
        if not reps:
            raise _Stop("cat of constants")
        ndim = len(reps[0].shape) + 1
        if dim % ndim != 1:
            raise _Stop("cat along a non-channel dim")
        rep = concat(list(tensors), self.n, reps[0])
        return rep, "cat", self._numel(rep)

    def _flatten(self, x, start, end) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)):
            raise _Stop("flatten form")
        ndim = len(x.shape) + 1
        if start % ndim != 1 or end % ndim != ndim - 1:
            raise _Stop("flatten other than from dim 1")
        if isinstance(x, Dense):
            return Dense(x.matrix, x.const, (math.prod(x.shape),)), "flatten", 0
        return Spatial(x.bases, x.keys, x.const, flat=True), "flatten", 0

    def _mean(self, x, dims, keepdim) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)) or len(x.shape) != 3 or not _spatial_dims(dims, 4):
            raise _Stop("mean other than over the spatial dims")
        return self._global_pool(x, bool(keepdim), "mean")

    def _global_pool(self, x, keepdim: bool, op: str) -> tuple[Rep, str, int]:
        if isinstance(x, Dense):
            if x.shape[1:] != (1, 1):
                raise _Stop("pooling a pooled value of another shape")
            return Dense(x.matrix, x.const, x.shape if keepdim else x.shape[:1]), op, 0
        if x.flat:
            raise _Stop("pooling a flattened map")
        return global_mean(x, self.grid, keepdim), op, self._numel(x)

    def _adaptive_pool(self, x, size) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)) or len(x.shape) != 3:
            raise _Stop("adaptive pool form")
        _, height, width = x.shape
        size = _pair(size)
        size = (height if size[0] is None else size[0], width if size[1] is None else size[1])
        if size == (height, width):
            return x, "adaptive pool (identity)", 0
        if _is_unit(size):
            return self._global_pool(x, True, "adaptive pool 1x1")
        raise _Stop(f"adaptive pool {height}x{width} -> {size[0]}x{size[1]}")

    def _avg_pool(self, x, kernel, stride, padding, divisor) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)) or len(x.shape) != 3:
            raise _Stop("avg pool form")
        if divisor is not None or _pair(padding) != (0, 0) or _pair(kernel) != tuple(x.shape[1:]):
            raise _Stop("avg pool over less than the whole grid")
        return self._global_pool(x, True, "avg pool (global)")

    def _linear(self, x, weight, bias) -> tuple[Rep, str, int]:
        if not isinstance(x, (Spatial, Dense)):
            raise _Stop("linear form")
        weight = weight.detach().to(self.like.dtype)
        bias = None if bias is None else bias.detach().to(self.like.dtype)
        rep = linear(x, weight, bias, self.grid, self.budget)
        return rep, f"linear {weight.shape[1]}->{weight.shape[0]}", weight.numel()

    def _permute(self, x, dims) -> tuple[Rep, str, int]:
        if not isinstance(x, Dense) or len(dims) != len(x.shape) + 1 or dims[0] % len(dims) != 0:
            raise _Stop("permute of a spatial value")
        perm = [d % len(dims) - 1 for d in dims[1:]]
        n, f, hw = x.matrix.shape
        matrix = x.matrix.view(n, *x.shape, hw).permute(0, *(p + 1 for p in perm), len(dims)).reshape(n, f, hw)
        const = None
        if x.const is not None:
            c = x.const.view(x.const.shape[0], *x.shape).permute(0, *(p + 1 for p in perm))
            const = c.reshape(c.shape[0], f)
        shape = tuple(x.shape[p] for p in perm)
        return Dense(matrix, const, shape), "permute", 0

    # the pass ------------------------------------------------------------------------------------

    def run(self) -> FoldedTail:
        graph = self.gm.graph
        steps: list[FoldStep] = []
        _, channels, height, width = self.features.shape
        self.reps[self.feature] = Spatial(self.features[:, None], [IDENTITY], None)
        for node in graph.nodes:
            if node.op in ("placeholder", "output") or node not in self.depends:
                continue
            try:
                with torch.no_grad():
                    rep, op, detail = self.fold(node)
                self.reps[node] = rep
                steps.append(FoldStep(node.name, op, True, detail))
            except _Stop as reason:
                if all(a in self.reps or a not in self.depends for a in node.all_input_nodes):
                    steps.append(FoldStep(node.name, _op_name(node, self.modules), False, str(reason)))
        return self._build(steps)

    def _build(self, steps: list[FoldStep]) -> FoldedTail:
        graph = self.gm.graph
        folded = set(self.reps)
        frontier = [n for n in graph.nodes if n in folded and any(u not in folded for u in n.users)]
        rest = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in frontier:
            env[node] = rest.placeholder(f"folded_{node.name}")
        captured_nodes = self.placeholders[1:]
        for node in captured_nodes:
            env[node] = rest.placeholder(node.name)
        for node in graph.nodes:
            if node.op == "placeholder" or node in folded:
                continue
            if node.op == "output":
                rest.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
            else:
                env[node] = rest.node_copy(node, lambda n: env[n])
        rest_module = fx.GraphModule(self.gm, rest)
        rest_module.graph.eliminate_dead_code()
        used = [i for i, node in enumerate(captured_nodes) if env[node].users]
        for i, node in enumerate(captured_nodes):
            if i not in used:
                rest_module.graph.erase_node(env[node])
        rest_module.recompile()
        materializers = [(n.name, Materializer(self.reps[n], self.grid)) for n in frontier]
        captured = [self.captured[i] for i in used]
        return FoldedTail(materializers, rest_module, captured, self.grid, self.features.dtype, steps)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def fold_tail(
    tail_graph_module: fx.GraphModule,
    features: torch.Tensor,
    captured: list[torch.Tensor],
    budget: int = DEFAULT_BUDGET,
) -> FoldedTail:
    """Fold the affine prefix of `tail(feature, *captured) -> output` for the images of `features`.

    `features` (N, C, H, W) and `captured` (each (N, ...)) are the per-image values the tail reads;
    `budget` bounds the elements stored per image for any folded value.  The result is called as
    folded(g, image_index) with g (P, H, W) the multiplier of P problems and returns what
    tail(features[image_index] * g[:, None], *captured[image_index]) returns, differentiable in g.
    """
    return _Folder(tail_graph_module, features, captured, budget).run()


def fold_prefix(tail: Tail, features: torch.Tensor) -> Optional[FoldedTail]:
    """The folded form of an extracted tail, or None where nothing folds (or the tail is the hook
    tail, which reruns the whole model)."""
    if not isinstance(tail, FxTail):
        return None
    folded = fold_tail(tail.graph_module, features, tail.captured)
    return folded if folded.folded else None
