"""The user's hooks run as in the model's own forward, on every path.

Each hooked model is compared with a model without hooks that computes the same function (the
hook's scaling folded into the last Linear layer's weights): an independent oracle for the maps.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import caffast

SETTINGS = dict(max_iter=25, check_every=5, min_error=1e-9)
MODES = [("oblivious", None), ("specific", [1, 3])]


class Small(nn.Module):
    """A resnet's names and head (layer3, layer4, avgpool, fc) on a tiny body."""

    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer4(self.layer3(x))), 1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Small().double().eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 17, 17, dtype=torch.float64)


def folded(model, weight_scale, bias_scale):
    """The model without hooks, its last Linear scaled as a hook would scale its input or output."""
    oracle = copy.deepcopy(model)
    for hooks in (oracle.fc._forward_hooks, oracle.fc._forward_pre_hooks, oracle.avgpool._forward_pre_hooks,
                  oracle.layer4._forward_hooks, oracle._forward_hooks):  # fmt: skip
        hooks.clear()
    with torch.no_grad():
        oracle.fc.weight.mul_(weight_scale)
        oracle.fc.bias.mul_(bias_scale)
    return oracle


def assert_same_maps(got, expected):
    torch.testing.assert_close(got.maps, expected.maps, atol=1e-10, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-9, rtol=1e-9)
    assert torch.equal(got.iterations, expected.iterations)


@pytest.mark.parametrize("mode,targets", MODES)
@pytest.mark.parametrize("where", ["fc output", "fc input", "avgpool input"])
def test_a_hook_on_a_tail_module_is_not_skipped_by_the_fused_head(model, images, mode, targets, where):
    if where == "fc output":
        model.fc.register_forward_hook(lambda _module, _inputs, output: output * 2)
        oracle = folded(model, 2, 2)
    elif where == "fc input":
        model.fc.register_forward_pre_hook(lambda _module, inputs: (inputs[0] * 3,))
        oracle = folded(model, 3, 1)
    else:
        model.avgpool.register_forward_pre_hook(lambda _module, inputs: (inputs[0] * 0.5,))
        oracle = folded(model, 0.5, 1)
    hooked = caffast.explain(model, images, "layer4", mode=mode, targets=targets, **SETTINGS)
    generic = caffast.explain(model, images, "layer4", mode=mode, targets=targets, fused=False, **SETTINGS)
    expected = caffast.explain(oracle, images, "layer4", mode=mode, targets=targets, **SETTINGS)
    assert (hooked.path, hooked.tail, expected.path) == ("generic", "fx", "fused")
    assert_same_maps(hooked, generic)
    assert_same_maps(hooked, expected)
    torch.testing.assert_close(hooked.output, expected.output, atol=1e-12, rtol=0)


def test_a_backward_hook_on_a_tail_module_takes_the_generic_path(model, images):
    model.fc.register_full_backward_hook(lambda _module, grad_input, _grad_output: grad_input)
    assert caffast.explain(model, images, "layer4", max_iter=2).path == "generic"


@pytest.mark.parametrize("mode,targets", MODES)
def test_a_hook_on_the_model_itself_runs(model, images, mode, targets):
    model.register_forward_hook(lambda _module, _inputs, output: output * 2)
    hooked = caffast.explain(model, images, "layer4", mode=mode, targets=targets, **SETTINGS)
    expected = caffast.explain(folded(model, 2, 2), images, "layer4", mode=mode, targets=targets, **SETTINGS)
    assert (hooked.tail, hooked.path) == ("hook", "generic")
    assert_same_maps(hooked, expected)


def test_a_global_module_hook_runs(model, images):
    fc = model.fc
    handle = register_module_forward_hook(lambda module, _inputs, output: output * 2 if module is fc else None)
    try:
        hooked = caffast.explain(model, images, "layer4", mode="specific", targets=[2], **SETTINGS)
    finally:
        handle.remove()
    expected = caffast.explain(folded(model, 2, 2), images, "layer4", mode="specific", targets=[2], **SETTINGS)
    assert (hooked.tail, hooked.path) == ("hook", "generic")
    assert_same_maps(hooked, expected)


def test_a_hook_on_a_container_after_the_breakpoint_runs_at_every_call_also_once_traced(model, images):
    plain = caffast.explain(model, images, "layer3", mode="specific", targets=[4], **SETTINGS)  # traced, cached
    seen = []
    doubling = model.layer4.register_forward_hook(lambda _module, _inputs, output: output * 2)
    watching = model.layer4.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    hooked = caffast.explain(model, images, "layer3", mode="specific", targets=[4], **SETTINGS)
    expected = caffast.explain(folded(model, 2, 1), images, "layer3", mode="specific", targets=[4], **SETTINGS)
    assert hooked.tail == "fx"
    assert_same_maps(hooked, expected)
    assert seen and all(type(value) is torch.Tensor for value in seen)  # real values, never tracing proxies
    doubling.remove()
    watching.remove()
    after = caffast.explain(model, images, "layer3", mode="specific", targets=[4], **SETTINGS)
    torch.testing.assert_close(after.maps, plain.maps, atol=0, rtol=0)


@pytest.mark.parametrize("mode,targets", MODES)
def test_a_hooked_module_right_after_the_breakpoint_is_not_folded(model, images, mode, targets):
    """layer4's convolution is affine in the filtered map and would be folded into the feature map;
    with a hook on it, it runs as a module, and its hook with it."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle.layer4[0].weight.mul_(2)
        oracle.layer4[0].bias.mul_(2)
    model.layer4[0].register_forward_hook(lambda _module, _inputs, output: output * 2)
    hooked = caffast.explain(model, images, "layer3", mode=mode, targets=targets, **SETTINGS)
    expected = caffast.explain(oracle, images, "layer3", mode=mode, targets=targets, **SETTINGS)
    assert hooked.path == expected.path == "generic"
    assert_same_maps(hooked, expected)
