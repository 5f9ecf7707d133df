"""The folded tail: the affine prefix materialized per evaluation, the remaining ops run with autograd."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .affine import Rep, Spatial, identity_key, placement_index


@dataclass
class FoldStep:
    """One node of the tail: folded or not, and why."""

    node: str
    op: str
    folded: bool
    detail: str


class Materializer:
    """Evaluates one folded value for a batch of problems: (g_ext (P, HW + 1), image_index) -> value."""

    def __init__(self, rep: Rep, grid: tuple[int, ...]):
        self.rep = rep
        self.grid = grid
        if isinstance(rep, Spatial):
            cells = tuple(rep.bases.shape[3:])
            self.direct = rep.keys == [identity_key(len(grid))] and cells == tuple(grid)
            self.index = torch.stack([placement_index(k, cells, grid, rep.bases.device) for k in rep.keys])
        else:
            # (N, HW, F): g as a row vector times a (HW, F) matrix is a fast product on CPU, unlike
            # a batched matrix-vector product (3 to 6 times slower, forward and backward)
            rep.matrix = rep.matrix.transpose(1, 2).contiguous().transpose(1, 2)  # one storage
            self.transposed = rep.matrix.transpose(1, 2)

    def __call__(self, g: torch.Tensor, g_ext: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        rep = self.rep
        if isinstance(rep, Spatial):
            bases = rep.bases.index_select(0, image_index)  # (P, T, O, H', W')
            p, terms, _, *spatial = bases.shape
            if self.direct:
                value = bases[:, 0] * g[:, None]
            else:
                cells = g_ext[:, self.index].view(p, terms, 1, *spatial)
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


class FoldedTail:
    """The tail with its affine prefix folded: (g (P, *grid), image_index (P,)) -> output.

    `steps` lists every node that depends on the filter and whether it was folded (`report()` prints
    them); `frontier` names the folded values materialized per evaluation; `rest` is the fx graph of
    the remaining ops, run with autograd.
    """

    def __init__(
        self,
        frontier: list[tuple[str, Materializer]],
        rest: fx.GraphModule,
        captured: list[torch.Tensor],
        grid: tuple[int, ...],
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
        lines.append("frontier: " + ", ".join(f"{name} ({m.rep.describe()})" for name, m in self.frontier))
        return "\n".join(lines)
