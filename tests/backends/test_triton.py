"""The Triton kernels of caffast, and the groups of device functions the fused solver shares (run on
their own by the probe kernels of tests/backends/triton_probes.py), against their plain PyTorch twins, written
in this file.

Runs on a CUDA GPU, or on the CPU under the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton is imported, so set it in the environment (tests/backends/test_triton_interpreted.py does that
for the normal test run):

    TRITON_INTERPRET=1 python -m pytest tests/backends/test_triton.py
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from caffast.backends import cpp  # noqa: E402
from caffast.backends import triton as tk  # noqa: E402
from caffast.backends.triton.fused_solver import tiles  # noqa: E402
from caffast.core.constraints import NORM_EPS, as_constraint  # noqa: E402
from caffast.core.heads import FusedHead, filter_parts  # noqa: E402
from caffast.core.loop import LoopSettings, solve  # noqa: E402
from caffast.core.optimizers import make_optimizer, polynomial_lr_decay  # noqa: E402
from caffast.core.problems import FusedProblem  # noqa: E402
import triton_probes  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Drawn on the CPU in float64, so a seed gives the same numbers on every device and dtype."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Relative to the largest entry: float32 sums round at about 1e-7 of their terms' size."""
    scale = max(expected.abs().max().item(), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


# --------------------------------------------------------------------------------------------------
# The twins


def hadamard_torch(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    """features (P, C, H, W) * filter (P, H, W) / ||filter||; twin of the `Hadamard` Functions: autograd gives its backward."""
    return features * F.normalize(filter.flatten(1), dim=1).view_as(filter)[:, None]


def fused_head_forward_torch(parts: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Twin of the head probes: parts (P, S, K, HW), g (P, HW), bias (K,) or None -> FT (P, K)."""
    cells = g.shape[1]
    pieces = filter_parts(g, parts.shape[1])
    out = sum(torch.einsum("pkj,pj->pk", parts[:, a], piece) for a, piece in enumerate(pieces)) / cells
    return out if bias is None else out + bias


def sphere_grad_torch(f: torch.Tensor, grad_g: torch.Tensor) -> torch.Tensor:
    """Twin of triton.device.sphere_grad, per row of (P, D): the gradient in f given the gradient in g = f / ||f||."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(NORM_EPS)
    g = f / norm
    radial = torch.where(norm > NORM_EPS, (g * grad_g).sum(dim=1, keepdim=True), 0)
    return (grad_g - g * radial) / norm


def projected_step_torch(
    params: torch.Tensor,
    grad_g: torch.Tensor,
    active: torch.Tensor,
    step: int,
    *,
    lr: float,
    max_iter: int,
    optimizer: str,
    first_moment: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Twin of the projected-step probe, built from caffast.core.optimizers' own schedule and update rules."""
    update = make_optimizer(optimizer, params)
    if optimizer == "adam":  # hand it the caller's state, `step` steps in
        update.first_moment, update.second_moment, update.steps = first_moment, second_moment, step
    grad_f = sphere_grad_torch(params.index_select(0, active), grad_g)
    update.step(params, grad_f, active, polynomial_lr_decay(step, lr, max_iter))
    return params


def solve_fused_torch(
    head: FusedHead, constraint: str, params: torch.Tensor, settings: LoopSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of `solve_fused`: caffast.core.loop.solve on caffast.core.problems.FusedProblem, same arguments."""
    solution = solve(FusedProblem(head, constraint), params, settings)
    return solution.params, solution.iterations, solution.loss


def test_available():
    assert tk.available()


# --------------------------------------------------------------------------------------------------
# 1. Hadamard


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_filter", [False, True], ids=["random", "zero"])
def test_hadamard_matches_twin(dtype: torch.dtype, zero_filter: bool):
    gen = torch.Generator().manual_seed(5)
    features = randn(3, 70, 7, 7, gen=gen, dtype=dtype)  # 70 channels: two channel blocks
    filter = randn(3, 7, 7, gen=gen, dtype=dtype)
    if zero_filter:  # the clamp of the norm at 1e-12 is active
        filter[1] = 0
    upstream = randn(3, 70, 7, 7, gen=gen, dtype=dtype)

    expected_filter = filter.clone().requires_grad_(True)
    expected = hadamard_torch(features, expected_filter)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), expected_filter)
    got_filter = filter.clone().requires_grad_(True)
    got = tk.Hadamard.apply(features, got_filter)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), got_filter)

    assert_close(got.detach(), expected.detach(), TOLERANCE[dtype])
    assert_close(got_grad, expected_grad, TOLERANCE[dtype])


def test_hadamard_takes_expanded_gradients():
    gen = torch.Generator().manual_seed(6)
    features = randn(2, 4, 3, 5, gen=gen)
    filter = randn(2, 3, 5, gen=gen).requires_grad_(True)
    (got,) = torch.autograd.grad(tk.Hadamard.apply(features, filter).sum(), filter)
    (expected,) = torch.autograd.grad(hadamard_torch(features, filter).sum(), filter)
    assert_close(got, expected, 1e-12)


# --------------------------------------------------------------------------------------------------
# 2. The fused head's truncated forward (the solver's device functions, through the head probes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signs", [1, 2], ids=["plain", "relu"])
def test_fused_head_forward_matches_twin(dtype: torch.dtype, signs: int):
    gen = torch.Generator().manual_seed(7 + signs)
    problems, classes, cells = 3, 70, 72  # more than one block of classes and of cells
    parts = randn(problems, signs, classes, cells, gen=gen, dtype=dtype)
    g = randn(problems, cells, gen=gen, dtype=dtype)
    g[0, :5] = 0  # the kink: g = 0 takes part 0, as torch.where(g >= 0, ...) does
    upstream = randn(problems, classes, gen=gen, dtype=dtype)
    for bias in (randn(classes, gen=gen, dtype=dtype), None):
        expected_g = g.clone().requires_grad_(True)
        expected = fused_head_forward_torch(parts, expected_g, bias)
        (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), expected_g)
        got = triton_probes.head_forward(parts, g, bias)
        got_grad = triton_probes.head_backward(parts, g, upstream)

        assert_close(got.detach(), expected.detach(), TOLERANCE[dtype])
        assert_close(got_grad, expected_grad, TOLERANCE[dtype])


# --------------------------------------------------------------------------------------------------
# 3. The L2-projected update (the solver's device functions, through the projected-step probe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_projected_step_matches_twin(dtype: torch.dtype, optimizer: str):
    gen = torch.Generator().manual_seed(9)
    params = randn(5, 49, gen=gen, dtype=dtype)
    active = torch.tensor([4, 0, 2], device=DEVICE)
    moments = (randn(5, 49, gen=gen, dtype=dtype), randn(5, 49, gen=gen, dtype=dtype).square())
    settings = dict(lr=0.3, max_iter=40, optimizer=optimizer)
    expected = [params.clone(), *(moment.clone() for moment in moments)]
    got = [params.clone(), *(moment.clone() for moment in moments)]
    for step in range(3):
        grad_g = randn(3, 49, gen=gen, dtype=dtype)
        projected_step_torch(expected[0], grad_g, active, step, **settings, first_moment=expected[1],
                                second_moment=expected[2])  # fmt: skip
        returned = triton_probes.projected_step(got[0], grad_g, active, step, **settings, first_moment=got[1],
                                                second_moment=got[2])  # fmt: skip
        assert returned is got[0]
    assert torch.equal(got[0][[1, 3]], params[[1, 3]]), "inactive rows must not move"
    for actual, wanted in zip(got, expected):
        assert_close(actual, wanted, TOLERANCE[dtype])


# --------------------------------------------------------------------------------------------------
# 4. The persistent fused-head solver against caffast.core.loop.solve on caffast.core.problems.FusedProblem

MODES = ("oblivious", "specific")
CONSTRAINTS = ("l2norm", "softmax", "gauss")
OPTIMIZERS = ("sgd", "adam")
COMBINATIONS = list(itertools.product(MODES, CONSTRAINTS, OPTIMIZERS, (1, 2)))
CLASSES = 5


def random_head(mode: str, signs: int, grid: tuple[int, int], gen: torch.Generator) -> FusedHead:
    """Three problems on two images; the Grams are M_a^T M_b of random parts M (classes x HW)."""
    cells = grid[0] * grid[1]
    image = torch.tensor([0, 0, 1], device=DEVICE)  # problems share images
    parts = 3 * randn(2, signs, CLASSES, cells, gen=gen)
    gram = torch.einsum("iska,itkb->istab", parts, parts).contiguous()
    linear = constant = None
    if mode == "specific":  # s = +1 everywhere, -1 at a target
        sign = torch.ones(len(image), CLASSES, dtype=torch.float64, device=DEVICE)
        sign[torch.arange(len(image)), torch.randint(CLASSES, (len(image),), generator=gen).to(DEVICE)] = -1
        linear = torch.einsum("pska,pk->psa", parts[image], sign).contiguous()
        constant = (sign * randn(len(image), CLASSES, gen=gen)).sum(dim=1)
    return FusedHead(gram, linear, constant, image, mode, CLASSES, grid)


def random_params(constraint: str, count: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Mixed signs for l2norm, so that ReLU heads see their sign pattern change."""
    if constraint == "gauss":
        return 0.5 * randn(count, 2, gen=gen)
    return randn(count, cells, gen=gen)


class Recorder:
    """A Problem that records every step's loss (all problems stay active when min_error is 0)."""

    def __init__(self, problem: FusedProblem):
        self.problem = problem
        self.losses: list[torch.Tensor] = []

    def loss_and_grad(self, params: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, grad = self.problem.loss_and_grad(params, active)
        self.losses.append(loss)
        return loss, grad


def splitting_min_error(losses: list[torch.Tensor], check_every: int) -> float:
    """A min_error that stops some problems early and not others: in the widest (log-scale) gap
    between the problems' smallest loss changes at a check, and far from every change, so that
    rounding differences cannot flip a decision."""
    checks = torch.stack(losses)[::check_every]  # the loss at every check, (checks, P)
    changes = (checks[1:] - checks[:-1]).abs()  # the first check compares with 32767
    smallest = changes.min(dim=0).values.sort().values
    split = int((smallest[1:] / smallest[:-1].clamp_min(1e-300)).argmax())
    low, high = smallest[split].item(), smallest[split + 1].item()
    min_error = math.sqrt(max(low, 1e-3 * high) * high)
    margin = 1e-11 + 1e-6 * min_error
    assert ((changes - min_error).abs() > margin).all(), "a loss change is too close to min_error"
    return min_error


def run(solver, head: FusedHead, params: torch.Tensor, constraint: str, optimizer: str, **loop) -> tuple:
    """solve_fused (either backend's, or the twin) on a FusedHead with the loop settings `loop`."""
    return solver(head, as_constraint(constraint), params, LoopSettings(optimizer=optimizer, **loop))


def check_solver(mode: str, constraint: str, optimizer: str, signs: int, grid: tuple[int, int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    head = random_head(mode, signs, grid, gen)
    params = random_params(constraint, len(head.image), grid[0] * grid[1], gen)
    loop = dict(max_iter=35, lr=0.5, check_every=5)

    recorder = Recorder(FusedProblem(head, as_constraint(constraint)))
    solve(recorder, params, LoopSettings(min_error=0.0, optimizer=optimizer, **loop))
    loop["min_error"] = splitting_min_error(recorder.losses, loop["check_every"])
    expected = solve(FusedProblem(head, as_constraint(constraint)), params, LoopSettings(optimizer=optimizer, **loop))
    stopped = expected.iterations < loop["max_iter"]
    assert stopped.any() and not stopped.all(), expected.iterations

    before = params.clone()
    twin = run(solve_fused_torch, head, params, constraint, optimizer, **loop)
    got = run(tk.solve_fused, head, params, constraint, optimizer, **loop)
    assert torch.equal(params, before), "solve_fused must not modify its input"
    references = [(expected.params, expected.iterations, expected.loss), twin]
    if cpp.available():
        data = [None if t is None else t.cpu() for t in (head.gram, head.linear, head.constant, head.image)]
        on_cpu = FusedHead(*data, head.mode, head.classes, head.grid)
        compiled = run(cpp.solve_fused, on_cpu, params.cpu(), constraint, optimizer, **loop)
        references.append([t.to(DEVICE) for t in compiled])
    for wanted_params, wanted_iterations, wanted_loss in references:
        assert torch.equal(got[1], wanted_iterations)
        torch.testing.assert_close(got[0], wanted_params, rtol=0, atol=1e-9)
        torch.testing.assert_close(got[2], wanted_loss, rtol=0, atol=1e-9)
    shape = (len(params), *as_constraint(constraint).parameter_shape(grid))
    maps = [as_constraint(constraint).multiplier(p.view(shape), grid) for p in (got[0], expected.params)]
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode,constraint,optimizer,signs", COMBINATIONS)
def test_solve_fused_matches_solve(mode: str, constraint: str, optimizer: str, signs: int):
    index = COMBINATIONS.index((mode, constraint, optimizer, signs))
    # alternate grids by the parity of (optimizer, signs): each grid meets every mode, constraint,
    # optimizer and part count
    grid = (3, 4) if (OPTIMIZERS.index(optimizer) + signs) % 2 == 0 else (7, 7)
    check_solver(mode, constraint, optimizer, signs, grid, seed=1000 + index)


def test_solve_fused_tiles_a_14_by_14_grid():
    """196 cells: the Grams are read in tiles of columns, not held whole."""
    assert tiles(196)[1] < 196
    check_solver("oblivious", "l2norm", "adam", 2, (14, 14), seed=77)


def test_solve_fused_in_float32():
    """All-float32 inputs make float32 the compute dtype; min_error 0 runs every iteration."""
    gen = torch.Generator().manual_seed(13)
    head = random_head("oblivious", 1, (3, 4), gen)
    params = random_params("l2norm", len(head.image), 12, gen)
    loop = dict(max_iter=20, lr=0.1, min_error=0.0, check_every=5)
    expected = run(solve_fused_torch, head, params, "l2norm", "sgd", **loop)
    single = FusedHead(head.gram.float(), None, None, head.image, head.mode, head.classes, head.grid)
    got = run(tk.solve_fused, single, params.float(), "l2norm", "sgd", **loop)
    assert got[0].dtype == got[2].dtype == torch.float32
    assert torch.equal(got[1], expected[1])
    assert_close(got[0].double(), expected[0], 1e-4)
    assert_close(got[2].double(), expected[2], 1e-4)


@pytest.mark.parametrize("constraint,optimizer,signs,grid", [("l2norm", "sgd", 2, (7, 7)), ("softmax", "adam", 1, (3, 4)),
                                                             ("gauss", "sgd", 2, (3, 4))])  # fmt: skip
def test_solve_fused_log_softmax_matches_its_twin(constraint: str, optimizer: str, signs: int, grid: tuple):
    """The log-softmax loss on the head's K x HW products (more classes than one block of them)."""
    from caffast.core.losses import CLASS_LOSSES

    gen = torch.Generator().manual_seed(31 + signs)
    cells, classes, images = grid[0] * grid[1], 70, 2
    products = randn(images, signs, classes, cells, gen=gen)
    bias = randn(classes, gen=gen)
    image = torch.tensor([0, 1, 1], device=DEVICE)
    targets = torch.tensor([3, 69, 40], device=DEVICE)
    head = FusedHead(None, None, None, image, "specific", classes, grid, products, bias, CLASS_LOSSES["log_softmax"],
                     targets)  # fmt: skip
    params = random_params(constraint, 3, cells, gen)
    loop = dict(max_iter=25, lr=0.5, min_error=0.0, check_every=5)
    twin = run(solve_fused_torch, head, params, constraint, optimizer, **loop)
    got = run(tk.solve_fused, head, params, constraint, optimizer, **loop)
    assert torch.equal(got[1], twin[1])
    torch.testing.assert_close(got[0], twin[0].flatten(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(got[2], twin[2], rtol=0, atol=1e-9)


def test_solve_fused_specific_mode_needs_no_gram():
    gen = torch.Generator().manual_seed(2)
    head = random_head("specific", 2, (3, 4), gen)
    params = random_params("l2norm", len(head.image), 12, gen)
    loop = dict(max_iter=10, lr=0.5, min_error=1e-4, check_every=5)
    with_gram = run(tk.solve_fused, head, params, "l2norm", "adam", **loop)
    bare = FusedHead(None, head.linear, head.constant, None, head.mode, head.classes, head.grid)
    without = run(tk.solve_fused, bare, params, "l2norm", "adam", **loop)
    for a, b in zip(with_gram, without):
        assert torch.equal(a, b)


def test_solve_fused_gauss_far_off_the_grid_stays_finite():
    """exp(-d^2 / 2) underflows everywhere 60 cells away; the softmax of the log-density does not."""
    gen = torch.Generator().manual_seed(4)
    head = random_head("specific", 1, (3, 4), gen)
    params = torch.tensor([[60.0, 0.0]], dtype=torch.float64, device=DEVICE).repeat(len(head.image), 1)
    loop = dict(max_iter=3, lr=0.5, min_error=0.0, check_every=10)
    got = run(tk.solve_fused, head, params, "gauss", "sgd", **loop)
    expected = run(solve_fused_torch, head, params, "gauss", "sgd", **loop)
    assert got[0].isfinite().all() and got[2].isfinite().all()
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-9)


def test_solve_fused_without_iterations():
    gen = torch.Generator().manual_seed(8)
    head = random_head("oblivious", 1, (2, 2), gen)
    params = random_params("softmax", len(head.image), 4, gen)
    got = run(tk.solve_fused, head, params, "softmax", "sgd", max_iter=0, lr=0.5, min_error=0.0, check_every=5)
    assert torch.equal(got[0], params) and (got[1] == 0).all() and got[2].isnan().all()


def test_solve_fused_refuses_bad_inputs():
    gen = torch.Generator().manual_seed(1)
    head = random_head("oblivious", 1, (2, 2), gen)
    params = random_params("l2norm", len(head.image), 4, gen)
    loop = dict(max_iter=5, lr=0.5, min_error=0.0, check_every=1)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        run(tk.solve_fused, head, params, "l2norm", "rmsprop", **loop)
    with pytest.raises(ValueError, match=r"params must have shape \(3, 2\)"):
        run(tk.solve_fused, head, params, "gauss", "sgd", **loop)
    with pytest.raises(TypeError, match="image must be int64"):
        bad = FusedHead(head.gram, None, None, head.image.int(), head.mode, head.classes, head.grid)
        run(tk.solve_fused, bad, params, "l2norm", "sgd", **loop)
    with pytest.raises(ValueError, match="is not an index into gram"):
        bad = FusedHead(head.gram, None, None, head.image + 10, head.mode, head.classes, head.grid)
        run(tk.solve_fused, bad, params, "l2norm", "sgd", **loop)
    with pytest.raises(TypeError, match="gram must be float64"):
        bad = FusedHead(head.gram.float(), None, None, head.image, head.mode, head.classes, head.grid)
        run(tk.solve_fused, bad, params, "l2norm", "sgd", **loop)


# --------------------------------------------------------------------------------------------------
# 5. Clips and volumes: the cells of a (D, H, W) grid reach the kernels flattened


def test_hadamard_on_volumes_matches_twin():
    gen = torch.Generator().manual_seed(10)
    features = randn(2, 5, 2, 3, 4, gen=gen)
    filter = randn(2, 2, 3, 4, gen=gen)
    upstream = randn(2, 5, 2, 3, 4, gen=gen)
    expected_filter = filter.clone().requires_grad_(True)
    expected = hadamard_torch(features, expected_filter)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), expected_filter)
    got_filter = filter.clone().requires_grad_(True)
    got = tk.Hadamard.apply(features, got_filter)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), got_filter)
    assert_close(got.detach(), expected.detach(), 1e-12)
    assert_close(got_grad, expected_grad, 1e-12)


@pytest.mark.parametrize("mode,constraint,optimizer", [("oblivious", "gauss", "adam"), ("specific", "gauss", "sgd"),
                                                       ("oblivious", "l2norm", "sgd")])  # fmt: skip
def test_solve_fused_on_a_volume_grid_matches_its_twins(mode: str, constraint: str, optimizer: str):
    """A (2, 3, 2) grid: its 12 cells in row-major order, and a Gaussian whose mean has three coordinates."""
    from dataclasses import replace

    gen = torch.Generator().manual_seed(41)
    head = replace(random_head(mode, 2, (6, 2), gen), grid=(2, 3, 2))
    count = len(head.image)
    params = 0.5 * randn(count, 3, gen=gen) if constraint == "gauss" else randn(count, 12, gen=gen)
    loop = dict(max_iter=25, lr=0.5, min_error=0.0, check_every=5)
    got = run(tk.solve_fused, head, params, constraint, optimizer, **loop)
    references = [run(solve_fused_torch, head, params, constraint, optimizer, **loop)]
    if cpp.available():
        data = [None if t is None else t.cpu() for t in (head.gram, head.linear, head.constant, head.image)]
        on_cpu = FusedHead(*data, head.mode, head.classes, head.grid)
        references.append([t.to(DEVICE) for t in run(cpp.solve_fused, on_cpu, params.cpu(), constraint, optimizer, **loop)])
    for wanted_params, wanted_iterations, wanted_loss in references:
        assert torch.equal(got[1], wanted_iterations)
        torch.testing.assert_close(got[0], wanted_params, rtol=0, atol=1e-9)
        torch.testing.assert_close(got[2], wanted_loss, rtol=0, atol=1e-9)
