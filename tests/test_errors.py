"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
import torchvision

import caffast


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 64, 64)


def test_unknown_layer_lists_nearest_names(model, images):
    with pytest.raises(ValueError, match=r"no layer named 'layr4'.*nearest names: .*layer4"):
        caffast.explain(model, images, "layr4")


def test_module_not_in_model(model, images):
    with pytest.raises(ValueError, match="not part of the model"):
        caffast.explain(model, images, torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("layer", ["fc", "avgpool.__missing__"])
def test_layer_that_is_not_a_feature_map(model, images, layer):
    if layer == "fc":
        with pytest.raises(ValueError, match=r"outputs \(2, 5\).*4-D \(N, C, H, W\)"):
            caffast.explain(model, images, layer)
    else:
        with pytest.raises(ValueError, match="no layer named"):
            caffast.explain(model, images, layer)


@pytest.mark.parametrize("targets", [5, [0, 7], -1, torch.tensor([[0], [5]])])
def test_target_out_of_range(model, images, targets):
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        caffast.explain(model, images, "layer4", mode="specific", targets=targets, max_iter=2)


def test_targets_tensor_of_wrong_shape(model, images):
    with pytest.raises(ValueError, match=r"shape \(N, T\)"):
        caffast.explain(model, images, "layer4", mode="specific", targets=torch.ones(2, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one class per image: 3 labels for 2 images"):
        caffast.explain(model, images, "layer4", mode="specific", targets=torch.tensor([1, 2, 3]))


def test_targets_with_class_oblivious(model, images):
    with pytest.raises(ValueError, match="mode='specific'"):
        caffast.explain(model, images, "layer4", targets=1)


@pytest.mark.parametrize("shape,hint", [((3, 64, 64), "unsqueeze"), ((64, 64), r"\(N, C, H, W\)")])
def test_images_of_the_wrong_rank(model, shape, hint):
    with pytest.raises(ValueError, match=hint):
        caffast.explain(model, torch.randn(*shape), "layer4")


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty batch"):
        caffast.explain(model, torch.randn(0, 3, 64, 64), "layer4")


def test_images_not_a_tensor(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        caffast.explain(model, [[1.0]], "layer4")


def test_nan_in_features(model, images):
    images[1, :, :8, :8] = float("nan")
    with pytest.raises(ValueError, match="feature map of layer 'layer4' holds NaN or Inf"):
        caffast.explain(model, images, "layer4")


def test_inf_in_output(images):
    torch.manual_seed(0)
    broken = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        broken.fc.bias[2] = float("inf")
    with pytest.raises(ValueError, match="model output holds NaN or Inf"):
        caffast.explain(broken, images, "layer4")


@pytest.mark.parametrize(
    "option,value",
    [("mode", "sideways"), ("constraint", "l1"), ("optimizer", "lbfgs"), ("backend", "tpu"), ("init", "zeros")],
)
def test_unknown_choice_lists_the_choices(model, images, option, value):
    with pytest.raises(ValueError, match=rf"unknown {option} '{value}'; choose one of"):
        caffast.explain(model, images, "layer4", **{option: value})


@pytest.mark.parametrize(
    "option,value", [("max_iter", 0), ("check_every", 0), ("lr", 0.0), ("min_error", -1.0), ("max_iter", 2.5)]
)
def test_bad_settings(model, images, option, value):
    with pytest.raises(ValueError, match=option):
        caffast.explain(model, images, "layer4", **{option: value})


def test_objective_must_return_one_loss_per_sample(model, images):
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(2,\)"):
        caffast.explain(model, images, "layer4", objective=lambda ft, nt: (ft - nt).abs().mean(), max_iter=2)


def test_objective_with_class_specific(model, images):
    with pytest.raises(ValueError, match="mode='oblivious'"):
        caffast.explain(model, images, "layer4", mode="specific", objective=lambda ft, nt: ft.sum(1))


def test_class_specific_needs_class_scores(images):
    embed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="use mode='oblivious'"):
        caffast.explain(embed, images, "1", mode="specific")


def test_layer_that_runs_twice(images):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            x = self.conv(self.conv(x))
            return self.fc(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="runs 2 times"):
        caffast.explain(Twice(), images, "conv")


def test_output_that_is_not_a_tensor(images):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = self.conv(x)
            return {"total": y.mean()}  # not one row per image

    with pytest.raises(ValueError, match=r"returns \(\); .*one row per image.*wrap the model"):
        caffast.explain(Pair(), images, "conv")


def test_missing_weights_file_is_explained():
    with pytest.raises(FileNotFoundError, match="state-dict file"):
        caffast.load_architecture("resnet50", weights="/nonexistent/weights.pth")


def test_unknown_reference_architecture():
    with pytest.raises(ValueError, match="resnet50, googlenet, densenet169"):
        caffast.load_architecture("alexnet")


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("max_iter", True, r"max_iter must be an integer, got True \(a bool\)"),
        ("check_every", True, r"check_every must be an integer, got True \(a bool\)"),
        ("max_iter", 2**63, r"max_iter must be an integer in \[1, 9223372036854775807\], got 9223372036854775808"),
        ("check_every", 2**64, r"check_every must be an integer in \[1, 9223372036854775807\]"),
        ("lr", "0.5", r"lr must be a number, got '0.5' \(str\)"),
        ("lr", True, r"lr must be a number, got True \(a bool\)"),
        ("lr", None, r"lr must be a number, got None"),
        ("min_error", "1e-6", r"min_error must be a number, got '1e-6' \(str\)"),
        ("min_error", float("nan"), r"min_error must be zero or positive, got nan"),
        ("tolerance", [1e-8], r"tolerance must be a number, got \[1e-08\] \(list\)"),
        ("tolerance", float("nan"), r"tolerance must be positive, got nan"),
        ("seed", "1", r"seed must be an integer, got '1' \(str\)"),
        ("seed", True, r"seed must be an integer, got True \(a bool\)"),
        ("seed", 1.5, r"seed must be an integer, got 1.5 \(float\)"),
        ("seed", 2**64, r"seed must be an integer in \[-9223372036854775808, 18446744073709551615\]"),
    ],
)
def test_settings_of_the_wrong_type_or_range(model, images, option, value, message):
    with pytest.raises(ValueError, match=message):
        caffast.explain(model, images, "layer4", init="normal", **{option: value})


def test_numpy_integers_and_floats_are_numbers(model, images):
    import numpy as np

    exp = caffast.explain(model, images, "layer4", max_iter=np.int64(3), lr=np.float32(0.25), seed=np.int64(4), init="normal")
    reference = caffast.explain(model, images, "layer4", max_iter=3, lr=float(np.float32(0.25)), seed=4, init="normal")
    assert torch.equal(exp.maps, reference.maps) and exp.iterations.max() == 3


@pytest.mark.parametrize("targets", [True, False, [True, 2], torch.ones(2, 1, dtype=torch.bool)])
def test_boolean_targets(model, images, targets):
    with pytest.raises(ValueError, match="targets must be"):
        caffast.explain(model, images, "layer4", mode="specific", targets=targets, max_iter=2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_images_that_are_not_floating_point(model, dtype):
    images = torch.zeros(2, 3, 64, 64, dtype=dtype)
    with pytest.raises(ValueError, match=rf"images must be a floating-point tensor, got {dtype}: convert them with images.float\(\)"):
        caffast.explain(model, images, "layer4")


def test_images_of_another_dtype_than_the_model(model, images):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 64, 64\).*images are torch.float64, the model's weights torch.float32: "
                                         r"convert them with images.to\(torch.float32\)"):  # fmt: skip
        caffast.explain(model, images.double(), "layer4")


@pytest.mark.parametrize("channels,fix", [(1, r"repeat the grayscale channel with images.expand\(-1, 3, -1, -1\)"), (4, "pass 3-channel images")])
def test_images_with_the_wrong_channel_count(model, channels, fix):
    with pytest.raises(ValueError, match=rf"images of shape \(2, {channels}, 64, 64\): the model's first convolution takes 3 "
                                         rf"channels, the images have {channels}: {fix} \(the model's error: .*channels"):  # fmt: skip
        caffast.explain(model, torch.randn(2, channels, 64, 64), "layer4")


def test_wrong_channels_on_the_hook_tail_too():
    class Branchy(torch.nn.Module):  # data-dependent control flow: the whole model is rerun
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            if x.sum() > -1e30:
                x = x * 1.0
            return self.fc(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match=r"first convolution takes 3 channels, the images have 2"):
        caffast.explain(Branchy(), torch.randn(1, 2, 8, 8), "conv")


@pytest.mark.parametrize("size", [16, 28])
def test_images_too_small_for_the_network(size):
    # a conv of kernel 5 after two stride-2 convolutions, and a head built for 32 x 32 inputs
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.Conv2d(4, 4, 5),
        torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3),
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match=rf"images \({size} x {size}\) are too small for the network, or not the size it was "
                                         r"built for.*\(the model's error: "):  # fmt: skip
        caffast.explain(net, torch.randn(1, 3, size, size), "1")


def test_other_model_errors_pass_through_unchanged(images):
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3)

        def forward(self, x):
            raise KeyError("the model's own problem")

    with pytest.raises(KeyError, match="the model's own problem"):
        caffast.explain(Failing(), images, "conv")


def test_images_on_the_meta_device(model):
    with pytest.raises(ValueError, match="images are on the meta device"):
        caffast.explain(model, torch.randn(2, 3, 64, 64, device="meta"), "layer4")


def test_model_on_the_meta_device(images):
    with torch.device("meta"):
        meta = torchvision.models.resnet18(num_classes=5)
    with pytest.raises(ValueError, match=r"the model is on the meta device.*model.to_empty\(device='cpu'\)"):
        caffast.explain(meta, images, "layer4")


@pytest.mark.parametrize(
    "objective",
    [
        lambda ft, nt: ((ft.detach() - nt) ** 2).mean(dim=1),
        lambda ft, nt: torch.zeros(ft.shape[0]),
        lambda ft, nt: torch.ones(1, requires_grad=True).expand(ft.shape[0]),
    ],
    ids=["detached", "constant", "another leaf"],
)
def test_an_objective_with_no_gradient_path(model, images, objective):
    with pytest.raises(ValueError, match=r"the loss is not connected to FT \(no gradient path\)"):
        caffast.explain(model, images, "layer4", objective=objective, max_iter=2)


def test_a_tail_that_cuts_the_gradient(images):
    class Detaching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).detach().mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="does not depend differentiably on the breakpoint's feature map"):
        caffast.explain(Detaching(), images, "conv", max_iter=2)
