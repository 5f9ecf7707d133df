"""The class-specific losses: each equal to a plain restatement, the same on the fused and the generic
path, the linear ones solved in closed form, and the release's unchanged."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import caffast
from caffast.core.losses import CLASS_LOSSES, DEFAULT_CLASS_LOSS, as_class_loss
from caffast.core.problems import FusedProblem


def plain_loss(name: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each loss written out from its definition, one row at a time."""
    rows = []
    for row, target in zip(logits, targets.tolist()):
        others = torch.cat([row[:target], row[target + 1 :]])
        if name == "release":
            rows.append(others.sum() - row[target])
        elif name == "margin":
            rows.append(others.mean() - row[target])
        elif name == "logit":
            rows.append(-row[target])
        else:
            rows.append(torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[target])
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_each_loss_equals_its_definition(name):
    generator = torch.Generator().manual_seed(hash(name) % 1000)
    logits = torch.randn(6, 11, dtype=torch.float64, generator=generator) * 5
    targets = torch.randint(0, 11, (6,), generator=generator)
    loss = CLASS_LOSSES[name]
    weights = loss.weights(targets, 11, torch.float64)
    got = loss(logits, targets, weights)
    torch.testing.assert_close(got, plain_loss(name, logits, targets), rtol=1e-12, atol=1e-12)


def test_unknown_loss_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="margin"):
        as_class_loss("cross_entropy")
    assert as_class_loss(CLASS_LOSSES["logit"]) is CLASS_LOSSES["logit"]


class Net(nn.Module):
    """conv -> [ReLU] -> pool -> Linear: a head the fused path takes."""

    def __init__(self, relu: bool, classes: int = 9):
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, stride=2)
        self.relu = relu
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        a = self.features(x)
        a = F.relu(a) if self.relu else a
        return self.fc(F.adaptive_avg_pool2d(a, 1).flatten(1))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_fused_and_generic_paths_agree_for_every_loss(name, relu):
    torch.manual_seed(3)
    model = Net(relu).double().eval()
    images = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    settings = dict(mode="specific", targets=[1, 4], max_iter=40, check_every=5, min_error=0, loss=name, backend="torch")
    fused = caffast.explain(model, images, "features", **settings)
    generic = caffast.explain(model, images, "features", fused=False, **settings)
    assert fused.path == "fused" and generic.path == "generic" and fused.class_loss == name
    torch.testing.assert_close(fused.filters, generic.filters, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused.objective, generic.objective, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["margin", "logit"])
def test_linear_losses_have_the_closed_form_minus_c_over_its_norm(name):
    torch.manual_seed(4)
    model = Net(relu=False).double().eval()
    images = torch.randn(1, 3, 13, 13, dtype=torch.float64)
    exact = caffast.explain(model, images, "features", mode="specific", targets=[2], solver="exact", loss=name)
    # oracle: the loss is s . (W A g / HW + b), linear in g; its minimizer on the sphere is -c / ||c||
    a = model.features(images)[0].flatten(1)  # (C, HW)
    s = torch.full((9,), 1 / 8 if name == "margin" else 0.0, dtype=torch.float64)
    s[2] = -1
    c = (model.fc.weight.T @ s) @ a
    torch.testing.assert_close(exact.filters.flatten(), -c / c.norm(), rtol=1e-9, atol=1e-12)
    assert exact.iterations.item() == 0  # no loop ran


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("constraint", ["l2norm", "softmax"])
def test_compiled_log_softmax_loop_equals_its_twin_and_the_restated_loss(relu, constraint):
    """The C++ loop on the K x HW products against the shared loop on FusedProblem (its twin), and
    the loss at the answer against a plain restatement through the real head in float64."""
    cpp = pytest.importorskip("caffast.backends.cpp")
    if not cpp.available():
        pytest.skip("caffast._C is not built")
    from caffast.core.constraints import as_constraint
    from caffast.core.heads import detect_head, precompute
    from caffast.core.breakpoints import split
    from caffast.core.loop import LoopSettings, solve

    torch.manual_seed(11)
    model = Net(relu).double().eval()
    images = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    capture, tail = split(model, "features", images)
    grid = tuple(capture.features.shape[2:])
    image_index = torch.tensor([0, 0, 1])
    targets = torch.tensor([2, 7, 4])
    head = precompute(detect_head(tail, grid), capture.features, image_index, "specific",
                      CLASS_LOSSES["log_softmax"], targets)  # fmt: skip
    assert head.linear is None and head.products is not None
    settings = LoopSettings(max_iter=120, lr=0.5, min_error=0.0, check_every=10, optimizer="sgd")
    start = torch.randn(3, grid[0] * grid[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kind = as_constraint(constraint)
    got, iterations, loss = cpp.solve_fused(head, kind, start, settings)
    twin = solve(FusedProblem(head, kind), start.view(3, *grid), settings)
    assert torch.equal(iterations, twin.iterations)
    torch.testing.assert_close(got, twin.params.flatten(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(loss, twin.loss, rtol=0, atol=1e-9)
    # the restated loss: the real head on the filtered map, at the answer
    g = kind.multiplier(got.view(3, *grid), grid)
    with torch.no_grad():
        a = model.features(images).index_select(0, image_index) * g[:, None]
        logits = model.fc(F.adaptive_avg_pool2d(F.relu(a) if relu else a, 1).flatten(1))
    restated = -torch.log_softmax(logits, 1).gather(1, targets[:, None])[:, 0]
    final, _ = FusedProblem(head, kind).loss_and_grad(got.view(3, *grid), torch.arange(3))
    torch.testing.assert_close(final, restated, rtol=1e-10, atol=1e-12)


def test_log_softmax_runs_on_a_compiled_backend_and_matches_the_torch_loop():
    pytest.importorskip("caffast._C")
    torch.manual_seed(6)
    model = Net(relu=True).eval()
    images = torch.randn(2, 3, 13, 13)
    settings = dict(mode="specific", targets=[[0, 5], [3, 3]], max_iter=60, loss="log_softmax")
    compiled = caffast.explain(model, images, "features", backend="cpp", **settings)
    plain = caffast.explain(model, images, "features", backend="torch", **settings)
    torch.testing.assert_close(compiled.maps, plain.maps)
    for solver in ("fast", "exact"):
        better = caffast.explain(model, images, "features", backend="cpp", solver=solver, **settings)
        assert (better.objective <= compiled.objective + 1e-9).all()


def test_the_release_loss_is_the_sum_of_the_others_minus_the_target():
    torch.manual_seed(7)
    model = Net(relu=False).double().eval()
    images = torch.randn(1, 3, 13, 13, dtype=torch.float64)
    exp = caffast.explain(model, images, "features", mode="specific", targets=[5], max_iter=30, loss="release")
    with torch.no_grad():
        a = model.features(images)
        g = exp.filters[0, 0] / exp.filters[0, 0].norm()
        output = model.fc(F.adaptive_avg_pool2d(a * g, 1).flatten(1))[0]
    expected = output.sum() - 2 * output[5]
    torch.testing.assert_close(exp.objective[0, 0], expected, rtol=1e-9, atol=1e-9)


def test_default_loss_is_target_focused_and_recorded():
    torch.manual_seed(8)
    model = Net(relu=False).eval()
    exp = caffast.explain(model, torch.randn(1, 3, 13, 13), "features", mode="specific", targets=[1], max_iter=5)
    assert exp.class_loss == DEFAULT_CLASS_LOSS == "margin"
    assert caffast.explain(model, torch.randn(1, 3, 13, 13), "features", max_iter=5).class_loss is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_every_loss_on_the_gpu_equals_the_torch_loop_on_the_cpu(name):
    torch.manual_seed(9)
    model = Net(relu=True).eval()
    images = torch.randn(2, 3, 13, 13)
    settings = dict(mode="specific", targets=[[0, 5], [3, 3]], max_iter=60, loss=name)
    gpu = caffast.explain(model.cuda(), images.cuda(), "features", **settings)
    cpu = caffast.explain(model.cpu(), images, "features", backend="torch", **settings)
    assert gpu.backend == "triton" and gpu.path == "fused"
    torch.testing.assert_close(gpu.filters.cpu(), cpu.filters, rtol=1e-5, atol=1e-6)
