"""The user's model comes back exactly as it went in, also when explain raises."""

import pytest
import torch
import torchvision

import caffast

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model):
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: {d: dict(getattr(m, d)) for d in HOOK_DICTS} for name, m in model.named_modules()},
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for name, grad in before["grad"].items():
        assert (grad is None) == (after["grad"][name] is None), name
        if grad is not None:
            assert torch.equal(grad, after["grad"][name]), name


class Branchy(torch.nn.Module):
    """Data-dependent control flow after the breakpoint: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > -1e30:
            x = x * 1.0
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def prepared_model(kind):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=6) if kind == "resnet18" else Branchy()
    model.train()  # a model in training mode, with a mix of flags
    first = next(model.parameters())
    first.requires_grad_(False)
    last = list(model.parameters())[-1]
    last.grad = torch.randn_like(last)
    model.get_submodule("fc").register_forward_hook(lambda m, i, o: None)
    return model


@pytest.mark.parametrize("kind,layer,expected_tail", [("resnet18", "layer4", "fx"), ("branchy", "body", "hook")])
def test_model_unchanged_after_explain(kind, layer, expected_tail):
    model = prepared_model(kind)
    before = snapshot(model)
    exp = caffast.explain(model, torch.randn(2, 3, 48, 48), layer, mode="specific", targets=[0, 3], max_iter=5)
    assert exp.tail == expected_tail
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("kind,layer", [("resnet18", "layer4"), ("branchy", "body")])
@pytest.mark.parametrize(
    "failure",
    ["target", "objective", "layer_shape"],
)
def test_model_unchanged_when_explain_raises(kind, layer, failure):
    model = prepared_model(kind)
    before = snapshot(model)

    def broken_objective(ft, nt):
        raise RuntimeError("objective failed on purpose")

    kwargs = {
        "target": dict(mode="specific", targets=99),
        "objective": dict(objective=broken_objective),
        "layer_shape": dict(),
    }[failure]
    chosen = "fc" if failure == "layer_shape" else layer
    with pytest.raises((ValueError, RuntimeError)):
        caffast.explain(model, torch.randn(2, 3, 48, 48), chosen, max_iter=5, **kwargs)
    assert_same(before, snapshot(model))


def test_training_mode_model_is_explained_in_eval_mode():
    """Batch statistics and dropout would make the result depend on the batch; eval mode does not."""
    model = prepared_model("branchy")
    images = torch.randn(3, 3, 48, 48)
    together = caffast.explain(model, images, "body", max_iter=20)
    alone = caffast.explain(model, images[1:2], "body", max_iter=20)
    torch.testing.assert_close(together.maps[1:2], alone.maps, atol=1e-6, rtol=0)
    assert model.training
