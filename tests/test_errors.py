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
