"""The Grad-CAM baseline against a plain restatement: gradients of the score w.r.t. the features."""

import torch
import torchvision

from caffast.eval.gradcam import grad_cam


def test_grad_cam_equals_the_definition():
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=9).double().eval()
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    maps, output = grad_cam(model, images, "layer4", targets=[2, 6])
    torch.testing.assert_close(output, model(images).detach())
    assert maps.shape == (3, 2, 2, 2)
    for column, target in enumerate([2, 6]):
        for n in range(3):
            stash = {}
            handle = model.layer4.register_forward_hook(lambda m, i, o: stash.setdefault("a", o))
            output = model(images[n : n + 1])
            handle.remove()
            (grad,) = torch.autograd.grad(output[0, target], stash["a"])
            expected = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * stash["a"]).sum(dim=1))[0]
            torch.testing.assert_close(maps[n, column], expected.detach(), atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_with_an_in_place_op_after_the_breakpoint():
    """densenet applies ReLU in place to the breakpoint's output."""
    torch.manual_seed(3)
    model = torchvision.models.densenet121(num_classes=5).eval()
    maps, output = grad_cam(model, torch.randn(2, 3, 64, 64), "features", targets=[1])
    assert maps.shape == (2, 1, 2, 2) and torch.isfinite(maps).all()
    assert all(p.grad is None for p in model.parameters())
