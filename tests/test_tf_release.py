"""The TensorFlow release's loop: TF1's Adam ("adam_tf1") and a schedule that ends at 0 (end_lr)."""

import pytest
import torch

import caffast
from caffast.core.optimizers import make_optimizer
from reference_loop import TF1Adam, reference_l2caf
from fused_models import build


def run_rule(name, gradients):
    """Parameters after each step of caffast's update rule `name` on a fixed gradient sequence."""
    params = torch.zeros(1, gradients.shape[1], dtype=torch.float64)
    rule, active, out = make_optimizer(name, params), torch.tensor([0]), []
    for grad in gradients:
        rule.step(params, grad[None].clone(), active, lr=0.5)
        out.append(params[0].clone())
    return torch.stack(out)


def run_restatement(gradients):
    param = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=torch.float64))
    opt, out = TF1Adam([param], lr=0.5), []
    for grad in gradients:
        param.grad = grad.clone()
        opt.step()
        out.append(param.detach().clone())
    return torch.stack(out)


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-8])
def test_adam_tf1_is_tensorflow1s_update(scale):
    gradients = torch.randn(30, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    torch.testing.assert_close(run_rule("adam_tf1", gradients), run_restatement(gradients), rtol=1e-12, atol=0)


def test_adam_tf1_differs_from_torchs_adam_on_small_gradients():
    """Epsilon hat: with gradients near 1e-8 the two forms take visibly different steps."""
    gradients = torch.full((5, 1), 1e-8, dtype=torch.float64)
    tf1, torch_form = run_rule("adam_tf1", gradients), run_rule("adam", gradients)
    assert ((tf1 - torch_form).abs() / torch_form.abs()).min() > 0.2
    large = torch.ones_like(gradients)  # the forms agree once sqrt(v) is far above eps
    torch.testing.assert_close(run_rule("adam_tf1", large), run_rule("adam", large), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("mode,target", [("oblivious", None), ("specific", 4)])
def test_tf_release_loop_equals_its_restatement(backend, mode, target):
    """adam_tf1, a schedule ending at 0 and the normal init on the fused head: the compiled backend
    hands these to the shared loop, and both equal the restated loop through the whole model."""
    model = build("relu_head")
    image = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    settings = dict(max_iter=120, lr=0.5, min_error=1e-9, check_every=10)
    exp = caffast.explain(model, image, "features", mode=mode, targets=None if target is None else [target],
                          optimizer="adam_tf1", end_lr=0.0, init="normal", seed=11, backend=backend, loss="release",
                          **settings)
    assert exp.path == "fused" and exp.backend == backend
    init = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)[0]
    ref = reference_l2caf(model, image, "features", target, mode=mode, optimizer="adam_tf1", end_lr=0.0,
                          init=init, **settings)
    torch.testing.assert_close(exp.filters[0, 0], ref["filter"], atol=1e-9, rtol=0)
    assert int(exp.iterations[0, 0]) == ref["iterations"]


def test_end_lr_is_the_schedule_floor():
    """SGD with end_lr 0 is the restated loop with a floor of 0, on the generic and compiled paths,
    and differs from the default floor of 1e-5."""
    model = build("relu_head")
    image = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    settings = dict(mode="specific", max_iter=40, lr=0.5, min_error=0.0)
    ref = reference_l2caf(model, image, "features", 3, end_lr=0.0, **settings)
    settings["loss"] = "release"  # the restated loop's
    for options in (dict(backend="cpp"), dict(backend="torch", fused=False)):
        exp = caffast.explain(model, image, "features", targets=[3], end_lr=0.0, **options, **settings)
        torch.testing.assert_close(exp.filters[0, 0], ref["filter"], atol=1e-10, rtol=0)
    default = caffast.explain(model, image, "features", targets=[3], backend="cpp", **settings)
    assert (default.filters[0, 0] - ref["filter"]).abs().max() > 1e-8
    with pytest.raises(ValueError, match="end_lr"):
        caffast.explain(model, image, "features", end_lr=-1.0)
