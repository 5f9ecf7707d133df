"""Fused heads: detected on the torchvision families, and equal to autograd through the real tail."""

import pytest
import torch

import caffast
from caffast.core.heads import detect_head
from caffast.core.breakpoints import split

from fused_models import FUSED_FAMILIES, build


# autograd through depthwise float64 convolutions is slow on the CPU: these two are checked for
# detection here and against the compiled backend in test_backends.py
SLOW_GENERIC = ("mobilenet_v2", "efficientnet_b0")


@pytest.mark.parametrize("arch,layer,size", [f for f in FUSED_FAMILIES if f[0] not in SLOW_GENERIC])
def test_fused_head_equals_autograd_through_the_tail(arch, layer, size):
    model = build(arch)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    for mode, targets in (("oblivious", None), ("specific", [3, 7])):
        settings = dict(mode=mode, targets=targets, max_iter=25, check_every=5, min_error=1e-9, backend="torch")
        fused = caffast.explain(model, images, layer, **settings)
        generic = caffast.explain(model, images, layer, fused=False, **settings)
        assert (fused.path, generic.path) == ("fused", "generic")
        torch.testing.assert_close(fused.maps, generic.maps, atol=1e-10, rtol=0)
        torch.testing.assert_close(fused.loss, generic.loss, atol=1e-10, rtol=1e-10)
        assert torch.equal(fused.iterations, generic.iterations)


@pytest.mark.parametrize("constraint", ["l2norm", "softmax", "gauss"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("arch,layer,size", [("resnet18", "layer4", 64), ("relu_head", "features", 24)])
def test_fused_head_every_constraint_and_optimizer(constraint, optimizer, arch, layer, size):
    model = build(arch)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    for mode, targets in (("oblivious", None), ("specific", [1, 2])):
        settings = dict(
            mode=mode, targets=targets, max_iter=30, check_every=5, min_error=1e-9, backend="torch",
            constraint=constraint, optimizer=optimizer, init="normal", seed=11,
        )
        fused = caffast.explain(model, images, layer, **settings)
        generic = caffast.explain(model, images, layer, fused=False, **settings)
        torch.testing.assert_close(fused.maps, generic.maps, atol=1e-10, rtol=0)
        assert torch.equal(fused.iterations, generic.iterations)


@pytest.mark.parametrize(
    "arch,layer",
    [("resnext50_32x4d", "layer4"), ("wide_resnet50_2", "layer4"), *((a, l) for a, l, _ in FUSED_FAMILIES if a in SLOW_GENERIC)],
)
def test_more_families_are_fused(arch, layer):
    capture, tail = split(build(arch), layer, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert detect_head(tail, tuple(capture.features.shape[2:])) is not None


@pytest.mark.parametrize(
    "arch,layer",
    [("vgg11", "features"), ("resnet18", "layer3"), ("resnet18", "layer4.1.conv2"), ("mobilenet_v2", "features.17")],
)
def test_other_tails_take_the_generic_path(arch, layer):
    model = build(arch)
    capture, tail = split(model, layer, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    grid = tuple(capture.features.shape[2:])
    assert detect_head(tail, grid) is None


@pytest.mark.parametrize("arch", ["densenet121", "relu_head"])
def test_head_with_relu_before_the_pool_is_recognised(arch):
    model = build(arch)
    capture, tail = split(model, "features", torch.randn(1, 3, 64, 64, dtype=torch.float64))
    spec = detect_head(tail, tuple(capture.features.shape[2:]))
    assert spec is not None and spec.relu and spec.weight is model.classifier.weight


def test_custom_objective_takes_the_generic_path():
    model = build("resnet18")
    exp = caffast.explain(
        model, torch.randn(1, 3, 64, 64, dtype=torch.float64), "layer4", max_iter=3, backend="torch",
        objective=lambda ft, nt: (ft - nt).abs().sum(dim=1),
    )
    assert exp.path == "generic"


@pytest.mark.parametrize("constraint", ["softmax", "gauss"])
def test_float32_fused_head_with_a_non_sphere_constraint_and_the_fast_solver(constraint):
    """The softmax and Gaussian filters come in the parameters' float32 and meet the fused head's
    float64 Grams: the answer is the generic path's."""
    model = build("relu_head").float()
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    settings = dict(mode="oblivious", constraint=constraint, solver="fast", max_iter=20, backend="torch")
    fused = caffast.explain(model, images, "features", **settings)
    generic = caffast.explain(model, images, "features", fused=False, **settings)
    assert (fused.path, generic.path) == ("fused", "generic")
    torch.testing.assert_close(fused.maps, generic.maps, atol=1e-4, rtol=0)
