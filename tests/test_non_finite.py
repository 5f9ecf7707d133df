"""A problem that goes non-finite stops with a NonFiniteError naming the problem and the cause,
on every path (fused compiled, fused torch, generic), never NaN or all-zero maps."""

import pytest
import torch
from torch import nn

import caffast
from caffast import NonFiniteError


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Shifted(nn.Module):
    """Features in (1, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x):
        return torch.sigmoid(self.conv(x)) + 1


class LogTail(nn.Module):
    """A tail that takes log(mean - offset): finite on the unfiltered map, NaN where the filter
    shrinks the mean below the offset (at the start, the 4 x 4 unit filter divides it by 4)."""

    def __init__(self, offset):
        super().__init__()
        self.features = Shifted()
        self.fc = nn.Linear(6, 4)
        self.offset = offset

    def forward(self, x):
        return self.fc(torch.log(self.features(x).mean(dim=(2, 3)) - self.offset))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Small().eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 17, 17)


PATHS = [dict(backend="cpp"), dict(backend="torch"), dict(fused=False)]
MODES = [dict(mode="oblivious"), dict(mode="specific", targets=[3])]


def test_the_error_is_a_value_error():
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -float("inf")])
def test_a_non_finite_lr_is_refused_before_anything_runs(model, images, lr):
    with pytest.raises(ValueError, match=r"lr must be a finite positive number, got"):
        caffast.explain(model, images, "features", lr=lr)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_a_huge_lr_that_empties_the_filter_is_an_error(model, images, path, mode):
    # steps of 1e30 take the float32 filter past where its norm overflows: the map would be all zeros
    with pytest.raises(NonFiniteError, match=r"filter of problem \(image 0.*vanished.*overflows float32: lower lr \(now 1e\+30\)"):
        caffast.explain(model, images, "features", lr=1e30, max_iter=20, **path, **mode)


@pytest.mark.parametrize("solver", ["gd", "exact"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_solver_and_optimizer_reports_it(model, images, solver, optimizer):
    with pytest.raises(NonFiniteError, match=r"lower lr \(now 1e\+30\)"):
        caffast.explain(model, images, "features", lr=1e30, max_iter=20, fused=False, solver=solver, optimizer=optimizer)


def test_a_gauss_filter_that_goes_nan_is_reported_at_its_iteration(model, images):
    with pytest.raises(NonFiniteError, match=r"NaN or infinite at iteration 2 of problem \(image 0\): lower lr"):
        caffast.explain(model, images, "features", lr=1e30, max_iter=20, constraint="gauss", fused=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_huge_inputs_name_the_feature_scale(model, images, path, mode):
    with pytest.raises(NonFiniteError, match=r"scale the images down \(the feature map of layer 'features' reaches 1\.\d+e\+\d\d"):
        caffast.explain(model, images * 1e30, "features", max_iter=20, **path, **mode)


def test_a_nan_born_in_the_tail_at_the_start():
    torch.manual_seed(2)
    with pytest.raises(NonFiniteError, match=r"not finite at the starting filter of problem \(image 0, target 1\), "
                                             r"before any step: check the layers after 'features'"):  # fmt: skip
        caffast.explain(LogTail(0.5).eval(), torch.randn(2, 3, 9, 9), "features", mode="specific", targets=[1])


def test_a_nan_born_in_the_tail_later_names_the_iteration_and_the_lr():
    torch.manual_seed(2)
    model, images = LogTail(0.3).eval(), torch.randn(2, 3, 9, 9)
    assert torch.isfinite(caffast.explain(model, images, "features", mode="specific", targets=[1], max_iter=100, loss="release").maps).all()
    with pytest.raises(NonFiniteError, match=r"became NaN or infinite at iteration \d+ of problem \(image 0, target 1\): "
                                             r"lower lr \(now 50\)"):  # fmt: skip
        caffast.explain(model, images, "features", mode="specific", targets=[1], max_iter=100, lr=50, loss="release")


def test_an_objective_that_returns_nan(model, images):
    def objective(ft, nt):
        return ((ft - nt) ** 2).mean(dim=1) * float("nan")

    with pytest.raises(NonFiniteError, match=r"starting filter of problem \(image 0\).*check the objective"):
        caffast.explain(model, images, "features", objective=objective)


def test_a_callable_target_that_returns_nan_is_named(model, images):
    """The problem is named by its callable target, not by the -1 that stands for it, and the
    callable is the first suspect."""

    def broken_score(output):
        return output[2] * float("nan")

    with pytest.raises(NonFiniteError) as error:
        caffast.explain(model, images, "features", mode="specific", targets=[[1, broken_score]] * 2)
    message = str(error.value)
    assert "problem (image 0, the target broken_score)" in message and "target -1" not in message
    assert "check the target broken_score: it must return a finite value, or" in message


def test_the_first_non_finite_iteration_is_the_one_named(model, images):
    calls = []

    def objective(ft, nt):  # finite for two iterations, then NaN for image 1 only
        calls.append(1)
        loss = ((ft - nt) ** 2).mean(dim=1)
        return loss * torch.tensor([1.0, float("nan") if len(calls) >= 3 else 1.0])

    with pytest.raises(NonFiniteError, match=r"at iteration 3 of problem \(image 1\): lower lr \(now 0.5\), or check the objective"):
        caffast.explain(model, images, "features", objective=objective, max_iter=100, min_error=0)
    assert len(calls) == 51  # the loop stopped at the first check after it (iteration 51), not at 100


def test_finite_runs_are_unchanged(model, images):
    exp = caffast.explain(model, images, "features", mode="specific", targets=[3], lr=5.0, max_iter=40)
    assert torch.isfinite(exp.maps).all() and (exp.maps.flatten(2).norm(dim=2) > 0.99).all()
