"""The generic path on CUDA: each evaluation of the tail replayed from a captured CUDA graph.

A batch-1 tail is hundreds of small kernels, and on a GPU their launches, not their arithmetic, set
the pace.  The loop evaluates the same active problems between two checks (the same `active`
tensor: it is replaced only when problems stop), so the evaluation (filter, tail forward, loss,
backward to the filter) is captured once per active set and replayed:
the same kernels on the same memory, so the same numbers as the eager evaluation.  Anything that
cannot be captured (a user objective that synchronizes, an op without graph support) makes the
problem fall back to eager evaluation for good.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ...core.loop import Problem

WARMUP_EVALUATIONS = 2  # eager runs on a side stream before a capture, as torch.cuda.graph asks


class GraphedProblem:
    """`problem`, its loss_and_grad replayed from a CUDA graph for each active set."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.pool = torch.cuda.graph_pool_handle()
        self.source: Optional[torch.Tensor] = None  # the `active` tensor the graph was captured for
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # params, loss, grad
        self.eager = False

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eager:
            return self.problem.loss_and_grad(params, active)
        if active is not self.source:
            if not self._capture(params, active):
                return self.problem.loss_and_grad(params, active)
        static_params, static_loss, static_grad = self.static
        static_params.copy_(params)
        self.graph.replay()
        return static_loss.clone(), static_grad.clone()

    def _capture(self, params: torch.Tensor, active: torch.Tensor) -> bool:
        self.graph, self.static, self.source = None, None, None
        static_params, static_active = params.clone(), active.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_EVALUATIONS):
                    self.problem.loss_and_grad(static_params, static_active)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_loss, static_grad = self.problem.loss_and_grad(static_params, static_active)
        except Exception as error:  # capture is an optimization: evaluate eagerly instead
            warnings.warn(f"caffast: the tail cannot be captured in a CUDA graph ({error}); evaluating it eagerly",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            self.eager = True
            return False
        self.graph, self.source = graph, active
        self.static = (static_params, static_loss, static_grad)
        return True
