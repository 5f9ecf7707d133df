"""The Triton tests under the Triton interpreter, so that a run without a GPU covers the kernels.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported, hence a subprocess.
On a machine with a CUDA GPU, tests/backends/test_triton.py runs the compiled kernels directly instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = not torch.cuda.is_available()
INTERPRETED = ("tests/backends/test_triton.py", "tests/backends/test_triton_explain.py")  # the files that run under the interpreter, in one subprocess


@pytest.mark.skipif(not NO_GPU, reason="the GPU runs tests/backends/test_triton.py directly")
def test_triton_kernels_pass_under_the_interpreter():
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *INTERPRETED],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1:] or [""]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]


@pytest.mark.skipif(not NO_GPU or os.environ.get("TRITON_INTERPRET") == "1", reason="the kernels can run here")
def test_cpu_tensors_without_the_interpreter_are_refused_clearly():
    pytest.importorskip("triton")
    from caffast.backends import triton

    assert not triton.available()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton.hadamard_forward(torch.ones(1, 2, 3, 3), torch.ones(1, 3, 3))


def _signature(kernel, dtype: str, ints: tuple = (), int64_pointers: tuple = (), **constexprs) -> dict:
    """Argument types for triton.compile: pointers to `dtype` unless named otherwise."""
    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        return "i32" if name in ints else "*i64" if name in int64_pointers else f"*{dtype}"

    return {name: kind(name) for name in kernel.arg_names}


@pytest.mark.skipif(not NO_GPU, reason="the GPU compiles and runs the kernels in tests/backends/test_triton.py")
def test_kernels_compile_for_a_cuda_gpu():
    """The interpreter runs kernels as Python and skips the compiler's checks (types of loop-carried
    values and of returns, which globals a kernel may read): compile for sm_90, which needs no GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton_probes
    from caffast.backends.triton import fused_solver, hadamard

    def compile_(kernel, dtype, ints=(), int64_pointers=(), num_warps=4, **constexprs):
        signature = _signature(kernel, dtype, ints, int64_pointers, **constexprs)
        source = ASTSource(kernel, signature, constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    sizes = ("channels", "cells")
    for dtype in ("fp32", "fp64"):
        compile_(hadamard.forward_kernel, dtype, sizes, BLOCK_C=64, BLOCK_HW=64)
        compile_(hadamard.backward_kernel, dtype, sizes, BLOCK_C=64, BLOCK_HW=64)
        for signs in (1, 2):
            heads = dict(ints=("class_count",), CELLS=49, SIGNS=signs, BLOCK_N=64, BLOCK_K=64)
            compile_(triton_probes.head_forward_kernel, dtype, **heads)
            compile_(triton_probes.head_backward_kernel, dtype, **heads)
        for optimizer in ("sgd", "adam"):
            compile_(triton_probes.projected_step_kernel, dtype, ("dim",), ("active",), BLOCK_D=64, OPTIMIZER=optimizer)

    # every branch of the solver: each (mode, constraint) once, with both optimizers and part counts
    cases = [
        ("oblivious", "l2norm", "sgd", 1, "fp64", (7, 7)),
        ("oblivious", "softmax", "adam", 2, "fp64", (7, 7)),
        ("oblivious", "gauss", "sgd", 2, "fp64", (7, 7)),
        ("specific", "l2norm", "adam", 2, "fp64", (7, 7)),
        ("specific", "softmax", "sgd", 1, "fp64", (7, 7)),
        ("specific", "gauss", "adam", 1, "fp64", (7, 7)),
        ("oblivious", "l2norm", "adam", 2, "fp64", (14, 14)),
        ("oblivious", "softmax", "sgd", 2, "fp32", (3, 4)),
        ("log_softmax", "l2norm", "adam", 2, "fp64", (7, 7)),
        ("log_softmax", "gauss", "sgd", 1, "fp32", (3, 4)),
    ]
    for mode, constraint, optimizer, signs, dtype, grid in cases:
        cells = grid[0] * grid[1]
        block_n, block_r = fused_solver.tiles(cells)
        compile_(
            fused_solver.kernel, dtype, ints=("class_count",), int64_pointers=("image", "targets", "iterations"),
            num_warps=fused_solver.warps(block_n), HEIGHT=grid[0], WIDTH=grid[1],
            DIM=2 if constraint == "gauss" else cells, SIGNS=signs, MODE=mode, CONSTRAINT=constraint,
            OPTIMIZER=optimizer, BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip


@pytest.mark.skipif(not NO_GPU, reason="the GPU compiles and runs the kernels in tests/test_triton.py")
def test_solver_compiles_for_a_gaussian_on_a_volume_grid():
    """A (D, H, W) grid reaches the solver flattened to (D * H) x W; the Gaussian's mean has three
    coordinates (DIM 3)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from caffast.backends.triton import fused_solver

    block_n, block_r = fused_solver.tiles(12)
    constexprs = dict(HEIGHT=6, WIDTH=2, DIM=3, SIGNS=2, MODE="oblivious", CONSTRAINT="gauss", OPTIMIZER="adam",
                      BLOCK_N=block_n, BLOCK_R=block_r)  # fmt: skip
    signature = _signature(fused_solver.kernel, "fp64", ("class_count",), ("image", "targets", "iterations"), **constexprs)
    source = ASTSource(fused_solver.kernel, signature, constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": fused_solver.warps(block_n)})
