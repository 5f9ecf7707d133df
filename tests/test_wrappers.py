"""Models as people hold them: behind Normalize, DataParallel, DistributedDataParallel or
torch.compile, returning a ModelOutput, a segmentation dict, or built by timm."""

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torchvision.transforms import Normalize

import caffast
from caffast.core.breakpoints import SlowTailWarning


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(21)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(22))


class ModelOutput(OrderedDict):
    """The shape of HuggingFace's ModelOutput: a dict whose fields are also attributes."""

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            if getattr(self, name) is not None:
                self[name] = getattr(self, name)


@dataclass
class ClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class HuggingFaceStyle(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return ClassifierOutput(logits=self.net(pixel_values))


def explain_quietly(model, images, layer, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowTailWarning)
        return caffast.explain(model, images, layer, mode="specific", targets=[2, 5], max_iter=40, **options)


def test_normalize_in_front_keeps_the_fused_path(resnet, images):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    wrapped = nn.Sequential(Normalize(mean, std), resnet)
    exp = explain_quietly(wrapped, images, "1.layer4")
    assert exp.path == "fused" and exp.tail == "fx"
    normalized = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(exp.maps, explain_quietly(resnet, normalized, "layer4").maps)
    assert exp.path == "fused" and explain_quietly(wrapped, images, resnet.layer4).path == "fused"


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("ddp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["DataParallel", "DistributedDataParallel", "compile", "HuggingFace"])
def test_wrappers_keep_the_fused_path(resnet, images, wrap, request):
    if wrap == "DataParallel":
        wrapped, names = nn.DataParallel(resnet), ["layer4", "module.layer4"]
    elif wrap == "DistributedDataParallel":
        request.getfixturevalue("process_group")
        wrapped, names = nn.parallel.DistributedDataParallel(resnet), ["layer4", "module.layer4"]
    elif wrap == "compile":
        wrapped, names = torch.compile(resnet), ["layer4", "_orig_mod.layer4"]
    else:
        wrapped, names = HuggingFaceStyle(resnet), ["net.layer4"]
    plain = explain_quietly(resnet, images, "layer4")
    for name in names + [resnet.layer4]:
        exp = explain_quietly(wrapped, images, name)
        assert exp.path == "fused" and exp.tail == "fx"
        torch.testing.assert_close(exp.maps, plain.maps)
        assert isinstance(exp.output, torch.Tensor)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > -1e9:
            y = torch.relu(y)
        return self.fc(y.mean(dim=(2, 3)))


def test_the_slow_tail_is_announced_once_with_the_reason(images):
    model = Branchy().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            exp = caffast.explain(model, images, "body", max_iter=3)
    slow = [w for w in caught if issubclass(w.category, SlowTailWarning)]
    assert exp.tail == "hook" and len(slow) == 1
    assert "Branchy cannot be split at 'body'" in str(slow[0].message) and "control flow" in str(slow[0].message)


def test_segmentation_map_moves_with_the_mask():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    centres = []
    for columns in (slice(0, 20), slice(44, 64)):
        mask = torch.zeros(64, 64)
        mask[:, columns] = 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", SlowTailWarning)
            exp = caffast.explain(model, image, "backbone.layer4", mode="specific", max_iter=20,
                                  targets=lambda out: (out[1] * mask).sum())  # fmt: skip
        assert exp.tail == "fx" and exp.maps.shape == (1, 1, 8, 8)
        weights = exp.maps[0, 0].sum(dim=0)
        centres.append(float((weights * torch.arange(8.0)).sum() / weights.sum()))
    assert centres[0] < 3.5 < centres[1]


def test_timm_architectures_on_the_command_line(tmp_path):
    pytest.importorskip("timm")
    from PIL import Image

    from caffast.apps.cli import main

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(photo)
    code = main(["explain", str(photo), "--arch", "resnet18.a1_in1k", "--weights", "random", "--classes", "3",
                 "--max-iter", "5", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0 and any((tmp_path / "out").iterdir())
    from caffast.models.source import ModelSource
    from caffast.models.zoo import build_model, timm_preprocessing

    assert ModelSource("vit_tiny_patch16_224").default_layer() == "blocks.11.norm1"
    assert ModelSource("swin_tiny_patch4_window7_224").default_layer() == "layers.3"
    assert timm_preprocessing("vit_tiny_patch16_224")["mean"] == (0.5, 0.5, 0.5)
    assert timm_preprocessing("resnet18") is None  # torchvision's name: the reference's preprocessing
    assert type(build_model("resnet18.a1_in1k")).__module__.startswith("timm")
    assert type(build_model("resnet18")).__module__.startswith("torchvision")
