"""solver="fast" against the reference loop on random problems: never a higher objective, within its
evaluation budget, and a projected gradient below the tolerance wherever it reports convergence."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import caffast
from caffast.core.breakpoints import split
from caffast.core.constraints import as_constraint, initial_parameters
from caffast.core.exact import stationarity
from caffast.core.fast import bundle_qp, fast_minimize
from caffast.core.losses import CLASS_LOSSES, Objective
from caffast.core.problems import AutogradProblem

CLASSES = 10


class SmallNet(nn.Module):
    """conv-BN-ReLU blocks, then a head: the breakpoint 'block1' leaves a deep ReLU tail, 'features'
    a fused head (ReLU in front when `relu_head`)."""

    def __init__(self, relu_head: bool):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.block1 = block(3, 12)
        self.features = nn.Sequential(block(12, 16), nn.Conv2d(16, 24, 3, padding=1))
        self.relu = nn.ReLU() if relu_head else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.features(self.block1(x)))).flatten(1))


def make_model(seed: int, relu_head: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallNet(relu_head).double()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):  # unit-scale activations, as a trained net has
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


CASES = [  # (layer, mode, constraint, relu head)
    ("block1", "oblivious", "l2norm", True),
    ("block1", "specific", "l2norm", True),
    ("block1", "oblivious", "softmax", True),
    ("block1", "specific", "gauss", True),
    ("features", "oblivious", "l2norm", True),  # fused ReLU head: no closed form, the bundle runs
    ("features", "oblivious", "softmax", False),
    ("features", "specific", "gauss", False),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layer, mode, constraint, relu_head", CASES)
def test_fast_is_never_above_the_reference_loop(layer, mode, constraint, relu_head, seed):
    model = make_model(seed, relu_head)
    gen = torch.Generator().manual_seed(100 + seed)
    images = torch.randn(2, 3, 12, 12, generator=gen, dtype=torch.float64)
    targets = None if mode == "oblivious" else [int(c) for c in torch.randperm(CLASSES, generator=gen)[:2]]
    common = dict(mode=mode, targets=targets, constraint=constraint)
    gd = caffast.explain(model, images, layer, solver="gd", **common)
    fast = caffast.explain(model, images, layer, solver="fast", **common)
    assert fast.path == gd.path == ("generic" if layer == "block1" else "fused")
    slack = 1e-9 * gd.objective.abs().clamp_min(1)
    assert (fast.objective <= gd.objective + slack).all(), (fast.objective, gd.objective)
    assert (fast.evaluations <= 30).all() and (fast.evaluations >= 1).all()
    assert (fast.loss.double() - fast.objective).abs().max() < 1e-6 * fast.objective.abs().max().clamp_min(1)


def test_fast_takes_the_closed_form_of_a_plain_head():
    model = make_model(3, relu_head=False)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for mode in ("oblivious", "specific"):
        fast = caffast.explain(model, images, "features", mode=mode, solver="fast")
        exact = caffast.explain(model, images, "features", mode=mode, solver="exact")
        torch.testing.assert_close(fast.maps, exact.maps)
        assert (fast.evaluations == 0).all()


def test_fast_beats_the_loop_with_a_user_objective():
    model = make_model(4)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)

    def l1(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return (output - reference).abs().sum(1)

    gd = caffast.explain(model, images, "block1", objective=l1)
    fast = caffast.explain(model, images, "block1", objective=l1, solver="fast")
    assert (fast.objective <= gd.objective * (1 + 1e-9)).all()


def _problem(model: nn.Module, images: torch.Tensor, layer: str, mode: str, constraint: str):
    capture, tail = split(model, layer, images)
    image_index = torch.arange(images.shape[0])
    reference = capture.output.index_select(0, image_index)
    targets = capture.output.argmax(1)
    loss = CLASS_LOSSES["margin"]
    weights = loss.weights(targets, CLASSES, torch.float64) if mode == "specific" else None
    objective = Objective(mode, reference, loss, targets, weights)
    grid = tuple(capture.features.shape[2:])
    kind = as_constraint(constraint)
    problem = AutogradProblem(tail, capture.features, image_index, objective, kind, grid)
    start = initial_parameters(kind, "ones", images.shape[0], grid, None, torch.float64, images.device)
    return problem, start, kind


@pytest.mark.parametrize("constraint", ["l2norm", "softmax"])
def test_converged_means_the_projected_gradient_is_below_the_tolerance(constraint):
    """A smooth class-oblivious problem (no ReLU between the breakpoint and the output) converges."""
    model = make_model(5, relu_head=False)
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    problem, start, kind = _problem(model, images, "features.1", "oblivious", constraint)
    tolerance = 1e-6
    result = fast_minimize(problem, start, kind, tolerance=tolerance, max_evaluations=200)
    assert result.converged.any()
    loss, gradient_norm = stationarity(problem, result.params, kind)
    assert (gradient_norm[result.converged] <= tolerance * (1 + 1e-6)).all(), gradient_norm
    torch.testing.assert_close(loss, result.loss)
    assert (result.evaluations <= 200).all()


def test_the_loss_never_rises_along_the_way():
    """Each accepted point lowers the loss: the answer is never above the start, whatever the budget."""
    model = make_model(6)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    problem, start, kind = _problem(model, images, "block1", "specific", "l2norm")
    everyone = torch.arange(2)
    start_loss, _ = problem.loss_and_grad(start, everyone)
    previous = start_loss
    for budget in (1, 2, 4, 8, 16):
        result = fast_minimize(problem, start, kind, max_evaluations=budget)
        assert (result.evaluations <= budget).all()
        assert (result.loss <= previous + 1e-12).all()
        previous = result.loss


def random_bundle(seed: int, problems: int, cuts: int, dimension: int = 9):
    """A batch of bundle QPs as the solver builds them: Gram matrices of random cuts, non-negative
    errors, random step lengths and a random set of filled slots (slot 0, the centre, always)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((problems, cuts, dimension)) * rng.uniform(0.1, 10, (problems, 1, 1))
    gram = vectors @ vectors.transpose(0, 2, 1)
    valid = rng.random((problems, cuts)) < 0.7
    valid[:, 0] = True
    alpha = np.where(valid, rng.exponential(1.0, (problems, cuts)), np.inf)
    alpha[:, 0] = 0.0
    t = rng.uniform(0.01, 2.0, problems)
    return gram, alpha, t, valid


def qp_objective(lam, gram, alpha, t, valid):
    return 0.5 * t * np.einsum("ak,akj,aj->a", lam, gram, lam) + (lam * np.where(valid, alpha, 0)).sum(1)


@pytest.mark.parametrize("cuts", [1, 2, 7, 20])
def test_the_compiled_bundle_qp_equals_its_numpy_twin(cuts):
    cpp = pytest.importorskip("caffast.backends.cpp")
    if not cpp.available():
        pytest.skip(f"caffast._C is not built: {cpp.import_error()}")
    for seed in range(3):
        problem = random_bundle(seed, problems=5, cuts=cuts)
        for iterations in (0, 1, 150):
            compiled = cpp.bundle_qp(*problem, iterations)
            twin = bundle_qp(*problem, iterations)
            np.testing.assert_allclose(compiled, twin, rtol=0, atol=1e-12)
        gram, alpha, t, valid = problem
        # on the simplex of the filled slots, and no worse than its start (all weight on the centre)
        assert np.allclose(compiled.sum(1), 1.0) and (compiled >= 0).all() and (compiled[~valid] == 0).all()
        centre = np.zeros_like(compiled)
        centre[:, 0] = 1.0
        assert (qp_objective(compiled, *problem) <= qp_objective(centre, *problem) + 1e-12).all()


def test_the_bundle_qp_finds_the_minimum_of_a_two_cut_bundle():
    # two cuts: lambda = (1 - s, s) with s the clipped minimizer of a parabola in closed form
    gram, alpha, t, valid = random_bundle(4, problems=6, cuts=2)
    valid[:] = True
    alpha[:, 1] = np.abs(alpha[:, 1])
    g00, g01, g11 = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    curvature = t * (g00 - 2 * g01 + g11)
    slope = t * (g01 - g00) + alpha[:, 1] - alpha[:, 0]
    s = np.clip(-slope / curvature, 0, 1)
    lam = bundle_qp(gram, alpha, t, valid, 2000)
    np.testing.assert_allclose(lam[:, 1], s, atol=1e-6)


def test_fast_gives_the_same_answer_with_the_compiled_qp_and_the_twin():
    cpp = pytest.importorskip("caffast.backends.cpp")
    if not cpp.available():
        pytest.skip(f"caffast._C is not built: {cpp.import_error()}")
    model = make_model(3)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for mode in ("oblivious", "specific"):
        compiled = caffast.explain(model, images, "block1", mode=mode, solver="fast", backend="cpp")
        twin = caffast.explain(model, images, "block1", mode=mode, solver="fast", backend="torch")
        # the QPs agree to rounding, which an accept-or-reject decision could in principle amplify
        torch.testing.assert_close(compiled.objective, twin.objective, rtol=1e-9, atol=1e-12)


def test_the_compiled_bundle_qp_refuses_an_empty_bundle():
    cpp = pytest.importorskip("caffast.backends.cpp")
    if not cpp.available():
        pytest.skip(f"caffast._C is not built: {cpp.import_error()}")
    with pytest.raises(ValueError, match="at least one cut"):
        cpp.bundle_qp(np.zeros((2, 0, 0)), np.zeros((2, 0)), np.ones(2), np.zeros((2, 0), dtype=bool), 5)


class Recorder:
    """A Problem that keeps every loss it evaluated, problem by problem, in evaluation order."""

    def __init__(self, problem, count: int):
        self.problem = problem
        self.losses = [[] for _ in range(count)]

    def loss_and_grad(self, params, active):
        loss, grad = self.problem.loss_and_grad(params, active)
        for index, value in zip(active.tolist(), loss.tolist()):
            self.losses[index].append(value)
        return loss, grad


def stalled(losses: list, window: int, tolerance: float) -> bool:
    """Whether the lowest loss fell by at most `tolerance` times its fall since the start over the
    last `window` evaluations (the loss side of the stall test, written afresh)."""
    lowest = np.minimum.accumulate(losses)
    fall = lowest[0] - lowest[-1]
    return len(losses) > window and fall > 0 and lowest[-1 - window] - lowest[-1] <= tolerance * fall


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
def test_fast_returns_the_lowest_point_it_evaluated_and_stops_when_it_stalls(mode):
    model = make_model(7)
    images = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    problem, start, kind = _problem(model, images, "block1", mode, "l2norm")
    recorder = Recorder(problem, images.shape[0])
    window, tolerance, budget = 3, 1e-2, 60
    result = fast_minimize(recorder, start, kind, max_evaluations=budget, stall_window=window,
                           stall_tolerance=tolerance)  # fmt: skip
    loss, _ = problem.loss_and_grad(result.params, torch.arange(images.shape[0]))
    torch.testing.assert_close(loss, result.loss, rtol=1e-12, atol=1e-12)
    for index, losses in enumerate(recorder.losses):
        assert result.evaluations[index] == len(losses) <= budget
        assert result.loss[index] == min(losses)
        # these problems neither converge nor run out of model: each ends on a stall or at the budget
        assert stalled(losses, window, tolerance) or len(losses) == budget, f"problem {index} stopped early"
    assert (result.evaluations < budget).any()  # the rule was exercised
