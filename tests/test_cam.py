"""The CAM-style front end: pytorch-grad-cam's call shape, our maps."""

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision

import caffast
from caffast.cam import GradCAM, L2CAF
from caffast.eval.gradcam import grad_cam


@dataclass
class ClassifierOutputTarget:  # the shape of pytorch-grad-cam's target objects
    category: int


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(8)
    return torchvision.models.resnet18(num_classes=6).eval()


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", [L2CAF, GradCAM])
@pytest.mark.parametrize("targets", [None, [1, 4], [ClassifierOutputTarget(2), ClassifierOutputTarget(5)]])
def test_shapes_ranges_outputs_and_hooks(model, method, targets):
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(9))
    options = {"max_iter": 20} if method is L2CAF else {}
    with method(model, target_layers=[model.layer4], **options) as cam:
        maps = cam(input_tensor=images, targets=targets)
        assert hooks(model) == 0
        torch.testing.assert_close(cam.outputs, model(images).detach())
    assert maps.dtype == np.float32 and maps.shape == (2, 64, 48)
    assert maps.min() == 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_l2caf_equals_explain_upsampled(model):
    images = torch.randn(2, 3, 64, 64)
    with L2CAF(model, target_layers=[model.layer4], max_iter=30) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(3), 1])
    exp = caffast.explain(model, images, model.layer4, mode="specific", targets=torch.tensor([[3], [1]]), max_iter=30, loss="logit")
    np.testing.assert_allclose(maps, exp.upsample(64)[:, 0].numpy(), atol=1e-6)


def test_gradcam_uses_the_top1_class_without_targets(model):
    images = torch.randn(2, 3, 64, 64)
    with GradCAM(model, target_layers=[model.layer4]) as cam:
        maps = cam(input_tensor=images)
    top1 = model(images).argmax(dim=1, keepdim=True)
    expected = caffast.engine.explain.upsample_maps(grad_cam(model, images, "layer4", top1).maps, 64)[:, 0]
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-6)


def test_bad_targets(model):
    with L2CAF(model, target_layers=[model.layer4]) as cam:
        with pytest.raises(ValueError, match="one per image"):
            cam(input_tensor=torch.randn(2, 3, 64, 64), targets=[1])
        with pytest.raises(TypeError, match="category"):
            cam(input_tensor=torch.randn(1, 3, 64, 64), targets=["cat"])
        for one in (5, ClassifierOutputTarget(5), torch.tensor(5)):  # pytorch-grad-cam takes a list, one per image
            with pytest.raises(TypeError, match=r"targets must be a list with one target per image, such as "
                                                r"\[ClassifierOutputTarget\(281\)\] \* 1, or None"):  # fmt: skip
                cam(input_tensor=torch.randn(1, 3, 64, 64), targets=one)
    with pytest.raises(ValueError, match="target_layers is empty"):
        GradCAM(model, target_layers=[])


def test_l2caf_takes_the_map_and_solver_options(model):
    images = torch.randn(2, 3, 64, 64)
    with L2CAF(model, target_layers=[model.layer4], map="positive", solver="exact") as cam:
        maps = cam(input_tensor=images, targets=[3, 1])
    exp = caffast.explain(model, images, model.layer4, mode="specific", targets=torch.tensor([[3], [1]]),
                          map="positive", solver="exact", loss="logit")
    np.testing.assert_allclose(maps, exp.upsample(64)[:, 0].numpy(), atol=1e-6)


def test_a_gpu_asked_for_where_there_is_none_is_named(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for options, asked in (({"use_cuda": True}, "use_cuda=True"), ({"device": "cuda:0"}, "device='cuda:0'")):
        with pytest.raises(ValueError, match=f"{asked} needs a CUDA GPU and this machine has none"):
            L2CAF(model, target_layers=[model.layer4], **options)
    with pytest.raises(ValueError, match="device='toaster': .*pass a device such as 'cpu'"):
        L2CAF(model, target_layers=[model.layer4], device="toaster")
    assert all(torch.equal(before[name], tensor) and tensor.device.type == "cpu"
               for name, tensor in model.state_dict().items())  # fmt: skip


class Flip:
    """Half of a ttach transform: it can augment but not undo."""

    def augment_image(self, images):
        return images.flip(3)


@pytest.mark.parametrize("transforms,named", [(5, "int"), ([], "list"), ([Flip()], "list of ['Flip']")])
def test_malformed_test_time_transforms_are_refused_when_the_cam_is_made(model, transforms, named):
    with pytest.raises(TypeError, match=rf"tta_transforms must be a ttach Compose .*; got {re.escape(named)}$"):
        L2CAF(model, target_layers=[model.layer4], tta_transforms=transforms)
