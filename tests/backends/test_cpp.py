"""caffast._C, the C++ CPU backend, against plain PyTorch twins written in this file (float64).

The twins compute gradients with autograd rather than with the closed forms the C++ code uses, so
they check the formulas of docs/design.md, 'The fused head' as well as the code that implements them.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caffast.backends import cpp
from caffast.core.constraints import as_constraint
from caffast.core.heads import FusedHead
from caffast.core.loop import LoopSettings

MODES = ("oblivious", "specific")
CONSTRAINTS = ("l2norm", "softmax", "gauss")
OPTIMIZERS = ("sgd", "adam")
INITIAL_PREVIOUS_LOSS = 32767.0


@pytest.fixture(autouse=True)
def _one_thread():
    """The twins run thousands of tiny ops, which extra threads only slow down."""
    torch.set_num_threads(1)
    yield


# --------------------------------------------------------------------------------------------------
# The twin: the fused loss and the reference loop restated in plain PyTorch.


def twin_filter(params: torch.Tensor, constraint: str, grid: tuple[int, int]) -> torch.Tensor:
    """g (P, HW) from params (P, D)."""
    if constraint == "l2norm":
        return F.normalize(params, dim=1)
    if constraint == "softmax":
        return torch.softmax(params, dim=1)
    height, width = grid
    x = (torch.arange(width, dtype=params.dtype) - (width - 1) / 2).repeat(height)
    y = (torch.arange(height, dtype=params.dtype) - (height - 1) / 2).repeat_interleave(width)
    e = torch.exp(-((x - params[:, :1]) ** 2 + (y - params[:, 1:]) ** 2) / 2)
    return e / e.sum(dim=1, keepdim=True)


def twin_loss(g: torch.Tensor, data: dict, mode: str, classes: int) -> torch.Tensor:
    """The loss (P,) of every problem at filters g (P, HW)."""
    problems, cells = g.shape
    linear = data["linear"]
    sigma = (~(g >= 0)).long() if linear.shape[1] == 2 else torch.zeros_like(g, dtype=torch.long)
    picked = linear.gather(1, sigma[:, None, :])[:, 0]
    g_dot_l = (g * picked).sum(dim=1)
    if mode == "specific":
        return g_dot_l / cells + data["constant"]
    p = torch.arange(problems)[:, None, None]
    rows = torch.arange(cells)
    block = data["gram"][data["image"]][p, sigma[:, :, None], sigma[:, None, :], rows[:, None], rows[None, :]]
    q = (block @ g[:, :, None])[:, :, 0]
    return ((g * q).sum(dim=1) / cells**2 - 2 * g_dot_l / cells + data["constant"]) / classes


def twin_loss_and_grad(params: torch.Tensor, data: dict, s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd through the twin, not the closed-form gradients of docs/design.md, 'The fused head'."""
    with torch.enable_grad():
        x = params.detach().requires_grad_(True)
        loss = twin_loss(twin_filter(x, s["constraint"], s["grid"]), data, s["mode"], s["classes"])
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def twin_solve(data: dict, params: torch.Tensor, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """The reference loop for every problem at once; a stopped problem is frozen by a mask.
    Also returns, per check, the |loss - previous| of every problem (used to pick min_error)."""
    f = params.clone()
    m, v = torch.zeros_like(f), torch.zeros_like(f)
    count = f.shape[0]
    active = torch.ones(count, dtype=torch.bool)
    previous = torch.full((count,), INITIAL_PREVIOUS_LOSS, dtype=f.dtype)
    last = torch.full((count,), math.nan, dtype=f.dtype)
    iterations = torch.zeros(count, dtype=torch.long)
    changes = []
    for t in range(s["max_iter"]):
        if not active.any():
            break
        loss, grad = twin_loss_and_grad(f, data, s)
        lr_t = (s["lr"] - 1e-5) * (1 - t / s["max_iter"]) + 1e-5
        if s["optimizer"] == "sgd":
            new_f = f - lr_t * grad
        else:
            new_m = m + (1 - 0.9) * (grad - m)
            new_v = 0.999 * v + 0.001 * grad**2
            k = t + 1
            new_f = f - (lr_t / (1 - 0.9**k)) * new_m / (new_v.sqrt() / math.sqrt(1 - 0.999**k) + 1e-8)
            m = torch.where(active[:, None], new_m, m)
            v = torch.where(active[:, None], new_v, v)
        f = torch.where(active[:, None], new_f, f)
        last = torch.where(active, loss, last)
        iterations[active] = t + 1
        if t % s["check_every"] == 0:
            change = (loss - previous).abs()
            changes.append(change)
            stop = active & (change < s["min_error"])
            previous = torch.where(active, loss, previous)
            active &= ~stop
    return f, iterations, last, changes


def run_cpp(data: dict, params: torch.Tensor, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cpp.solve_fused with the settings dict the twin takes."""
    head = FusedHead(data["gram"], data["linear"], data["constant"], data["image"], s["mode"], s["classes"], s["grid"])
    settings = LoopSettings(max_iter=s["max_iter"], lr=s["lr"], min_error=s["min_error"],
                            check_every=s["check_every"], optimizer=s["optimizer"])  # fmt: skip
    return cpp.solve_fused(head, as_constraint(s["constraint"]), params, settings)


# --------------------------------------------------------------------------------------------------
# Random problems: Grams M_a^T M_b of random parts, linear terms and constants consistent with them.


def random_problems(mode: str, signs: int, grid: tuple[int, int], classes: int, gen: torch.Generator) -> dict:
    """Seven problems on four images; random parts M (or M+ and M-) of size classes x HW."""
    cells = grid[0] * grid[1]
    image = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # problems share images
    parts = 3 * torch.randn(int(image.max()) + 1, signs, classes, cells, generator=gen, dtype=torch.float64)
    gram = torch.einsum("iska,itkb->istab", parts, parts).contiguous()
    if mode == "oblivious":  # c = NT - b = M+ 1 / HW; the twin expands the loss with it, the solver reads Grams only
        vector = parts[image, 0].sum(dim=2) / cells
        constant = (vector * vector).sum(dim=1)
    else:  # s = +1 everywhere, -1 at a target
        vector = torch.ones(len(image), classes, dtype=torch.float64)
        vector[torch.arange(len(image)), torch.randint(classes, (len(image),), generator=gen)] = -1
        constant = (vector * torch.randn(len(image), classes, generator=gen, dtype=torch.float64)).sum(dim=1)
    linear = torch.einsum("pska,pk->psa", parts[image], vector).contiguous()
    return {"gram": gram, "linear": linear, "constant": constant, "image": image}


def random_params(constraint: str, count: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Mixed signs for l2norm, so that ReLU heads see their sign pattern change."""
    if constraint == "gauss":
        return 0.5 * torch.randn(count, 2, generator=gen, dtype=torch.float64)
    return torch.randn(count, cells, generator=gen, dtype=torch.float64)


def splitting_min_error(changes: list) -> float:
    """A min_error that stops some problems early and not others: in the widest (log-scale) gap
    between the problems' smallest loss changes at a check, and far from every change, so rounding
    differences cannot flip a decision."""
    history = torch.stack(changes[1:])  # the first check compares with 32767
    smallest = history.min(dim=0).values.sort().values
    ratios = smallest[1:] / smallest[:-1].clamp_min(1e-300)
    split = int(ratios.argmax())
    low, high = smallest[split].item(), smallest[split + 1].item()
    min_error = math.sqrt(max(low, 1e-3 * high) * high)
    assert (history / min_error - 1).abs().min() > 1e-6, "a loss change is too close to min_error"
    return min_error


def test_extension_is_built():
    assert cpp.available(), f"caffast._C did not import: {cpp.import_error()}"


COMBINATIONS = list(itertools.product(MODES, CONSTRAINTS, OPTIMIZERS, (1, 2)))


@pytest.mark.parametrize("mode,constraint,optimizer,signs", COMBINATIONS)
def test_solve_fused_matches_twin(mode: str, constraint: str, optimizer: str, signs: int):
    index = COMBINATIONS.index((mode, constraint, optimizer, signs))
    gen = torch.Generator().manual_seed(1000 + index)
    grid = (3, 4) if index % 2 == 0 else (7, 7)
    classes = 5
    data = random_problems(mode, signs, grid, classes, gen)
    params = random_params(constraint, len(data["image"]), grid[0] * grid[1], gen)
    s = dict(mode=mode, constraint=constraint, optimizer=optimizer, grid=grid, classes=classes,
             max_iter=150, lr=0.5, min_error=0.0, check_every=10)  # fmt: skip
    *_, changes = twin_solve(data, params, s)
    s["min_error"] = splitting_min_error(changes)

    expected_params, expected_iterations, expected_loss, _ = twin_solve(data, params, s)
    before = params.clone()
    got_params, got_iterations, got_loss = run_cpp(data, params, s)

    assert torch.equal(params, before), "solve_fused must not modify its input"
    stopped = expected_iterations < s["max_iter"]
    assert stopped.any() and not stopped.all(), expected_iterations
    assert torch.equal(got_iterations, expected_iterations)
    torch.testing.assert_close(got_params, expected_params, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_loss, expected_loss, rtol=0, atol=1e-9)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_solve_fused_matches_torch_optim(optimizer: str):
    """The update rules and the schedule against torch.optim itself (min_error 0 never stops)."""
    gen = torch.Generator().manual_seed(7)
    grid, classes = (4, 4), 3
    data = random_problems("oblivious", 2, grid, classes, gen)
    params = random_params("l2norm", len(data["image"]), 16, gen)
    s = dict(mode="oblivious", constraint="l2norm", optimizer=optimizer, grid=grid, classes=classes,
             max_iter=30, lr=0.3, min_error=0.0, check_every=10)  # fmt: skip

    f = params.clone().requires_grad_(True)
    opt = torch.optim.SGD([f], lr=s["lr"]) if optimizer == "sgd" else torch.optim.Adam([f], lr=s["lr"])
    decay = lambda t: ((s["lr"] - 1e-5) * (1 - t / s["max_iter"]) + 1e-5) / s["lr"]  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    for _ in range(s["max_iter"]):
        loss = twin_loss(twin_filter(f, "l2norm", grid), data, "oblivious", classes)
        opt.zero_grad()
        loss.sum().backward()  # problems are independent: the sum's gradient is each one's own
        opt.step()
        schedule.step()

    got_params, got_iterations, got_loss = run_cpp(data, params, s)
    assert (got_iterations == s["max_iter"]).all()
    torch.testing.assert_close(got_params, f.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(got_loss, loss.detach(), rtol=0, atol=1e-9)


def test_solve_fused_is_independent_of_threads():
    gen = torch.Generator().manual_seed(3)
    data = random_problems("oblivious", 2, (7, 7), 4, gen)
    params = random_params("l2norm", len(data["image"]), 49, gen)
    s = dict(mode="oblivious", constraint="l2norm", optimizer="adam", grid=(7, 7), classes=4,
             max_iter=100, lr=0.5, min_error=1e-7, check_every=10)  # fmt: skip
    one = run_cpp(data, params, s)
    torch.set_num_threads(2)
    two = run_cpp(data, params, s)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# End to end: the fused formulas equal autograd through a real head.


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_fused_step_matches_autograd_through_head(relu: bool, mode: str, constraint: str):
    gen = torch.Generator().manual_seed(11)
    channels, grid, classes, lr = 6, (3, 4), 5, 0.5
    cells = grid[0] * grid[1]
    features = torch.randn(channels, *grid, generator=gen, dtype=torch.float64)
    weight = torch.randn(classes, channels, generator=gen, dtype=torch.float64)
    bias = torch.randn(classes, generator=gen, dtype=torch.float64)

    def head(a: torch.Tensor) -> torch.Tensor:  # [ReLU] -> global average pool -> Linear
        return F.linear((a.relu() if relu else a).mean(dim=(-2, -1)), weight, bias)

    reference = head(features)
    sign = torch.ones(classes, dtype=torch.float64)
    sign[2] = -1
    params = random_params(constraint, 1, cells, gen)

    # Autograd through the real head, one SGD step at the first learning rate of the schedule.
    f = params.clone().requires_grad_(True)
    output = head(features * twin_filter(f, constraint, grid).view(1, *grid))
    loss = F.mse_loss(output, reference) if mode == "oblivious" else (sign * output).sum()
    (grad,) = torch.autograd.grad(loss, f)
    expected = params - ((lr - 1e-5) * 1 + 1e-5) * grad

    # The fused precomputation of docs/design.md, 'The fused head', then a one-iteration solve.
    flat = features.reshape(channels, cells)
    parts = [weight @ flat.relu(), weight @ flat.clamp(max=0)] if relu else [weight @ flat]
    gram = torch.stack([torch.stack([a.T @ b for b in parts]) for a in parts])[None].contiguous()
    vector = reference - bias if mode == "oblivious" else sign
    linear = torch.stack([part.T @ vector for part in parts])[None].contiguous()
    constant = (vector @ vector if mode == "oblivious" else sign @ bias).reshape(1)
    head = FusedHead(gram, linear, constant, torch.zeros(1, dtype=torch.long), mode, classes, grid)
    settings = LoopSettings(max_iter=1, lr=lr, min_error=1e-6, check_every=50, optimizer="sgd")
    got_params, iterations, got_loss = cpp.solve_fused(head, as_constraint(constraint), params, settings)

    assert iterations.tolist() == [1]
    torch.testing.assert_close(got_loss, loss.detach().reshape(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_params, expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# The Hadamard filter.


def twin_hadamard(features: torch.Tensor, filter: torch.Tensor) -> torch.Tensor:
    return features * F.normalize(filter.flatten(1), dim=1).view_as(filter)[:, None]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("zero_filter", [False, True], ids=["random", "zero"])
def test_hadamard_matches_autograd(dtype: torch.dtype, tolerance: float, zero_filter: bool):
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(3, 32, 7, 7, generator=gen, dtype=dtype)
    filter = torch.randn(3, 7, 7, generator=gen, dtype=dtype)
    if zero_filter:  # the clamp of the norm at 1e-12 is active
        filter[1] = 0
    upstream = torch.randn(3, 32, 7, 7, generator=gen, dtype=dtype)

    expected_filter = filter.clone().requires_grad_(True)
    expected = twin_hadamard(features, expected_filter)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), expected_filter)
    got_filter = filter.clone().requires_grad_(True)
    got = cpp.Hadamard.apply(features, got_filter)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), got_filter)

    def close(actual: torch.Tensor, wanted: torch.Tensor) -> None:
        scale = wanted.abs().max().item()
        torch.testing.assert_close(actual, wanted, rtol=tolerance, atol=tolerance * scale)

    close(got.detach(), expected.detach())
    close(got_grad, expected_grad)


def test_hadamard_backward_takes_expanded_gradients():
    features = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    filter = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(cpp.Hadamard.apply(features, filter).sum(), filter)
    (expected,) = torch.autograd.grad(twin_hadamard(features, filter).sum(), filter)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Refusals: nothing is converted behind the caller's back.


def test_wrappers_refuse_bad_inputs():
    features = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="filter must be float32"):
        cpp.hadamard_forward(features, torch.randn(2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be contiguous"):
        cpp.hadamard_forward(features.transpose(2, 3), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"filter must have shape \(2, 4, 4\)"):
        cpp.hadamard_forward(features, torch.randn(2, 4, 5))

    gen = torch.Generator().manual_seed(1)
    data = random_problems("oblivious", 1, (2, 2), 3, gen)
    params = random_params("l2norm", len(data["image"]), 4, gen)
    s = dict(mode="oblivious", constraint="l2norm", optimizer="sgd", grid=(2, 2), classes=3,
             max_iter=5, lr=0.5, min_error=0.0, check_every=1)  # fmt: skip
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        run_cpp(data, params, {**s, "optimizer": "rmsprop"})
    with pytest.raises(ValueError, match=r"params must have shape \(7, 2\)"):
        run_cpp(data, params, {**s, "constraint": "gauss"})
    with pytest.raises(TypeError, match="image must be int64"):
        run_cpp({**data, "image": data["image"].int()}, params, s)
    with pytest.raises(ValueError, match="is not an index into gram"):
        run_cpp({**data, "image": data["image"] + 10}, params, s)


def test_specific_mode_needs_no_gram():
    gen = torch.Generator().manual_seed(2)
    data = random_problems("specific", 2, (3, 4), 5, gen)
    params = random_params("l2norm", len(data["image"]), 12, gen)
    s = dict(mode="specific", constraint="l2norm", optimizer="adam", grid=(3, 4), classes=5,
             max_iter=40, lr=0.5, min_error=1e-4, check_every=10)  # fmt: skip
    with_gram = run_cpp(data, params, s)
    without = run_cpp({**data, "gram": None, "image": None}, params, s)
    for a, b in zip(with_gram, without):
        assert torch.equal(a, b)


def test_gauss_far_off_the_grid_stays_finite():
    """Where every exp(-d^2 / 2) underflows, exp / sum would give 0 / 0; the kernels evaluate the
    Gaussian as a softmax of its log-density, which is the same function and stays finite."""
    gen = torch.Generator().manual_seed(4)
    data = random_problems("specific", 1, (3, 4), 5, gen)
    params = torch.tensor([[60.0, 0.0]], dtype=torch.float64).repeat(len(data["image"]), 1)
    s = dict(mode="specific", constraint="gauss", optimizer="sgd", grid=(3, 4), classes=5,
             max_iter=3, lr=0.5, min_error=0.0, check_every=10)  # fmt: skip
    assert twin_filter(params, "gauss", (3, 4)).isnan().all()
    got_params, _, got_loss = run_cpp(data, params, s)
    assert got_params.isfinite().all() and got_loss.isfinite().all()


# --------------------------------------------------------------------------------------------------
# Ctrl-C reaches a long compiled loop.

INTERRUPTED_EXPLAIN = """
import signal, sys, time, torch, caffast
# a shell's background job starts with SIGINT ignored, and Python then installs no handler
signal.signal(signal.SIGINT, signal.default_int_handler)
from caffast.eval.demo_model import DemoCNN
torch.manual_seed(0)
model, images = DemoCNN().eval(), torch.randn(int(sys.argv[1]), 3, 64, 64)
print("started", flush=True)
try:
    caffast.explain(model, images, "features", mode="specific", max_iter=10**12, min_error=0, backend="cpp")
except KeyboardInterrupt:
    print(time.monotonic(), flush=True)
    raise
"""


@pytest.mark.parametrize("images", [1, 5])
def test_ctrl_c_stops_the_compiled_loop_at_once(images, tmp_path):
    """SIGINT one second into a loop of 10^12 iterations: KeyboardInterrupt is raised within a
    fraction of a second, not when the compiled call returns."""
    script = tmp_path / "explain.py"
    script.write_text(INTERRUPTED_EXPLAIN)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "2"}  # fmt: skip
    process = subprocess.Popen([sys.executable, str(script), str(images)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "started"
        time.sleep(1.0)  # well inside the compiled loop
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0 and err.strip().endswith("KeyboardInterrupt"), err[-2000:]
    assert float(out.split()[-1]) - sent < 0.5  # CLOCK_MONOTONIC: one clock for both processes
