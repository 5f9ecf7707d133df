"""Fold the affine prefix of a tail: apply the ops that are affine in the filter once per image.

The ops right after a breakpoint (convolutions, eval BatchNorm, pooling, Linear, additions of captured
values ...) are often affine in the filtered map, hence in the filter: they are applied to the feature
map once and every evaluation of the tail starts after them (the algebra of fused heads, carried past
the head).  `affine` holds the folded values and their composition rules, `fold` the pass over the
tail graph with its table of op rules, `tail` the folded tail the solvers call.  Nothing here needs
more than torch and fx.
"""

from .affine import Dense, Spatial, Unfoldable
from .fold import DEFAULT_BUDGET, fold_prefix, fold_tail
from .tail import FoldedTail, FoldStep

__all__ = [
    "DEFAULT_BUDGET",
    "Dense",
    "FoldStep",
    "FoldedTail",
    "Spatial",
    "Unfoldable",
    "fold_prefix",
    "fold_tail",
]
