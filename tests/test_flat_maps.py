"""Flat maps are named: a FlatMapWarning with the problem, the cause and a layer that works; never
one where the map is not flat; the command line and dataset runs say it too."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import caffast
from caffast.apps.cli import main
from caffast.models.preprocessing import IMAGENET
from caffast.models.source import ModelSource


class SaturatingNet(nn.Module):
    """conv -> 1x1 conv -> BatchNorm -> ReLU6 -> pool -> Linear, as EfficientNet's conv_head, bn2 and
    head: the unfiltered units lie above the BatchNorm's running mean, but the map scaled by the
    filter's start (every cell 1/8 on an 8 x 8 grid) lies below it, so every unit is switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.conv_head = nn.Conv2d(8, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            self.stem[0].weight.mul_(0.3)
            self.stem[0].bias.fill_(5.0)
            self.conv_head.weight.uniform_(0.05, 0.15)
            self.bn.running_mean.fill_(2.0)

    def forward(self, x):
        x = self.act(self.bn(self.conv_head(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def oracle_gradient(model: SaturatingNet, images: torch.Tensor, layer: str) -> torch.Tensor:
    """The gradient of the class-oblivious loss at the uniform unit filter, by plain autograd."""
    features = {"stem": model.stem, "conv_head": lambda x: model.conv_head(model.stem(x))}[layer](images)
    tail = {"stem": lambda a: model.fc(model.act(model.bn(model.conv_head(a)))
                                       .mean(dim=(2, 3))),
            "conv_head": lambda a: model.fc(model.act(model.bn(a)).mean(dim=(2, 3)))}[layer]  # fmt: skip
    g = torch.ones(features.shape[2:], dtype=images.dtype, requires_grad=True)
    output = tail(features * (g / g.norm()))
    loss = ((output - tail(features).detach()) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, g)
    return grad


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SaturatingNet().eval()


def test_a_saturated_tail_gives_a_named_flat_map_and_the_layer_that_works(model):
    images = torch.rand(2, 3, 17, 17)
    assert oracle_gradient(model, images, "conv_head").abs().max() == 0  # the oracle: saturated
    with pytest.warns(caffast.FlatMapWarning) as caught:
        exp = caffast.explain(model, images, "conv_head", mode="specific", targets=[1, 3])
    message = str(caught[0].message)
    assert "layer 'conv_head'" in message and "(image 0, target 1)" in message and "(image 1, target 3)" in message
    assert "gradient is exactly 0" in message and "saturated" in message
    assert "explain at 'bn' instead" in message  # the BatchNorm's output: the filter scales what ReLU6 clips
    assert exp.flat.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", caffast.FlatMapWarning)
        there = caffast.explain(model, images, "act", mode="specific", targets=[1, 3])
    assert not there.flat.any()


@pytest.mark.parametrize("solver", ["gd", "fast", "exact"])
def test_every_solver_flags_it(model, solver):
    with pytest.warns(caffast.FlatMapWarning):
        exp = caffast.explain(model, torch.rand(1, 3, 17, 17), "stem", solver=solver, max_iter=60)
    assert exp.flat.all()


def test_no_warning_where_the_map_is_not_flat():
    torch.manual_seed(1)
    model = SaturatingNet().eval()
    with torch.no_grad():
        model.bn.running_mean.zero_()  # units on both sides of zero: the tail is not saturated
    images = torch.rand(2, 3, 17, 17)
    assert oracle_gradient(model, images, "conv_head").abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", caffast.FlatMapWarning)
        for mode in ("oblivious", "specific"):
            exp = caffast.explain(model, images, "conv_head", mode=mode, max_iter=60)
            assert not exp.flat.any()


def test_the_search_leaves_the_model_as_it_was(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(caffast.FlatMapWarning):
        caffast.explain(model, torch.rand(2, 3, 17, 17), "conv_head")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BatchNorm update


def test_command_line_says_it_and_counts_flat_maps(tmp_path, monkeypatch, capsys, model):
    monkeypatch.setattr(ModelSource, "load", lambda self, device="cpu", dtype=None: model)
    monkeypatch.setattr(ModelSource, "default_layer", lambda self: "conv_head")
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save(photo)
    code = main(["explain", str(photo), "--arch", "resnet18", "--weights", "random", "--max-iter", "5",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert "caffast: warning: flat map at layer 'conv_head'" in err
    assert "1 of the maps are flat" in err


def test_a_run_marks_flat_maps_in_its_index(tmp_path, monkeypatch, capsys, model):
    real_load = ModelSource.explainable

    def load_saturating(self, layer=None, device="cpu", dtype=None):
        demo = real_load(ModelSource("demo", "random"), None, device, dtype)
        return dataclasses.replace(demo, model=model, layer="conv_head")

    monkeypatch.setattr(ModelSource, "explainable", load_saturating)
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        Image.fromarray((np.random.default_rng(k).random((24, 24, 3)) * 255).astype(np.uint8)).save(data / f"{k}.png")
    code = main(["run", str(data), "--out", str(tmp_path / "out"), "--arch", "demo", "--max-iter", "5"])
    captured = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert rows and all(row["flat"] is True and row["gradient_norm"] == 0 for row in rows)
    assert "2 of their maps flat" in captured.out
    assert captured.err.count("caffast: warning: flat map") == 1


def test_layers_command_marks_flat_layers(tmp_path, monkeypatch, capsys, model):
    monkeypatch.setattr(ModelSource, "load", lambda self, device="cpu", dtype=None: model)
    monkeypatch.setattr(ModelSource, "preprocessing", lambda self: IMAGENET)
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["layers", "--arch", "resnet18", "--size", "17", "--image", str(photo)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "FLAT (its gradient is 0" in lines["conv_head"] and "FLAT" in lines["stem"]
    assert "FLAT" not in lines["act"] and "fused" in lines["act"]
    assert "generic" in lines["conv_head"] and "8x8" in lines["conv_head"]


def test_timm_efficientnet_default_breakpoint_is_the_last_feature_map():
    pytest.importorskip("timm")
    from caffast.models.zoo import timm_default_layer

    assert timm_default_layer("tf_efficientnet_lite0") == "bn2"  # not blocks.6, flat on trained weights
    assert timm_default_layer("resnet18.a1_in1k") == "layer4"
