"""The two tails, the extracted fx graph and the hooked whole model, give the same answer."""

import torch
import torchvision

import caffast
from caffast.core.breakpoints import split


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


class Branchy(Plain):
    def forward(self, x):
        x = self.body(x)
        if x.sum() > -1e30:  # data-dependent control flow: untraceable
            x = x * 1.0
        return self.fc(x.mean(dim=(2, 3)))


def test_hook_tail_equals_fx_tail():
    torch.manual_seed(3)
    plain = Plain().double().eval()
    branchy = Branchy().double().eval()
    branchy.load_state_dict(plain.state_dict())
    images = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    for mode, targets in (("oblivious", None), ("specific", [0, 2])):
        fx_run = caffast.explain(plain, images, "body", mode=mode, targets=targets, max_iter=60, check_every=10)
        hook_run = caffast.explain(branchy, images, "body", mode=mode, targets=targets, max_iter=60, check_every=10)
        assert (fx_run.tail, hook_run.tail) == ("fx", "hook")
        torch.testing.assert_close(fx_run.maps, hook_run.maps, atol=1e-10, rtol=0)
        assert torch.equal(fx_run.iterations, hook_run.iterations)


def test_fx_tail_captures_the_skip_connection_that_crosses_the_breakpoint():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=7).double().eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    capture, tail = split(model, "layer4.1.conv1", images)
    assert tail.kind == "fx" and len(tail.captured) == 1  # the identity branch of layer4.1
    index = torch.tensor([1, 0, 1])
    replay = tail(capture.features[index], index)
    torch.testing.assert_close(replay, capture.output[[1, 0, 1]], atol=1e-12, rtol=0)
    scaled = tail(capture.features * 0.5, torch.arange(2))
    assert not torch.allclose(scaled, capture.output)


def test_plans_are_reused_until_a_submodule_is_replaced():
    from caffast.core.breakpoints import _PLANS

    torch.manual_seed(6)
    model = Plain().eval()
    images = torch.randn(2, 3, 20, 20)
    split(model, "body", images)
    first = _PLANS[model]["body"].plan
    split(model, "body", images)
    assert _PLANS[model]["body"].plan is first
    model.fc = torch.nn.Linear(8, 4)
    capture, tail = split(model, "body", images)
    assert _PLANS[model]["body"].plan is not first
    torch.testing.assert_close(capture.output, model(images).detach())
    torch.testing.assert_close(tail(capture.features, torch.arange(2)), model(images).detach())
