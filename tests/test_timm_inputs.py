"""timm's models on the command line see images as timm prepares them: the oracle is timm's own
evaluation transform built from the model's pretrained config."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from caffast.apps.common import CliError, model_errors
from caffast.apps.imagefiles import read_image
from caffast.models.preprocessing import IMAGENET
from caffast.models.source import ModelSource

timm = pytest.importorskip("timm")


def write_photo(folder, height, width, seed):
    path = folder / f"photo-{seed}.png"
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "resnet18.a1_in1k", "inception_v3.tv_in1k"])
def test_timm_models_get_timm_s_evaluation_transform(tmp_path, arch):
    config = timm.data.resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    expected_transform = timm.data.create_transform(**config, is_training=False)
    for seed, (height, width) in enumerate([(300, 410), (380, 260)]):
        path = write_photo(tmp_path, height, width, seed)
        with Image.open(path) as image:
            expected = expected_transform(image.convert("RGB"))
        rgb, tensor = read_image(path, ModelSource(arch, "random").preprocessing())
        assert tensor.shape == expected.shape == (3, *config["input_size"][1:])
        # uint8 resampling in Pillow either way; the transforms differ only in float rounding
        assert torch.allclose(tensor, expected, atol=1e-5)
        assert rgb.shape == (*config["input_size"][1:], 3)


def test_torchvision_names_keep_the_reference_preprocessing():
    assert ModelSource("resnet18", "random").preprocessing() == IMAGENET
    assert ModelSource("vit_b_16", "DEFAULT").preprocessing() == IMAGENET


def test_a_pretrained_tag_brings_its_own_config():
    # resnet50's a1 weights were trained at crop 0.95, its tv weights (torchvision's) at 0.875
    assert ModelSource("resnet50", "a1_in1k").preprocessing() == IMAGENET  # a torchvision name stays torchvision's
    tagged = ModelSource("resnet50.tv_in1k", "random").preprocessing()
    assert tagged.crop_pct == pytest.approx(0.875) and tagged.interpolation == "bilinear"
    assert ModelSource("resnet50.a1_in1k", "random").preprocessing().crop_pct == pytest.approx(0.95)


def test_a_non_square_timm_input_is_refused_clearly(monkeypatch):
    from caffast.models import source

    monkeypatch.setattr(source, "timm_preprocessing", lambda arch, weights: {
        "input_size": (3, 256, 320), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic",
        "mean": (0.5,) * 3, "std": (0.5,) * 3})  # fmt: skip
    with pytest.raises(CliError, match="256 x 320"), model_errors():
        ModelSource("some_timm_model", "random").preprocessing()


def test_run_feeds_a_vit_its_own_input(tmp_path):
    from caffast.apps.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_photo(data, 250, 330, 7)
    out = tmp_path / "out"
    code = main(["run", str(data), "--out", str(out), "--arch", "vit_tiny_patch16_224", "--weights", "random",
                 "--classes", "2", "--max-iter", "3", "--batch-size", "1"])  # fmt: skip
    assert code == 0
    recorded = json.loads((out / "config.json").read_text())["input"]
    assert recorded["mean"] == [0.5, 0.5, 0.5] and recorded["interpolation"] == "bicubic"
    assert recorded["crop_pct"] == pytest.approx(0.9)


def test_the_default_preprocessing_is_recorded_as_before_so_older_runs_resume():
    # run folders made before crop_pct and interpolation existed hold these four keys only
    assert IMAGENET.record() == {"size": 224, "crop": True, "mean": IMAGENET.mean, "std": IMAGENET.std}
    vit = ModelSource("vit_tiny_patch16_224", "random").preprocessing().record()
    assert vit["crop_pct"] == pytest.approx(0.9) and vit["interpolation"] == "bicubic"


def test_torchvision_weights_for_a_timm_model_are_refused():
    from torchvision.models import ResNet18_Weights

    from caffast.models.zoo import build_model

    with pytest.raises(ValueError, match="timm pretrained tag"):
        build_model("resnet18.a1_in1k", ResNet18_Weights.IMAGENET1K_V1)
