"""The objective, the gradient norm, the exact solver and the map options of caffast.explain,
checked against a plain-PyTorch restatement of the L2-CAF problem.

The restatement does not use caffast: the breakpoint's feature map A and the unfiltered output NT
are captured by a forward hook (tests/reference_loop.py), FT(g) runs the modules after the
breakpoint on A * g (the models here are nn.Sequential, so the tail is a slice of the model), the
loss is the reference's (class-oblivious: mean of (FT - NT)^2 over the output; class-specific:
sum_k s_k FT_k with s = +1 everywhere and -1 at the target) and every gradient is autograd's.
The minimizer on the unit sphere is found by a Riemannian gradient descent
(g <- normalize(g - step * projected gradient)) from several starting points, the best kept; on
plain heads the class-specific optimum is also written out, -M^T s / ||M^T s|| with M = W A.

Models are small float64 CNNs with random weights (conv -> ReLU -> conv -> [ReLU] -> global
average pool -> flatten -> Linear): a 4 x 4 to 6 x 6 grid and 5 to 20 classes, so both K < HW
(rank-deficient Gram) and K > HW occur, and a variant whose breakpoint output has zero spatial
mean per channel, where the class-oblivious minimum is 0 and reached on a whole circle of the
sphere (the "hard case" of the sphere-constrained quadratic).
"""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_loop import capture, multiplier_of  # noqa: E402

import caffast  # noqa: E402

F64 = torch.float64
TOLERANCE = 1e-8          # explain's default `tolerance`


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: one intra-op thread is the fastest on the 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

def small_cnn(seed, classes=10, grid=5, channels=8, head="plain", center_bias=0.0):
    """conv(stride 2) -> ReLU -> conv -> [head] -> AdaptiveAvgPool2d(1) -> Flatten -> Linear, float64.

    head "plain": the breakpoint is the second conv ("2"), its output goes straight to the pool.
    head "relu": a ReLU between the breakpoint ("2") and the pool (densenet's head).
    head "centered": InstanceNorm2d(affine) after the second conv is the breakpoint ("3"): every
    channel of A has spatial mean `center_bias` (0: the ones vector is in the null space of M).
    Returns (model, breakpoint name, input side); the grid is grid x grid.
    """
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, channels, 3, padding=1)]
    layer = "2"
    if head == "relu":
        layers.append(nn.ReLU())
    elif head == "centered":
        norm = nn.InstanceNorm2d(channels, affine=True)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.fill_(center_bias)
        layers.append(norm)
        layer = "3"
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    model = nn.Sequential(*layers).to(F64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, layer, 2 * grid


def rand_images(n, side):
    return torch.randn(n, 3, side, side, dtype=F64)


# ----------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------

def unit(g):
    return g / torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True)


def project(g, grad):
    """The gradient projected on the tangent plane of the unit sphere at g (||g|| = 1)."""
    return grad - g * (g * grad).sum(dim=(-2, -1), keepdim=True)


def norm2d(x):
    return torch.linalg.vector_norm(x, dim=(-2, -1))


class Problem:
    """One L2-CAF problem (one image, one target) of an nn.Sequential cut after module `layer`."""

    def __init__(self, model, image, layer, mode, target=None):
        self.model = model
        self.tail = model[int(layer) + 1:]
        self.NT, self.A = capture(model, layer, image[None])
        self.H, self.W = self.A.shape[-2:]
        self.mode = mode
        if mode == "specific":
            self.s = torch.ones_like(self.NT)
            self.s[0, int(target)] = -1
        else:
            assert mode == "oblivious"

    def loss(self, mult):
        """The loss at a multiplier (H, W), or at a batch of them (S, H, W) -> (S,)."""
        batch = mult if mult.dim() == 3 else mult[None]
        FT = self.tail(self.A * batch[:, None])
        if self.mode == "oblivious":
            out = ((FT - self.NT) ** 2).mean(dim=-1)
        else:
            out = (FT * self.s).sum(dim=-1)
        return out if mult.dim() == 3 else out[0]

    def grad(self, g):
        """Loss and its gradient with respect to the multiplier g (batched like `loss`)."""
        g = g.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = self.loss(g)
            (gr,) = torch.autograd.grad(value.sum(), g)
        return value.detach(), gr

    def on_sphere(self, g):
        """(loss, projected-gradient norm) at the unit vector g."""
        value, gr = self.grad(g)
        return float(value), float(norm2d(project(g, gr)))

    def param_grad(self, param, constraint):
        """Loss and its gradient with respect to the parameter of the softmax / gauss constraints."""
        p = param.detach().clone().to(F64).requires_grad_(True)
        with torch.enable_grad():
            value = self.loss(multiplier_of(p, constraint, self.H, self.W))
            (gr,) = torch.autograd.grad(value, p)
        return float(value.detach()), gr

    def param_loss(self, param, constraint):
        """(loss, gradient norm with respect to the parameter) for the softmax / gauss constraints."""
        value, gr = self.param_grad(param, constraint)
        return value, float(torch.linalg.vector_norm(gr))

    def reference_points(self):
        """The uniform unit filter and a fixed random one (the uniform filter alone can be a
        minimizer: in the hard case the ones vector is in the null space of M)."""
        generator = torch.Generator().manual_seed(12345)
        return torch.stack([unit(torch.ones(self.H, self.W, dtype=F64)),
                            unit(torch.randn(self.H, self.W, generator=generator, dtype=F64))])

    def grad_scale(self):
        """Gradient norm at the reference points: the scale for "the projected gradient is ~0"."""
        return float(norm2d(self.grad(self.reference_points())[1]).max())

    def loss_scale(self):
        with torch.no_grad():
            return float(self.loss(self.reference_points()).abs().max()) + 1e-300

    def plain_head_matrix(self):
        """M = W A (K x HW) of a plain head (breakpoint -> pool -> flatten -> Linear)."""
        weight = self.model[-1].weight
        return weight @ self.A[0].reshape(weight.shape[1], -1)


def problems_of(model, images, layer, mode, targets):
    """Problem per (n, t); targets is an (N, T) tensor (ignored for oblivious: T = 1)."""
    out = []
    for n in range(images.shape[0]):
        if mode == "oblivious":
            out.append([Problem(model, images[n], layer, mode)])
        else:
            out.append([Problem(model, images[n], layer, mode, int(c)) for c in targets[n]])
    return out


def sphere_descent(problem, starts, max_iter=5000):
    """Riemannian gradient descent on the unit sphere, all starting points at once.

    Per start: a step along the projected gradient followed by normalization; a step is taken when
    it lowers the loss (or, once the loss is flat to rounding, the projected gradient), and the step
    length then grows by 1.25, otherwise it halves.  Stops when every start has a projected
    gradient below 1e-12 of the gradient scale.  Returns (best unit g, its loss, its PG norm).
    """
    g = unit(starts.to(F64))
    value, gr = problem.grad(g)
    pg = project(g, gr)
    pn = norm2d(pg)
    step = torch.ones(g.shape[0], 1, 1, dtype=F64)
    stop = 1e-12 * problem.grad_scale()
    eps = torch.finfo(F64).eps
    for _ in range(max_iter):
        if float(pn.max()) < stop:
            break
        cand = unit(g - step * pg)
        cvalue, cgr = problem.grad(cand)
        cpg = project(cand, cgr)
        cpn = norm2d(cpg)
        flat = cvalue <= value + 8 * eps * value.abs()
        ok = (cvalue < value) | (flat & (cpn < pn))
        okb = ok[:, None, None]
        g = torch.where(okb, cand, g)
        value = torch.where(ok, cvalue, value)
        pg = torch.where(okb, cpg, pg)
        pn = torch.where(ok, cpn, pn)
        step = torch.where(okb, step * 1.25, step * 0.5)
    best = int(torch.argmin(value))
    return g[best], float(value[best]), float(pn[best])


def param_descent(problem, param, constraint, max_iter=300):
    """Gradient descent with the same step rule on the softmax logits / the gaussian mean.
    Returns the lowest loss reached."""
    x = param.detach().to(F64).clone()
    value, gr = problem.param_grad(x, constraint)
    gn = float(torch.linalg.vector_norm(gr))
    step = 1.0
    eps = torch.finfo(F64).eps
    for _ in range(max_iter):
        if gn == 0.0 or step < 1e-30:
            break
        cand = x - step * gr
        cvalue, cgr = problem.param_grad(cand, constraint)
        cgn = float(torch.linalg.vector_norm(cgr))
        if cvalue < value or (cvalue <= value + 8 * eps * abs(value) and cgn < gn):
            x, value, gr, gn = cand, cvalue, cgr, cgn
            step *= 1.25
        else:
            step *= 0.5
    return value


def descent_starts(problem, random_starts=5):
    H, W = problem.H, problem.W
    ones = torch.ones(1, H, W, dtype=F64)
    return torch.cat([ones, -ones, torch.randn(random_starts, H, W, dtype=F64)])


def sphere_quadratic_min(G, b):
    """Global minimizer of g^T G g - 2 b^T g on the unit sphere (G symmetric PSD), by the
    eigendecomposition and the secular equation ||(G - lam)^-1 b|| = 1, lam < lambda_min.
    Independent of the descent: used to check it.  Returns (g, hard) with hard True when the
    minimizer is not unique (b has no component on the lowest eigenspace and the easy-case root
    does not exist)."""
    mu, V = torch.linalg.eigh(G)
    bt = V.T @ b
    tol = 1e-11 * float(mu.abs().max())
    low = float(mu[0])
    on_low = (mu - low).abs() <= tol
    if float(bt[on_low].abs().max()) <= 1e-11 * float(mu.abs().max()) * math.sqrt(len(b)):
        y = torch.where(on_low, torch.zeros_like(bt), bt / (mu - low).clamp_min(tol))
        n2 = float((y ** 2).sum())
        if n2 <= 1.0:
            y[int(on_low.nonzero()[0, 0])] = math.sqrt(1.0 - n2)
            return V @ y, True

    def phi(lam):
        return float(((bt / (mu - lam)) ** 2).sum())

    hi, width = low, 1.0
    while phi(low - width) > 1.0:
        width *= 2.0
    lo = low - width
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if phi(mid) > 1.0:
            hi = mid
        else:
            lo = mid
    return V @ (bt / (mu - 0.5 * (lo + hi))), False


def cosine(a, b):
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


def close_direction(a, b):
    """The spec's "same minimizer": cosine similarity > 1 - 1e-6 or max |difference| < 1e-5."""
    a, b = unit(a.to(F64)), unit(b.to(F64))
    return cosine(a, b) > 1 - 1e-6 or float((a - b).abs().max()) < 1e-5


def lib_unit(exp, n, t):
    return unit(exp.filters[n, t].to(F64))


def explain(model, images, layer, mode, targets, **kw):
    """The oracles here restate the release's class-specific loss."""
    return caffast.explain(model, images, layer, mode=mode,
                           targets=targets if mode == "specific" else None, **{"loss": "release", **kw})


def random_targets(n, t, classes):
    return torch.stack([torch.randperm(classes)[:t] for _ in range(n)])


# ----------------------------------------------------------------------------------------------
# 0. the oracle checks itself (no caffast involved)
# ----------------------------------------------------------------------------------------------

def test_oracle_tail_and_fused_algebra():
    """The tail on A is the model; the plain head's loss and gradient are those of docs/design.md, 'Plain head'."""
    torch.manual_seed(0)
    for classes, grid in ((5, 6), (20, 4)):
        model, layer, side = small_cnn(11, classes=classes, grid=grid)
        image = rand_images(1, side)[0]
        for mode in ("oblivious", "specific"):
            p = Problem(model, image, layer, mode, target=2)
            torch.testing.assert_close(p.tail(p.A), p.NT, rtol=1e-12, atol=1e-12)
            assert (p.H, p.W) == (grid, grid)
            HW = grid * grid
            M = p.plain_head_matrix()
            bias = model[-1].bias
            g = unit(torch.randn(grid, grid, dtype=F64))
            value, gr = p.grad(g)
            if mode == "oblivious":
                z = g.flatten() - 1.0
                expect = (M @ z).pow(2).sum() / (classes * HW ** 2)
                expect_grad = 2.0 * M.T @ (M @ z) / (classes * HW ** 2)
                assert float(p.loss(unit(torch.ones(grid, grid, dtype=F64)) * math.sqrt(HW))) < 1e-28
            else:
                s = p.s[0]
                expect = s @ M @ g.flatten() / HW + s @ bias
                expect_grad = M.T @ s / HW
            torch.testing.assert_close(value, expect, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(gr.flatten(), expect_grad, rtol=1e-10, atol=1e-15)
    # the projected gradient is the gradient with respect to f through f / ||f||, times ||f||
    f = torch.randn(grid, grid, dtype=F64) * 3.0
    fr = f.clone().requires_grad_(True)
    p.loss(fr / fr.norm()).backward()
    g = unit(f)
    torch.testing.assert_close(fr.grad * f.norm(), project(g, p.grad(g)[1]), rtol=1e-10, atol=1e-15)


def test_oracle_descent_on_2x2_grid_matches_brute_force():
    """On a 2 x 2 grid (the 3-sphere) the descent's best point is the brute-force minimum of a dense
    sample of the sphere, and the secular-equation minimizer."""
    torch.manual_seed(0)
    model, layer, side = small_cnn(3, classes=3, grid=2)
    image = rand_images(1, side)[0]
    for mode in ("oblivious", "specific"):
        p = Problem(model, image, layer, mode, target=1)
        g, value, _ = sphere_descent(p, descent_starts(p))
        sample = unit(torch.randn(200_000, 2, 2, dtype=F64))
        with torch.no_grad():
            losses = p.loss(sample)
        k = int(torch.argmin(losses))
        assert value <= float(losses[k]) + 1e-14
        spread = float(losses.max() - losses.min())
        assert float(losses[k]) - value < 1e-3 * spread
        assert float((sample[k] - g).abs().max()) < 0.05
        if mode == "oblivious":
            M = p.plain_head_matrix()
            G = M.T @ M
            gs, hard = sphere_quadratic_min(G, G @ torch.ones(4, dtype=F64))
            assert not hard
            assert close_direction(g, gs.view(2, 2))


@pytest.mark.parametrize("classes,grid", [(5, 6), (20, 4)])
def test_oracle_descent_matches_secular_equation(classes, grid):
    """The descent's minimum of ||M (g - 1)||^2 on the sphere is the eigen/secular one, both for
    K < HW (rank-deficient Gram) and K > HW; the class-specific one is -M^T s / ||M^T s||."""
    torch.manual_seed(1)
    model, layer, side = small_cnn(21, classes=classes, grid=grid)
    image = rand_images(1, side)[0]
    p = Problem(model, image, layer, "oblivious")
    g, value, pn = sphere_descent(p, descent_starts(p))
    M = p.plain_head_matrix()
    G = M.T @ M
    gs, hard = sphere_quadratic_min(G, G @ torch.ones(grid * grid, dtype=F64))
    assert not hard
    assert close_direction(g, gs.view(grid, grid))
    assert abs(value - float(p.loss(gs.view(grid, grid)))) <= 1e-10 * value
    assert pn < 1e-10 * p.grad_scale()
    q = Problem(model, image, layer, "specific", target=3)
    g, value, _ = sphere_descent(q, descent_starts(q))
    c = M.T @ q.s[0]
    assert close_direction(g, (-c).view(grid, grid))


def test_oracle_hard_case_has_zero_minimum():
    """Zero spatial mean per channel: M 1 = 0, NT = b and any unit g in the null space of M
    (K < HW) gives loss 0; the secular solver reports the hard case and the descent finds 0."""
    torch.manual_seed(2)
    model, layer, side = small_cnn(31, classes=5, grid=5, head="centered")
    p = Problem(model, rand_images(1, side)[0], layer, "oblivious")
    M = p.plain_head_matrix()
    assert float((M @ torch.ones(25, dtype=F64)).abs().max()) < 1e-12 * float(M.abs().max())
    G = M.T @ M
    gs, hard = sphere_quadratic_min(G, G @ torch.ones(25, dtype=F64))
    assert hard
    assert float(p.loss(gs.view(5, 5))) < 1e-12 * p.loss_scale()
    _, value, _ = sphere_descent(p, descent_starts(p))
    assert value < 1e-12 * p.loss_scale()


# ----------------------------------------------------------------------------------------------
# 1. objective and gradient_norm are the loss and the projected gradient at the returned filter
# ----------------------------------------------------------------------------------------------

CASES = {
    # name: (small_cnn kwargs, breakpoint override)
    "plain": (dict(classes=7, grid=5), None),
    "relu": (dict(classes=9, grid=4, head="relu"), None),
    "generic": (dict(classes=6, grid=5), "0"),     # the first conv: the tail holds a conv, not fused
}


def build_case(case, seed):
    kwargs, override = CASES[case]
    model, layer, side = small_cnn(seed, **kwargs)
    return model, override or layer, side


def assert_objective_and_gradient(exp, probs, constraint="l2norm"):
    N, T = len(probs), len(probs[0])
    assert tuple(exp.objective.shape) == (N, T)
    assert tuple(exp.gradient_norm.shape) == (N, T)
    problems = []
    for n in range(N):
        for t in range(T):
            p = probs[n][t]
            if constraint == "l2norm":
                value, gn = p.on_sphere(lib_unit(exp, n, t))
                gscale = p.grad_scale()
            else:
                value, gn = p.param_loss(exp.parameters[n, t], constraint)
                start = torch.zeros(2, dtype=F64) if constraint == "gauss" else torch.zeros(p.H, p.W, dtype=F64)
                gscale = p.param_loss(start, constraint)[1]
            lib_value, lib_gn = float(exp.objective[n, t]), float(exp.gradient_norm[n, t])
            if not abs(lib_value - value) <= 1e-6 * abs(value) + 1e-12 * p.loss_scale():
                problems.append(f"(n={n}, t={t}) objective {lib_value!r} != oracle {value!r}")
            if not abs(lib_gn - gn) <= 1e-6 * gn + 1e-9 * gscale:
                problems.append(f"(n={n}, t={t}) gradient_norm {lib_gn!r} != oracle {gn!r}"
                                f" (gradient scale {gscale:.3g})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("solver", ["gd", "exact"])
@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("case", list(CASES))
def test_objective_and_gradient_norm(case, mode, solver):
    torch.manual_seed(100)
    model, layer, side = build_case(case, seed=7)
    images = rand_images(2, side)
    targets = random_targets(2, 2, model[-1].out_features)
    exp = explain(model, images, layer, mode, targets, solver=solver, max_iter=200)
    assert exp.solver == solver and exp.map == "abs"
    T = 2 if mode == "specific" else 1
    assert tuple(exp.filters.shape) == (2, T, *exp.maps.shape[-2:])
    if mode == "specific":
        assert torch.equal(torch.as_tensor(exp.targets).long(), targets.long())
    probs = problems_of(model, images, layer, mode, targets)
    assert_objective_and_gradient(exp, probs)


@pytest.mark.parametrize("solver", ["gd", "exact"])
@pytest.mark.parametrize("constraint,mode", [("softmax", "oblivious"), ("softmax", "specific"),
                                             ("gauss", "oblivious"), ("gauss", "specific")])
def test_objective_and_gradient_norm_other_constraints(constraint, mode, solver):
    """softmax / gauss: the loss at the returned parameters and the norm of its gradient with
    respect to them (the softmax logits, the gaussian mean)."""
    torch.manual_seed(101)
    model, layer, side = small_cnn(8, classes=6, grid=5)
    images = rand_images(2, side)
    targets = random_targets(2, 1, 6)
    exp = explain(model, images, layer, mode, targets, solver=solver, constraint=constraint,
                  max_iter=200)
    probs = problems_of(model, images, layer, mode, targets)
    assert_objective_and_gradient(exp, probs, constraint)


# ----------------------------------------------------------------------------------------------
# 2. the exact solver is never worse than gd, and stationary
# ----------------------------------------------------------------------------------------------

EXACT_CASES = {
    # name: (small_cnn kwargs, breakpoint override, closed form)
    "plain-K<HW": (dict(classes=5, grid=6), None, True),
    "plain-K>HW": (dict(classes=20, grid=4), None, True),
    "hard": (dict(classes=5, grid=5, head="centered", center_bias=0.02), None, True),
    "relu": (dict(classes=8, grid=5, head="relu"), None, False),
    "generic": (dict(classes=6, grid=5), "0", False),
}


def assert_stationary(p, g, closed_form, tag):
    """Closed forms: the projected gradient is ~0.  Iterated cases: below (10 x) the tolerance, or
    no descent is possible: a further descent from g gains nothing beyond rounding."""
    value, pn = p.on_sphere(g)
    scale = p.grad_scale()
    if closed_form:
        assert pn < 1e-6 * scale, f"{tag}: projected gradient {pn:.3g} (scale {scale:.3g})"
        return
    if pn <= 10 * TOLERANCE:
        return
    _, better, _ = sphere_descent(p, g[None], max_iter=300)
    gain = value - better
    assert gain <= 1e-9 * (abs(value) + p.loss_scale()), (
        f"{tag}: projected gradient {pn:.3g} > tolerance and a descent from the returned filter "
        f"lowers the loss from {value!r} to {better!r}")


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_not_above_gd_and_stationary(case, mode):
    torch.manual_seed(200)
    kwargs, override, closed_form = EXACT_CASES[case]
    model, layer, side = small_cnn(17, **kwargs)
    layer = override or layer
    images = rand_images(3, side)
    targets = random_targets(3, 2, model[-1].out_features)
    gd = explain(model, images, layer, mode, targets, solver="gd")
    exact = explain(model, images, layer, mode, targets, solver="exact")
    probs = problems_of(model, images, layer, mode, targets)
    problems = []
    for n, row in enumerate(probs):
        for t, p in enumerate(row):
            tag = f"{case} {mode} (n={n}, t={t})"
            v_gd, _ = p.on_sphere(lib_unit(gd, n, t))
            v_ex, _ = p.on_sphere(lib_unit(exact, n, t))
            if not v_ex <= v_gd + 1e-9 * abs(v_gd) + 1e-13 * p.loss_scale():
                problems.append(f"{tag}: exact loss {v_ex!r} above gd's {v_gd!r}")
            if not float(exact.objective[n, t]) <= float(gd.objective[n, t]) + 1e-9 * abs(v_gd) \
                    + 1e-13 * p.loss_scale():
                problems.append(f"{tag}: exact objective {float(exact.objective[n, t])!r} above gd's "
                                f"{float(gd.objective[n, t])!r}")
            try:
                assert_stationary(p, lib_unit(exact, n, t), closed_form, tag)
            except AssertionError as error:
                problems.append(str(error))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("constraint", ["softmax", "gauss"])
@pytest.mark.parametrize("mode", ["oblivious", "specific"])
def test_exact_other_constraints_not_above_gd(constraint, mode):
    """softmax / gauss iterate from gd's result until the gradient is below the tolerance, or no
    further descent is possible."""
    torch.manual_seed(201)
    model, layer, side = small_cnn(19, classes=6, grid=5, head="relu")
    images = rand_images(2, side)
    targets = random_targets(2, 2, 6)
    kw = dict(constraint=constraint, max_iter=300)
    gd = explain(model, images, layer, mode, targets, solver="gd", **kw)
    exact = explain(model, images, layer, mode, targets, solver="exact", **kw)
    probs = problems_of(model, images, layer, mode, targets)
    problems = []
    for n, row in enumerate(probs):
        for t, p in enumerate(row):
            v_gd, gn_gd = p.param_loss(gd.parameters[n, t], constraint)
            v_ex, gn_ex = p.param_loss(exact.parameters[n, t], constraint)
            tag = f"{constraint} {mode} (n={n}, t={t})"
            if not v_ex <= v_gd + 1e-9 * abs(v_gd) + 1e-13 * p.loss_scale():
                problems.append(f"{tag}: exact loss {v_ex!r} above gd's {v_gd!r}")
            if gn_ex > 10 * TOLERANCE:
                better = param_descent(p, exact.parameters[n, t], constraint)
                if not v_ex - better <= 1e-9 * (abs(v_ex) + p.loss_scale()):
                    problems.append(
                        f"{tag}: gradient norm {gn_ex:.3g} > tolerance {TOLERANCE} (gd's "
                        f"{gn_gd:.3g}) and a descent from the returned parameter "
                        f"{[round(v, 3) for v in exact.parameters[n, t].flatten().tolist()[:4]]} "
                        f"lowers the loss from {v_ex!r} to {better!r}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# 3. the closed forms are the minimizers a long projected-gradient descent finds
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes,grid", [(5, 6), (20, 4)], ids=["K<HW", "K>HW"])
def test_exact_oblivious_is_the_global_minimizer(classes, grid):
    torch.manual_seed(300)
    model, layer, side = small_cnn(23, classes=classes, grid=grid)
    images = rand_images(2, side)
    exp = explain(model, images, layer, "oblivious", None, solver="exact")
    for n in range(2):
        p = Problem(model, images[n], layer, "oblivious")
        g, best, _ = sphere_descent(p, descent_starts(p))
        got = lib_unit(exp, n, 0)
        value, _ = p.on_sphere(got)
        assert value <= best + 1e-9 * best, (n, value, best)
        assert close_direction(got, g), (n, cosine(got, g), float((got - g).abs().max()))


@pytest.mark.parametrize("center_bias", [0.0, 0.02], ids=["ones-in-null-space", "near"])
def test_exact_oblivious_hard_case(center_bias):
    """K < HW and the ones vector (almost) orthogonal to the rows of M: the minimum is 0 and not
    unique; the exact solver must reach it."""
    torch.manual_seed(301)
    model, layer, side = small_cnn(29, classes=5, grid=5, head="centered", center_bias=center_bias)
    images = rand_images(2, side)
    exp = explain(model, images, layer, "oblivious", None, solver="exact")
    for n in range(2):
        p = Problem(model, images[n], layer, "oblivious")
        M = p.plain_head_matrix()
        G = M.T @ M
        _, hard = sphere_quadratic_min(G, G @ torch.ones(25, dtype=F64))
        assert hard   # the construction is really the hard case
        _, best, _ = sphere_descent(p, descent_starts(p))
        value, _ = p.on_sphere(lib_unit(exp, n, 0))
        random_value = float(p.loss(unit(torch.randn(5, 5, dtype=F64))))
        assert value <= best + 1e-10 * random_value, (n, value, best, random_value)
        assert value <= 1e-10 * random_value, (n, value, random_value)


@pytest.mark.parametrize("classes,grid", [(5, 6), (20, 4)], ids=["K<HW", "K>HW"])
def test_exact_specific_is_minus_normalized_gradient(classes, grid):
    torch.manual_seed(302)
    model, layer, side = small_cnn(37, classes=classes, grid=grid)
    images = rand_images(2, side)
    targets = random_targets(2, 3, classes)
    exp = explain(model, images, layer, "specific", targets, solver="exact")
    for n in range(2):
        for t in range(3):
            p = Problem(model, images[n], layer, "specific", int(targets[n, t]))
            c = p.plain_head_matrix().T @ p.s[0]
            expect = (-c / c.norm()).view(grid, grid)
            got = lib_unit(exp, n, t)
            torch.testing.assert_close(got, expect, rtol=0, atol=1e-9)
            g, best, _ = sphere_descent(p, descent_starts(p))
            assert close_direction(got, g)
            value, _ = p.on_sphere(got)
            assert value <= best + 1e-9 * abs(best), (n, t, value, best)


# ----------------------------------------------------------------------------------------------
# 4. the map options
# ----------------------------------------------------------------------------------------------

def expected_map(f, option):
    f = f.to(F64)
    if option == "abs":
        m = f.abs()
    elif option == "positive":
        m = f.clamp_min(0)
    else:
        m = f
    n = norm2d(m)[..., None, None]
    return torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(m))


@pytest.mark.parametrize("solver", ["gd", "exact"])
@pytest.mark.parametrize("option", ["abs", "positive", "signed"])
def test_l2norm_maps(option, solver):
    torch.manual_seed(400)
    model, layer, side = small_cnn(41, classes=8, grid=5)
    images = rand_images(2, side)
    targets = random_targets(2, 2, 8)
    kw = dict(solver=solver, max_iter=300, lr=5.0)   # lr 5: gd's filters get both signs too
    exp = explain(model, images, layer, "specific", targets, map=option, **kw)
    assert exp.map == option and exp.solver == solver
    f = exp.filters.to(F64)
    assert bool((f < 0).any()) and bool((f > 0).any())    # both signs: the options differ here
    torch.testing.assert_close(exp.maps.to(F64), expected_map(f, option), rtol=1e-6, atol=1e-9)
    default = explain(model, images, layer, "specific", targets, **kw)
    assert default.map == "abs"
    torch.testing.assert_close(default.filters.to(F64), f, rtol=1e-9, atol=1e-12)
    if option != "abs":
        assert float((default.maps.to(F64) - exp.maps.to(F64)).abs().max()) > 1e-3


def test_positive_map_without_positive_cell_is_zero():
    """A >= 0 (the breakpoint is a ReLU) and s^T W > 0 in every channel: the class-specific optimum
    -M^T s / ||M^T s|| has no positive cell, so the positive map is all zeros (not NaN)."""
    torch.manual_seed(401)
    model, _, side = small_cnn(43, classes=6, grid=4, head="relu")
    layer = "3"                                   # the ReLU: A >= 0, a plain head after it
    target = 2
    with torch.no_grad():
        w = model[-1].weight
        w.copy_(w.abs() + 0.1)
        w[target] = -w[target]
    images = rand_images(2, side)
    exp = explain(model, images, layer, "specific", [target], solver="exact", map="positive")
    assert bool((exp.filters <= 0).all()), exp.filters
    assert torch.equal(exp.maps, torch.zeros_like(exp.maps))
    signed = explain(model, images, layer, "specific", [target], solver="exact", map="signed")
    torch.testing.assert_close(signed.maps.to(F64), expected_map(signed.filters, "signed"),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("constraint", ["softmax", "gauss"])
def test_nonnegative_constraints_maps_coincide(constraint):
    torch.manual_seed(402)
    model, layer, side = small_cnn(47, classes=6, grid=5)
    images = rand_images(2, side)
    targets = random_targets(2, 2, 6)
    maps = {}
    for option in ("abs", "positive", "signed"):
        exp = explain(model, images, layer, "specific", targets, constraint=constraint,
                      map=option, max_iter=100)
        assert exp.map == option
        maps[option] = exp.maps.to(F64)
        assert bool((maps[option] >= 0).all())
    torch.testing.assert_close(maps["positive"], maps["abs"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(maps["signed"], maps["abs"], rtol=1e-9, atol=1e-12)
    H, W = maps["abs"].shape[-2:]
    for n in range(2):
        for t in range(2):
            expect = multiplier_of(exp.parameters[n, t].to(F64), constraint, H, W)
            torch.testing.assert_close(maps["abs"][n, t], expect, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# 5. the positive map localizes better on the project's two-object scenes
# ----------------------------------------------------------------------------------------------

SCENES = 2000  # the methods differ on a few percent of the maps: paired counts need this many


def test_positive_map_points_better_on_two_object_scenes():
    """On two-object scenes a class-specific filter is pushed negative over the other object; the
    positive map leaves that object out.  Counted per map: where "positive" and "abs" (or Grad-CAM)
    disagree, "positive" hits more often."""
    from caffast.eval.scenes import make_scene, normalize
    from caffast.eval.demo_model import load_demo_model
    from caffast.engine.explain import upsample_maps
    from caffast.eval.gradcam import grad_cam
    from caffast.eval.metrics import pointing_game

    torch.set_num_threads(2)
    model = load_demo_model()
    scenes = [make_scene(1_000_000 + k, objects=2) for k in range(SCENES)]
    images = torch.stack([normalize(torch.as_tensor(scene.image)) for scene in scenes])
    targets = torch.tensor([list(scene.labels) for scene in scenes], dtype=torch.long)
    size = tuple(images.shape[-2:])

    def hits(maps: torch.Tensor) -> np.ndarray:
        heat = upsample_maps(maps, size)
        return np.array([
            pointing_game(heat[n, t].detach().cpu().numpy(), np.asarray(scene.masks[scene.labels.index(target)]),
                          tolerance=round(15 * size[0] / 224))
            for n, scene in enumerate(scenes) for t, target in enumerate(targets[n].tolist())
        ])

    baseline = hits(grad_cam(model, images, "features", targets).maps)
    for solver in ("gd", "exact"):
        filters = caffast.explain(model, images, "features", mode="specific", targets=targets, solver=solver).filters
        # the map options' formulas are checked above; here they are applied to one run's filters
        scores = {option: hits(caffast.normalize_filter(filters, map=option)) for option in ("abs", "positive")}
        positive = scores["positive"]
        for rival, rival_hits in (("abs", scores["abs"]), ("Grad-CAM", baseline)):
            wins, losses = int((positive & ~rival_hits).sum()), int((~positive & rival_hits).sum())
            assert wins > 2 * losses, f"{solver}: positive against {rival}: {wins} wins, {losses} losses"


# ----------------------------------------------------------------------------------------------
# 6. bad options
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,allowed", [("map", ("abs", "positive", "signed")),
                                            ("solver", ("gd", "exact"))])
def test_bad_option_names_the_allowed_values(option, allowed):
    torch.manual_seed(600)
    model, layer, side = small_cnn(53, classes=4, grid=4)
    with pytest.raises(ValueError) as info:
        caffast.explain(model, rand_images(1, side), layer, **{option: "bogus"})
    message = str(info.value)
    assert option in message, message
    for value in allowed:
        assert value in message, message
