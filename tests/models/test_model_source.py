"""ModelSource: what a model named by an architecture and weights loads as, and what runs record of it."""

import hashlib

import pytest
import torch

from caffast.eval.demo_model import CLASS_NAMES, load_demo_model
from caffast.models.preprocessing import DEMO, IMAGENET
from caffast.models.source import SHIPPED_DEMO, ModelSource, ModelSourceError, WeightsError


def same_weights(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), other.state_dict().values()))


def test_the_shipped_demo():
    model = SHIPPED_DEMO.load()
    assert not model.training and same_weights(model, load_demo_model())
    assert SHIPPED_DEMO.default_layer() == "features" and SHIPPED_DEMO.preprocessing() == DEMO
    assert SHIPPED_DEMO.class_names(len(CLASS_NAMES)) == list(CLASS_NAMES)
    assert SHIPPED_DEMO.weights_identity() == "DEFAULT" and SHIPPED_DEMO.weights_origin() is None


def test_random_weights_are_one_model_and_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    first, second = ModelSource("demo", "random").load(), ModelSource("demo", "random").load()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert same_weights(first, second) and not same_weights(first, load_demo_model())


def test_a_weights_file_is_recorded_by_its_content(tmp_path):
    path = tmp_path / "demo.pth"
    torch.save(load_demo_model().state_dict(), path)
    source = ModelSource("demo", str(path))
    assert same_weights(source.load(), load_demo_model())
    assert source.weights_identity() == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.weights_origin() is None


def test_demo_weights_that_are_neither_shipped_random_nor_a_file():
    with pytest.raises(ModelSourceError, match="--arch demo takes --weights DEFAULT"):
        ModelSource("demo", "IMAGENET1K_V1").load()


def test_weights_of_another_architecture_name_the_loader_s_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as raised:
        ModelSource("demo", str(path)).load()
    assert raised.value.arch == "demo" and raised.value.weights == str(path)
    assert isinstance(raised.value.cause, RuntimeError) and "Error(s) in loading state_dict" in str(raised.value.cause)


def test_torchvision_names():
    source = ModelSource("resnet18", "random")
    assert source.default_layer() == "layer4" and source.preprocessing() == IMAGENET
    assert source.class_names(1000)[207] == "golden retriever" and source.class_names(10) == [str(k) for k in range(10)]
    assert source.weights_identity() == "random" and source.weights_origin() is None
    loaded = source.explainable(device="cpu", dtype=torch.float64)
    assert loaded.layer == "layer4" and loaded.dtype == torch.float64 and loaded.source == source


def test_an_architecture_without_a_default_breakpoint_asks_for_one():
    source = ModelSource("alexnet", "random")
    assert source.default_layer() is None
    assert source.explainable("features").layer == "features"
    with pytest.raises(ModelSourceError, match="pass --layer"):
        source.explainable()


def test_an_unknown_architecture():
    with pytest.raises(ModelSourceError, match="unknown architecture 'resnet_9000'"):
        ModelSource("resnet_9000", "random").load()
