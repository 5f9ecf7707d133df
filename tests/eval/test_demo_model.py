"""The shipped demo model: loads offline, has the documented breakpoint, and recognizes fresh scenes."""

from importlib import resources

import torch
import torch.nn as nn

from caffast.eval.scenes import HELDOUT_START, make_scene, normalize
from caffast.eval.demo_model import CLASS_NAMES, WEIGHTS, load_demo_model

FRESH = range(HELDOUT_START + 700_000, HELDOUT_START + 700_100)  # never used by training or its held-out check


def test_weights_ship_in_the_package_and_are_small():
    weights = resources.files("caffast.eval") / "assets" / WEIGHTS
    assert weights.is_file()
    assert len(weights.read_bytes()) < 5 * 2**20


def test_model_loads_in_eval_mode_with_an_8x8_breakpoint():
    model = load_demo_model()
    assert not model.training
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == len(CLASS_NAMES) == 6
    x = normalize(make_scene(HELDOUT_START).image)[None]
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (1, model.classifier.in_features, 8, 8)
        pooled = features.mean(dim=(2, 3))
        torch.testing.assert_close(model(x), model.classifier(pooled))


def test_model_classifies_fresh_single_object_scenes():
    model = load_demo_model()
    scenes = [make_scene(seed) for seed in FRESH]
    images = normalize(torch.stack([torch.from_numpy(s.image) for s in scenes]))
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    truth = torch.tensor([s.labels[0] for s in scenes])
    assert (predicted == truth).float().mean() >= 0.9
