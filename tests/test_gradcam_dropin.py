"""`from caffast.cam import L2CAF as GradCAM` in pytorch-grad-cam's own situations: its keywords, its
call, its augmentation and eigen smoothing, and its shape, dtype and range."""

import numpy as np
import pytest
import torch
import torchvision

from caffast.cam import L2CAF, first_component
from caffast.engine.explain import explain, upsample_maps

gradcam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=120).eval()


@pytest.fixture(scope="module")
def untrained():
    """`untrained(arch)`: its model with 120 classes, built once for the module (L2CAF hands a model
    back unchanged, which the tests check)."""
    built = {}

    def model(arch):
        if arch not in built:
            torch.manual_seed(0)
            built[arch] = getattr(torchvision.models, arch)(num_classes=120)
        return built[arch]

    return model


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
@pytest.mark.parametrize("batch,height,width", [(2, 32, 32), (1, 40, 32)])
@pytest.mark.parametrize("category", [None, 100])
@pytest.mark.parametrize("eigen_smooth", [True, False])
def test_its_run_all_models_situation(arch, batch, height, width, category, eigen_smooth, untrained):
    model = untrained(arch)
    layers = [model.layer4[-1], model.layer4[-2]] if arch == "resnet18" else [model.features[-1]]
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).repeat(batch, 1, 1, 1)
    cam = L2CAF(model=model, target_layers=layers, max_iter=10)
    cam.batch_size = 4
    targets = None if category is None else [ClassifierOutputTarget(category) for _ in range(batch)]
    maps = cam(input_tensor=images, targets=targets, aug_smooth=False, eigen_smooth=eigen_smooth)
    assert maps.shape == (batch, height, width) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert hooks(model) == 0


def test_every_constructor_keyword_and_the_positional_forms(resnet):
    images = torch.randn(2, 3, 32, 32)
    plain = L2CAF(resnet, [resnet.layer4], max_iter=20)(images, [3, 4])
    keywords = dict(reshape_transform=None, compute_input_gradient=True, uses_gradients=False, tta_transforms=None,
                    detach=False, use_cuda=False)  # fmt: skip
    with L2CAF(model=resnet, target_layers=[resnet.layer4], max_iter=20, **keywords) as cam:
        np.testing.assert_array_equal(cam(images, [3, 4], False, False), plain)
    # pytorch-grad-cam before 1.5: (model, target_layers, use_cuda); RefineCAM: (model, layers, reshape_transform)
    np.testing.assert_array_equal(L2CAF(resnet, [resnet.layer4], False, max_iter=20)(images, [3, 4]), plain)
    np.testing.assert_array_equal(L2CAF(resnet, [resnet.layer4], None, max_iter=20)(images, [3, 4]), plain)


def test_a_layer_name_is_one_name(resnet):
    images = torch.randn(2, 3, 32, 32)
    by_module = L2CAF(resnet, [resnet.layer4, resnet.layer3], max_iter=20)(images, [3, 4])
    np.testing.assert_array_equal(L2CAF(resnet, ["layer4", "layer3"], max_iter=20)(images, [3, 4]), by_module)
    np.testing.assert_array_equal(L2CAF(resnet, ["layer4", resnet.layer3], max_iter=20)(images, [3, 4]), by_module)
    single = L2CAF(resnet, [resnet.layer4], max_iter=20)(images, [3, 4])
    np.testing.assert_array_equal(L2CAF(resnet, "layer4", max_iter=20)(images, [3, 4]), single)
    np.testing.assert_array_equal(L2CAF(resnet, resnet.layer4, max_iter=20)(images, [3, 4]), single)
    with pytest.raises(TypeError, match="module names or modules"):
        L2CAF(resnet, [4])


def test_aug_smooth_is_the_mean_over_flips_and_scales(resnet):
    images = torch.randn(2, 3, 32, 48)
    cam = L2CAF(resnet, [resnet.layer4], max_iter=20)
    expected = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            augmented = (images.flip(3) if flip else images) * factor
            maps = cam(augmented, [5, 6])
            expected.append(maps[:, :, ::-1] if flip else maps)
    smoothed = cam(images, [5, 6], aug_smooth=True)
    np.testing.assert_allclose(smoothed, np.mean(expected, axis=0), atol=1e-6)
    assert smoothed.dtype == np.float32 and smoothed.shape == (2, 32, 48)


def test_aug_smooth_with_ttach_transforms_equals_the_default(resnet):
    tta = pytest.importorskip("ttach")
    images = torch.randn(1, 3, 32, 32)
    transforms = tta.Compose([tta.HorizontalFlip(), tta.Multiply(factors=[0.9, 1, 1.1])])
    ours = L2CAF(resnet, [resnet.layer4], max_iter=20)(images, [7], aug_smooth=True)
    theirs = L2CAF(resnet, [resnet.layer4], tta_transforms=transforms, max_iter=20)(images, [7], aug_smooth=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_first_component_is_pytorch_grad_cams_projection():
    weighted = torch.randn(3, 16, 5, 6, generator=torch.Generator().manual_seed(1))
    weighted[0, 2, 1, 1] = float("nan")
    np.testing.assert_allclose(first_component(weighted).numpy(), get_2d_projection(weighted.numpy()), atol=1e-5)


def test_eigen_smooth_maps_the_first_component_of_the_filtered_activations(resnet):
    images = torch.randn(2, 3, 64, 64)
    maps = L2CAF(resnet, [resnet.layer4], max_iter=30)(images, [1, 2], eigen_smooth=True)
    exp = explain(resnet, images, "layer4", mode="specific", targets=torch.tensor([[1], [2]]), max_iter=30, loss="logit")
    projection = get_2d_projection((exp.features * exp.filters).numpy())
    expected = upsample_maps(torch.from_numpy(np.maximum(projection, 0))[:, None], 64)[:, 0].numpy()
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert not np.allclose(maps, L2CAF(resnet, [resnet.layer4], max_iter=30)(images, [1, 2]), atol=1e-2)


def test_its_refine_cam_and_arcc_run_on_l2caf(resnet):
    from pytorch_grad_cam.metrics.arcc import ARCC
    from pytorch_grad_cam.refine_cam import RefineCAM

    images = torch.randn(2, 3, 64, 64)
    targets = [ClassifierOutputTarget(43)] * 2
    refined = RefineCAM(model=resnet, target_layers=[resnet.layer4[-1]], base_method=L2CAF)
    maps = refined(input_tensor=images, targets=targets)
    assert maps.shape == (2, 64, 64)
    scores = ARCC(base_method=refined)(input_tensor=images, grayscale_cams=maps, targets=targets, model=resnet)
    assert len(scores) == 2 and np.all((scores >= 0) & (scores <= 1))


def test_a_one_channel_model_in_a_loop_leaves_no_hooks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    images = torch.rand(3, 1, 48, 48) * 255
    for _ in range(3):
        with L2CAF(model=model, target_layers=[model.layer4], max_iter=10) as cam:
            maps = cam(input_tensor=images, targets=None)
        assert maps.shape == (3, 48, 48) and hooks(model) == 0
