"""The exact solver's pieces against long projected-gradient runs in float64, and the map finalizations."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import caffast
from caffast.core import exact
from caffast.core.constraints import CONSTRAINTS, normalize_filter


def sphere_descent(gradient, start: torch.Tensor, rate: float, steps: int = 30000) -> torch.Tensor:
    """Plain Riemannian gradient descent from each row of `start`: a fixed step on the tangent plane,
    then back to the sphere."""
    g = F.normalize(start, dim=-1)
    for _ in range(steps):
        grad = gradient(g)
        g = F.normalize(g - rate * (grad - g * (g * grad).sum(-1, keepdim=True)), dim=-1)
    return g


def best_of_descents(gram: torch.Tensor, generator: torch.Generator, starts: int = 4) -> torch.Tensor:
    """The lowest of several descents on (g - 1)^T G (g - 1), from the ones vector and random points."""
    ones = torch.ones(gram.shape[0], dtype=gram.dtype)
    # the sphere's Hessian is G - lambda I, with the multiplier lambda >= lambda_min(G) - ||G 1||
    rate = 1 / float(torch.linalg.eigvalsh(gram).max() + (gram @ ones).norm())
    random_starts = torch.randn(starts - 1, gram.shape[0], generator=generator, dtype=gram.dtype)
    results = sphere_descent(lambda g: 2 * (g - ones) @ gram, torch.cat([ones[None], random_starts]), rate)
    return min(results, key=lambda g: float(quadratic(gram)(g)))


def gram_of(products: torch.Tensor) -> torch.Tensor:
    return products.T @ products


def quadratic(gram: torch.Tensor):
    ones = torch.ones(gram.shape[0], dtype=gram.dtype)
    return lambda g: (g - ones) @ gram @ (g - ones)


def random_products(case: str, generator: torch.Generator, cells: int = 9) -> torch.Tensor:
    """An M (K x HW) whose Gram is full rank, rank deficient, or in the hard case (||P 1|| < 1)."""
    if case == "full rank":
        return torch.randn(20, cells, generator=generator, dtype=torch.float64)
    if case == "rank deficient":
        return torch.randn(3, cells, generator=generator, dtype=torch.float64)
    rows = torch.randn(3, cells, generator=generator, dtype=torch.float64)
    rows -= rows.mean(dim=1, keepdim=True)  # orthogonal to the ones vector ...
    return rows + 0.02 * torch.randn(3, 1, generator=generator, dtype=torch.float64)  # ... nearly


@pytest.mark.parametrize("case", ["full rank", "rank deficient", "hard"])
def test_sphere_quadratic_minimizer_equals_long_descent(case):
    generator = torch.Generator().manual_seed(["full rank", "rank deficient", "hard"].index(case))
    products = random_products(case, generator)
    gram = gram_of(products)
    loss_fn = quadratic(gram)
    found = exact._sphere_quadratic_minimizer(gram[None])[0]
    descended = best_of_descents(gram, generator)
    assert float(found.norm()) == pytest.approx(1.0, abs=1e-12)
    assert float(loss_fn(found)) <= float(loss_fn(descended)) + 1e-10
    if case == "hard":
        ones = torch.ones(gram.shape[0], dtype=torch.float64)
        assert float((torch.linalg.pinv(gram) @ gram @ ones).norm()) < 1  # the construction is a hard case
        # zero loss is reachable on a whole sphere of minimizers; the one nearest the ones vector is taken
        assert float(loss_fn(found)) == pytest.approx(0.0, abs=1e-10)
        nearest = found @ torch.ones_like(found)
        assert float(nearest) >= float(descended @ torch.ones_like(found)) - 1e-8
    else:
        assert torch.allclose(found, descended, atol=1e-6)


def test_linear_minimizer_equals_long_descent():
    generator = torch.Generator().manual_seed(5)
    direction = torch.randn(12, generator=generator, dtype=torch.float64)
    found = exact._piecewise_linear_minimizer(direction[None], direction[None])[0]
    descended = sphere_descent(lambda g: direction, torch.ones(12, dtype=torch.float64), rate=0.1, steps=3000)
    assert torch.allclose(found, descended, atol=1e-8)
    flat = torch.zeros(1, 4, dtype=torch.float64)
    assert torch.allclose(exact._piecewise_linear_minimizer(flat, flat), torch.full((1, 4), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_piecewise_linear_minimizer_beats_every_sampled_point(seed):
    """After a ReLU the class-specific loss is linear on each orthant; no point of the sphere is lower."""
    generator = torch.Generator().manual_seed(seed)
    positive, negative = torch.randn(2, 1, 5, generator=generator, dtype=torch.float64)
    if seed == 3:  # no cell can lower the loss
        positive, negative = positive.abs(), -negative.abs()

    def loss(g: torch.Tensor) -> torch.Tensor:
        return torch.where(g >= 0, g * positive, g * negative).sum(-1)

    found = exact._piecewise_linear_minimizer(positive, negative)
    samples = F.normalize(torch.randn(200_000, 5, generator=generator, dtype=torch.float64), dim=1)
    descended = sphere_descent(lambda g: torch.where(g >= 0, positive, negative), samples[:64], rate=1e-3, steps=3000)
    assert float(found.norm()) == pytest.approx(1.0)
    assert float(loss(found)) <= float(loss(samples).min()) + 1e-12
    assert float(loss(found)) <= float(loss(descended).min()) + 1e-12


class QuadraticProblem:
    """(g - 1)^T G (g - 1) on the unit sphere, through the l2norm parameterization, one Gram per problem."""

    def __init__(self, grams: torch.Tensor):
        self.grams = grams

    def loss_and_grad(self, params, active):
        with torch.enable_grad():
            params = params.detach().requires_grad_(True)
            g = F.normalize(params, dim=1)
            z = g - 1
            loss = torch.einsum("pi,pij,pj->p", z, self.grams.index_select(0, active), z)
            (grad,) = torch.autograd.grad(loss.sum(), params)
        return loss.detach(), grad


def test_descend_reaches_the_closed_form_and_never_rises():
    generator = torch.Generator().manual_seed(11)
    grams = torch.stack([gram_of(random_products(case, generator)) for case in ("full rank", "rank deficient")])
    problem = QuadraticProblem(grams)
    start = torch.randn(2, 9, generator=generator, dtype=torch.float64)
    start_loss, _ = problem.loss_and_grad(F.normalize(start, dim=1), torch.arange(2))
    params, steps, _ = exact.descend(problem, start, CONSTRAINTS["l2norm"], tolerance=1e-9, max_steps=20000)
    loss, gradient_norm = exact.stationarity(problem, params, CONSTRAINTS["l2norm"])
    closed = exact._sphere_quadratic_minimizer(grams)
    closed_loss, _ = problem.loss_and_grad(closed, torch.arange(2))
    assert (loss <= start_loss).all() and (steps > 0).all()
    assert (gradient_norm < 1e-8).all()
    assert torch.allclose(loss, closed_loss, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["abs", "positive", "signed"])
def test_map_finalizations(kind):
    f = torch.randn(3, 5, 5, dtype=torch.float64)
    kept = {"abs": f.abs(), "positive": f.clamp_min(0), "signed": f}[kind]
    expected = kept / kept.flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(normalize_filter(f, map=kind), expected)
    assert np.allclose(normalize_filter(f.numpy(), map=kind), expected.numpy())


def test_positive_map_of_a_filter_with_no_positive_cell_is_zero():
    assert torch.equal(normalize_filter(-torch.ones(3, 3), map="positive"), torch.zeros(3, 3))


def small_cnn(classes: int, relu_head: bool) -> nn.Sequential:
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)]
    if relu_head:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes)).double().eval()


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("relu_head", [False, True])
def test_exact_is_lower_than_the_loop_and_stationary(mode, relu_head):
    torch.manual_seed(21)
    model = small_cnn(7, relu_head)
    images = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    targets = [0, 4] if mode == "specific" else None
    loop = caffast.explain(model, images, "2", mode=mode, targets=targets, max_iter=300)
    found = caffast.explain(model, images, "2", mode=mode, targets=targets, max_iter=300, solver="exact")
    assert found.path == "fused" and found.solver == "exact"
    assert (found.objective <= loop.objective + 1e-10 * loop.objective.abs().clamp_min(1)).all()
    if not relu_head or mode == "specific":  # the closed forms
        assert (found.iterations == 0).all()
        assert (found.gradient_norm < 1e-10 * loop.gradient_norm.clamp_min(1)).all()
    else:
        assert (found.gradient_norm < 1e-8).all()


def test_gradient_norm_at_a_kink_is_the_least_subgradient():
    """After a ReLU the class-specific minimizer leaves cells at exactly zero, where the loss has two
    one-sided slopes; both straddle zero there, so the reported norm vanishes."""
    torch.manual_seed(0)
    model = small_cnn(9, relu_head=True)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    found = caffast.explain(model, images, "2", mode="specific", targets=[2], solver="exact")
    assert (found.filters == 0).any()
    assert (found.gradient_norm < 1e-12).all()
    nudged = caffast.explain(model, images, "2", mode="specific", targets=[2], max_iter=5)
    assert (nudged.gradient_norm > 1e-6).all()


def test_exact_agrees_across_backends_and_paths():
    torch.manual_seed(2)
    model = small_cnn(5, relu_head=False)
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    fused = caffast.explain(model, images, "2", solver="exact", backend="torch")
    compiled = caffast.explain(model, images, "2", solver="exact", backend="cpp")
    generic = caffast.explain(model, images, "2", solver="exact", fused=False, max_iter=300, tolerance=1e-9)
    assert torch.allclose(fused.maps, compiled.maps)
    assert generic.path == "generic"
    assert torch.allclose(generic.objective, fused.objective, rtol=1e-6)
    assert torch.allclose(generic.maps, fused.maps, atol=1e-4)


def test_objective_is_the_loss_at_the_returned_filter():
    torch.manual_seed(4)
    model = small_cnn(6, relu_head=True)
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    result = caffast.explain(model, images, "2", mode="specific", targets=[1], max_iter=100, loss="release")
    features = model[:3](images)
    g = F.normalize(result.filters.flatten(2), dim=2).view_as(result.filters)[:, 0]
    logits = model[3:](features * g[:, None])
    signs = torch.ones(6, dtype=torch.float64)
    signs[1] = -1
    assert torch.allclose(result.objective[:, 0], logits @ signs)
    default = caffast.explain(model, images, "2", mode="specific", targets=[1], max_iter=100)
    g = F.normalize(default.filters.flatten(2), dim=2).view_as(default.filters)[:, 0]
    logits = model[3:](features * g[:, None])
    margin = (logits.sum(1) - logits[:, 1]) / 5 - logits[:, 1]  # the mean of the other five, minus the target
    assert torch.allclose(default.objective[:, 0], margin)


def test_no_cell_lowers_the_loss_and_two_tie():
    positive, negative = torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[-1.0, -1.0, -3.0]])
    found = exact._piecewise_linear_minimizer(positive.double(), negative.double())
    assert torch.equal(found, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))  # cost 1, where two cells cost sqrt(2)


def test_exact_history_ends_with_the_answer():
    torch.manual_seed(6)
    model = small_cnn(5, relu_head=False)
    images = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    found = caffast.explain(model, images, "2", mode="specific", targets=[1], solver="exact", history=True)
    assert len(found.history) == 1 and torch.equal(found.history[-1][1], found.maps)
