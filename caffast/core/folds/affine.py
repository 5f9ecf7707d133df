"""The affine values of a folded tail and the rules that compose them.

A value of the tail that is affine in the filter g (P, H, W) is one of two kinds:

* `Spatial`, a (P, O, H', W') value (or its flattening): a sum of terms plus a constant,

      V[p, :, y, x] = sum_t B_t[n, :, y, x] * g[p, oy_t + sy_t * y, ox_t + sx_t * x] + c[n, :, y, x]

  with n = image_index[p] and g taken as zero outside its H x W grid.  A term is a basis B_t (stored
  per image, (N, O, H', W')) and a placement key (oy, ox, sy, sx): where the output cell (y, x) reads
  the filter.  The feature map itself is one term, key (0, 0, 1, 1).  A k x k convolution maps every
  term to k^2 terms (one per kernel offset, B_d = W_d applied to the shifted basis; strides multiply,
  offsets add), and terms with equal keys are summed, so two stacked 3 x 3 convolutions give the 25
  keys of a 5 x 5 window, not 81 terms.  Elementwise affine ops (BatchNorm, scaling, adding a constant)
  act on every basis and on the constant.  `flat` marks a value that was flattened to (P, O*H'*W')
  (kept spatial until a Linear consumes it).  On a (D, H, W) grid everything gains the depth axis: a
  key is (oz, oy, ox, sz, sy, sx), and a k x k x k convolution gives k^3 terms.
* `Dense`, a value of any per-problem shape S, F = prod(S) entries, reached by pooling or a Linear:
  V[p] = (M[n] @ g[p].flatten() + c[n]).view(S), M (N, F, HW).

Every composition raises `Unfoldable` where its result would not be affine or not be representable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import itertools
import math

import torch
import torch.nn.functional as F

# a term's placement: one offset per grid axis, then one stride per axis ((oy, ox, sy, sx) on (H, W))
Key = tuple[int, ...]
_CONVOLUTIONS = {2: F.conv2d, 3: F.conv3d}  # by the rank of the grid


def identity_key(rank: int) -> Key:
    """The placement of the feature map itself on a grid of `rank` axes."""
    return (0,) * rank + (1,) * rank


class Unfoldable(Exception):
    """Folding stops at this node; the message says why."""

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
        return (math.prod(self.grid_shape),) if self.flat else self.grid_shape

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """(O, H', W'), or (O, D', H', W')."""
        return tuple(self.bases.shape[2:])

    def cost(self) -> int:
        """Multiply-adds per problem to materialize it (and the elements stored per image)."""
        return self.bases[0].numel()

    def describe(self) -> str:
        terms = len(self.keys)
        return f"{terms} term{'s' if terms > 1 else ''} x {'x'.join(map(str, self.grid_shape))}" + (
            " flat" if self.flat else "")  # fmt: skip


@dataclass
class Dense:
    """(matrix @ g.flatten() + const).view(shape): any value that no longer has the filter's grid."""

    matrix: torch.Tensor  # (N, F, HW)
    const: Optional[torch.Tensor]  # (N or 1, F)
    shape: tuple[int, ...]

    def cost(self) -> int:
        return self.matrix[0].numel()

    def describe(self) -> str:
        return f"dense {self.matrix.shape[1]}x{self.matrix.shape[2]} -> {self.shape}"


Rep = Union[Spatial, Dense]


@dataclass
class Static:
    """A value that does not depend on the filter; `batched`: its leading dim is the image (N)."""

    value: Any
    batched: bool


# ------------------------------------------------------------------------------------------------
# placements


def placement_index(key: Key, out_shape: tuple[int, ...], grid: tuple[int, ...], device) -> torch.Tensor:
    """Flat index into g (HW, with HW meaning 'outside the grid, zero') of each output cell."""
    rank = len(grid)
    index = torch.zeros((1,) * rank, dtype=torch.long, device=device)
    inside = torch.ones((1,) * rank, dtype=torch.bool, device=device)
    for axis, (size, cells) in enumerate(zip(out_shape, grid)):
        along = [1] * rank
        along[axis] = size
        read = (key[axis] + key[rank + axis] * torch.arange(size, device=device)).view(along)
        inside = inside & (read >= 0) & (read < cells)
        index = index * cells + read
    return torch.where(inside, index, torch.full_like(index, math.prod(grid))).flatten()


def _touches_grid(key: Key, out_shape: tuple[int, ...], grid: tuple[int, ...]) -> bool:
    rank = len(grid)
    return all(
        any(0 <= key[axis] + key[rank + axis] * i < grid[axis] for i in range(out_shape[axis])) for axis in range(rank)
    )


# ------------------------------------------------------------------------------------------------
# constants


def as_const(operand: Any, shape: tuple[int, ...], n_images: int, like: torch.Tensor) -> torch.Tensor:
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
        raise Unfoldable(f"operand of type {type(value).__name__}")
    value = value.to(dtype=like.dtype, device=like.device)
    dims = len(shape) + 1
    if batched:
        rest = value.shape[1:]
        if len(rest) > len(shape):
            raise Unfoldable("a per-image operand of higher rank")
        value = value.reshape(value.shape[0], *(1,) * (len(shape) - len(rest)), *rest)
    else:
        if value.dim() > dims:
            raise Unfoldable("an operand of higher rank")
        value = value.reshape(*(1,) * (dims - value.dim()), *value.shape)
        if value.shape[0] != 1:
            raise Unfoldable("an operand with its own batch dimension")
    try:
        broadcast = torch.broadcast_shapes(value.shape[1:], shape)
    except RuntimeError as error:
        raise Unfoldable("operand shapes do not broadcast") from error
    if tuple(broadcast) != tuple(shape):
        raise Unfoldable("the operand broadcasts the value to a larger shape")
    if value.shape[0] not in (1, n_images):
        raise Unfoldable("operand batch mismatch")
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
    """rep * factor (or rep / factor), factor a constant broadcastable to the value (see as_const)."""
    op = torch.div if divide else torch.mul
    if isinstance(rep, Spatial):
        if rep.flat:
            raise Unfoldable("scaling a flattened map")
        const = None if rep.const is None else op(rep.const, factor)
        return Spatial(op(rep.bases, factor.unsqueeze(1)), rep.keys, const)
    flat = _flat_const(factor, rep.shape)
    const = None if rep.const is None else op(rep.const, flat)
    return Dense(op(rep.matrix, flat[..., None]), const, rep.shape)


def shift(rep: Rep, offset: torch.Tensor) -> Rep:
    """rep + offset, offset a constant broadcastable to the value."""
    if isinstance(rep, Spatial):
        if rep.flat:
            raise Unfoldable("shifting a flattened map")
        return Spatial(rep.bases, rep.keys, _add_consts(rep.const, offset))
    return Dense(rep.matrix, _add_consts(rep.const, _flat_const(offset, rep.shape)), rep.shape)


def combine(a: Rep, b: Rep, sign: float = 1.0) -> Rep:
    """a + sign * b for two affine values of the same kind and shape."""
    if type(a) is not type(b) or a.shape != b.shape:
        raise Unfoldable("adding values of different kinds or shapes")
    b_const = None if b.const is None else b.const * sign
    if isinstance(a, Dense):
        return Dense(a.matrix + sign * b.matrix, _add_consts(a.const, b_const), a.shape)
    if a.flat or b.flat:
        raise Unfoldable("adding flattened maps")
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
        raise Unfoldable("concatenating spatial and pooled values")
    like = like_rep.bases if isinstance(like_rep, Spatial) else like_rep.matrix
    if kinds == {Dense}:
        shapes = [r.shape if isinstance(r, Dense) else None for r in reps]
        tail_shape = next(s for s in shapes if s is not None)[1:]
        parts_m, parts_c, channels = [], [], 0
        hw = like.shape[-1]
        for r in reps:
            if isinstance(r, Dense):
                if r.shape[1:] != tail_shape:
                    raise Unfoldable("concatenating pooled values of different shapes")
                parts_m.append(r.matrix)
                const = r.const if r.const is not None else like.new_zeros(1, r.matrix.shape[1])
                parts_c.append(const)
                channels += r.shape[0]
            else:
                value = r.value if isinstance(r, Static) else r
                shape = (value.shape[-len(tail_shape) - 1],) + tail_shape
                const = _flat_const(as_const(r, shape, n_images, like), shape)
                parts_m.append(like.new_zeros(1, const.shape[1], hw).expand(n_images, -1, -1))
                parts_c.append(const)
                channels += shape[0]
        n = max(c.shape[0] for c in parts_c)
        const = torch.cat([c.expand(n, -1) for c in parts_c], 1)
        return Dense(torch.cat(parts_m, 1), const, (channels,) + tail_shape)
    spatial = [r for r in reps if isinstance(r, Spatial)]
    if any(r.flat for r in spatial):
        raise Unfoldable("concatenating flattened maps")
    cells = spatial[0].grid_shape[1:]
    if any(r.grid_shape[1:] != cells for r in spatial):
        raise Unfoldable("concatenating maps of different grids")
    keys = list(dict.fromkeys(k for r in spatial for k in r.keys))
    n_b = like.shape[0]
    bases, consts, has_const = [], [], False
    for r in reps:
        if isinstance(r, Spatial):
            channels = r.grid_shape[0]
            block = like.new_zeros(n_b, len(keys), channels, *cells)
            for t, key in enumerate(r.keys):
                block[:, keys.index(key)] = r.bases[:, t]
            const = r.const
        else:
            value = r.value if isinstance(r, Static) else r
            channels = value.shape[-1 - len(cells)]
            block = like.new_zeros(1, len(keys), channels, *cells).expand(n_b, -1, -1, *cells)
            const = as_const(r, (channels, *cells), n_images, like)
        has_const = has_const or const is not None
        bases.append(block)
        consts.append((const, channels))
    const = None
    if has_const:
        n = max(c.shape[0] for c, _ in consts if c is not None)
        const = torch.cat(
            [
                (c if c is not None else like.new_zeros(1, ch, *(1,) * len(cells))).expand(n, ch, *cells)
                for c, ch in consts
            ],
            1,
        )
    return Spatial(torch.cat(bases, 2), keys, const)


def convolve(
    rep: Spatial,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    grid: tuple[int, ...],
    budget: int,
) -> tuple[Spatial, int]:
    """A zero-padded convolution (2-D, or 3-D on a (D, H, W) grid) of a spatial value: every term
    becomes one term per kernel offset.

    Returns the new value and its cost per problem.  Raises Unfoldable when it would not fit the budget.
    """
    if rep.flat:
        raise Unfoldable("convolving a flattened map")
    rank = len(grid)
    n, _, channels, *cells = rep.bases.shape
    out_c, _, *kernel = weight.shape
    if len(kernel) != rank:
        raise Unfoldable(f"a {len(kernel)}-D convolution of a map with {rank} grid axes")
    out_shape = tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(cells, kernel, stride, padding, dilation)
    )
    taps = list(itertools.product(*(range(k) for k in kernel)))
    targets: dict[Key, list[tuple[int, tuple[int, ...]]]] = {}
    for t, key in enumerate(rep.keys):
        offsets, strides = key[:rank], key[rank:]
        for tap in taps:
            moved = tuple(o + s * (d * i - p) for o, s, d, i, p in zip(offsets, strides, dilation, tap, padding))
            placed = moved + tuple(s * step for s, step in zip(strides, stride))
            if _touches_grid(placed, out_shape, grid):
                targets.setdefault(placed, []).append((t, tap))
    cost = max(len(targets), 1) * out_c * math.prod(out_shape)
    if cost > budget:
        raise Unfoldable(f"{len(targets)} terms x {out_c}x{'x'.join(map(str, out_shape))} exceed the budget")
    # all k^2 one-offset products of a term at once: a 1 x 1 convolution with O * k^2 outputs
    wide = weight.permute(0, *range(2, 2 + rank), 1).reshape(out_c * len(taps), -1, *(1,) * rank)
    convolution = _CONVOLUTIONS[rank]
    pad = [p for size in reversed(padding) for p in (size, size)]  # F.pad's order: the last axis first
    products = {}
    for t in {t for parts in targets.values() for t, _ in parts}:
        padded = F.pad(rep.bases[:, t], pad)
        products[t] = convolution(padded, wide, groups=groups).view(n, out_c, *kernel, *padded.shape[2:])
    keys, bases = [], []
    for key, parts in targets.items():
        total = None
        for t, tap in parts:
            window = tuple(
                slice(d * i, d * i + s * (size - 1) + 1, s) for d, i, s, size in zip(dilation, tap, stride, out_shape)
            )
            piece = products[t][(slice(None), slice(None), *tap, *window)]
            total = piece if total is None else total + piece
        keys.append(key)
        bases.append(total)
    if not bases:  # every term falls outside the grid: only the constant is left
        keys, bases = [identity_key(rank)], [rep.bases.new_zeros(n, out_c, *out_shape)]
    const = None
    if rep.const is not None:
        full = rep.const.expand(rep.const.shape[0], channels, *cells)
        const = convolution(full, weight, bias, stride, padding, dilation, groups)
    elif bias is not None:
        const = bias.view(1, -1, *(1,) * rank)
    return Spatial(torch.stack(bases, 1), keys, const), cost


def global_mean(rep: Spatial, grid: tuple[int, ...], keepdim: bool) -> Dense:
    """Mean over the spatial dims of a spatial value: a (O, HW) matrix per image."""
    n, _, channels, *spatial = rep.bases.shape
    cells = math.prod(spatial)
    hw = math.prod(grid)
    matrix = rep.bases.new_zeros(n, channels, hw + 1)
    for t, key in enumerate(rep.keys):
        index = placement_index(key, spatial, grid, rep.bases.device)
        matrix.index_add_(2, index, rep.bases[:, t].reshape(n, channels, cells) / cells)
    const = None if rep.const is None else rep.const.mean(dim=tuple(range(2, 2 + len(spatial))))
    shape = (channels, *(1,) * len(spatial)) if keepdim else (channels,)
    return Dense(matrix[..., :hw], const, shape)


def linear(rep: Rep, weight: torch.Tensor, bias: Optional[torch.Tensor], grid: tuple[int, ...], budget: int) -> Dense:
    """y = x W^T + b for a flat value: a dense value, or a flattened map (the W1 contraction of VGG)."""
    out_f = weight.shape[0]
    hw = math.prod(grid)
    if out_f * hw > budget:
        raise Unfoldable(f"a {out_f} x {hw} matrix exceeds the budget")
    if isinstance(rep, Dense):
        if len(rep.shape) != 1:
            raise Unfoldable("Linear over a non-flat pooled value")
        matrix = torch.matmul(weight, rep.matrix)
        const = None if rep.const is None else rep.const @ weight.t()
    else:
        if not rep.flat:
            raise Unfoldable("Linear over the last dim of a spatial map")
        n, _, channels, *spatial = rep.bases.shape
        cells = math.prod(spatial)
        reshaped = weight.view(out_f, channels, cells)
        matrix = rep.bases.new_zeros(n, out_f, hw + 1)
        # C_t[:, k, q] = sum_o W[k, o, q] B_t[:, o, q], by cell chunks (bounded temporary memory)
        chunk = max(1, (1 << 24) // max(1, out_f * channels))
        for t, key in enumerate(rep.keys):
            index = placement_index(key, spatial, grid, rep.bases.device)
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
            full = rep.const.expand(rep.const.shape[0], channels, *spatial).reshape(rep.const.shape[0], -1)
            const = full @ weight.t()
    if bias is not None:
        const = _add_consts(const, bias.view(1, -1))
    return Dense(matrix, const, (out_f,))


# ------------------------------------------------------------------------------------------------
