"""The fused head in a program's registers: FT[k] = sum_j M[sigma_j, k, j] g_j / HW + b_k for a block of
classes, and the transposed product that gives its gradient in g.

sigma_j picks M+ or M- by the sign of g_j after a ReLU (docs/design.md, 'The fused head').  Device
functions of the fused solver (its log-softmax loss reads FT; every mode splits the cells by sign); the
tests run them on their own against the plain PyTorch head through small probe kernels.
"""

from __future__ import annotations

from .runtime import device_function, tl, tl_core, tl_sum  # noqa: F401 (tl_core: see runtime)


@device_function
def negative_cells(g, cell, SIGNS: tl.constexpr):
    """The cells that use part 1 (g < 0) after a ReLU; none for a plain head (S = 1).  NaN counts as
    negative, as in torch.where(g >= 0, ...)."""
    negative = cell < 0
    if SIGNS == 2:
        negative = ~(g >= 0)
    return negative


@device_function
def head_logits(g, cell, inside, part, products, bias, ks, class_count, CELLS: tl.constexpr):
    """FT for the classes `ks` (a block; -inf past the last class): sum_j M[s_j, k, j] g_j / HW + b_k,
    and the block's tile of M (zero past the last class and off the grid)."""
    present = ks < class_count
    tile = tl.load(products + (part[None, :] * class_count + ks[:, None]) * CELLS + cell[None, :],
                   mask=present[:, None] & inside[None, :], other=0.0)  # fmt: skip
    logits = tl_sum(tile * g[None, :], axis=1) / CELLS + tl.load(bias + ks, mask=present, other=0.0)
    return tl.where(present, logits, float("-inf")), tile


@device_function
def head_gradient(tile, weight):
    """sum over the block's classes k of weight_k M[s_j, k, j]: the transposed product, before the / HW."""
    return tl_sum(tile * weight[:, None], axis=0)
