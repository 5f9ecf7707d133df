"""Targets of every form: pytorch-grad-cam's target objects and any callable of one image's output,
each against an autograd oracle of its loss; numpy and per-image forms; outputs of any structure."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import caffast


class Restated:
    """pytorch-grad-cam's targets, restated from their documented meaning, where it is not installed."""

    @dataclass
    class ClassifierOutputTarget:
        category: int

        def __call__(self, out):
            return out[self.category]

    @dataclass
    class ClassifierOutputSoftmaxTarget:
        category: int

        def __call__(self, out):
            return torch.softmax(out, dim=-1)[self.category]

    @dataclass
    class ClassifierOutputReST:
        category: int

        def __call__(self, out):
            return out[self.category] - F.cross_entropy(out[None], torch.tensor([self.category]))

    @dataclass
    class BinaryClassifierOutputTarget:
        category: int

        def __call__(self, out):
            return out * (1 if self.category == 1 else -1)

    class RawScoresOutputTarget:
        def __call__(self, out):
            return out

    class SoftmaxOutputTarget:
        def __call__(self, out):
            return torch.softmax(out, dim=-1)

    class SemanticSegmentationTarget:
        def __init__(self, category, mask):
            self.category, self.mask = category, torch.from_numpy(mask)

        def __call__(self, out):
            return (out[self.category] * self.mask).sum()

    class FasterRCNNBoxScoreTarget:
        def __init__(self, labels, bounding_boxes, iou_threshold=0.5):
            self.labels, self.boxes, self.threshold = labels, bounding_boxes, iou_threshold

        def __call__(self, out):
            total = torch.zeros(1)
            for box, label in zip(self.boxes, self.labels):
                ious = torchvision.ops.box_iou(torch.as_tensor(box)[None], out["boxes"])
                best = ious.argmax()
                if ious[0, best] > self.threshold and out["labels"][best] == label:
                    total = total + ious[0, best] + out["scores"][best]
            return total


try:
    from pytorch_grad_cam.utils import model_targets
except ImportError:
    model_targets = Restated


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(11)
    return torchvision.models.resnet18(num_classes=6).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(12))


def one_step(model, layer, images, image_loss, lr=0.5, moves=True):
    """The filters after the reference loop's first step from ones, computed independently: a forward
    hook multiplies the layer's output by f / ||f|| and autograd differentiates the summed losses
    image_loss(output of image i, i)."""
    with torch.no_grad():
        seen = []
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        model(images)
        handle.remove()
    features = seen[0]
    filters = torch.ones(features.shape[0], *features.shape[2:], requires_grad=True)
    handle = layer.register_forward_hook(
        lambda _m, _i, _out: features * (filters / filters.norm(dim=(1, 2), keepdim=True))[:, None]
    )
    try:
        output = model(images)
    finally:
        handle.remove()
    if isinstance(output, dict) and "out" in output:
        output = output["out"]
    loss = sum(image_loss(_row(output, i), i) for i in range(features.shape[0]))
    (grad,) = torch.autograd.grad(loss, filters)
    assert (grad.abs().max() > 1e-6) == moves  # where the step moves the filter, the comparison can fail
    return (filters - lr * grad).detach()


def _row(output, i):
    return {key: value[i] for key, value in output.items()} if isinstance(output, dict) else output[i]


def explained_step(model, layer, images, targets):
    exp = caffast.explain(model, images, layer, mode="specific", targets=targets, max_iter=1, lr=0.5)
    return exp, exp.parameters[:, 0]


def margin_loss(category):
    """explain's default class loss: the mean of the other logits minus the target's."""
    return lambda out, _i: (out.sum() - out[category]) / (out.numel() - 1) - out[category]


@pytest.mark.parametrize(
    "make, loss",
    [
        (lambda: model_targets.ClassifierOutputTarget(2), margin_loss(2)),
        (lambda: model_targets.ClassifierOutputSoftmaxTarget(2), lambda out, _i: -F.softmax(out, -1)[2]),
        (lambda: model_targets.ClassifierOutputReST(4), lambda out, _i: -(2 * out[4] - torch.logsumexp(out, 0))),
        (lambda: model_targets.RawScoresOutputTarget(), lambda out, _i: -out.sum()),
        (lambda: model_targets.SoftmaxOutputTarget(), lambda out, _i: -F.softmax(out, -1).sum()),
        (lambda: (lambda out: F.cosine_similarity(out, torch.arange(6.0), dim=0)),
         lambda out, _i: -F.cosine_similarity(out, torch.arange(6.0), dim=0)),
    ],
    ids=["ClassifierOutputTarget", "Softmax", "ReST", "RawScores", "SoftmaxOutput", "similarity-to-concept"],
)
def test_classifier_targets_against_the_oracle(classifier, images, make, loss):
    constant = isinstance(make(), model_targets.SoftmaxOutputTarget)  # its scores sum to 1 whatever the filter
    expected = one_step(classifier, classifier.layer4, images, loss, moves=not constant)
    exp, step = explained_step(classifier, "layer4", images, [[make()], [make()]])
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    assert exp.path == ("fused" if isinstance(make(), model_targets.ClassifierOutputTarget) else "generic")


@pytest.mark.parametrize("category", [0, 1])
def test_binary_target_zero_lowers_the_logit(images, category):
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=1).eval()
    sign = 1.0 if category == 1 else -1.0
    expected = one_step(model, model.layer4, images, lambda out, _i: -sign * out.sum())
    _, step = explained_step(model, "layer4", images, model_targets.BinaryClassifierOutputTarget(category))
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    exp = caffast.explain(model, images, "layer4", mode="specific", max_iter=100,
                          targets=model_targets.BinaryClassifierOutputTarget(category))  # fmt: skip
    cells = exp.maps.shape[-1] * exp.maps.shape[-2]
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: out / cells**0.5)  # the start: ones / ||ones||
    with torch.no_grad():
        start = model(images)[:, 0]
    handle.remove()
    moved = -exp.objective[:, 0].float() * sign  # the objective is -sign * logit at the filter
    assert torch.all(sign * (moved - start) > 0)


class TinySegmenter(nn.Module):
    """(N, 3, H, W) -> {"out": (N, 4, H, W)}, as torchvision's segmentation models return."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.head(torch.relu(self.body(x)))
        return {"out": F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def test_semantic_segmentation_target_against_the_oracle(images):
    torch.manual_seed(4)
    model = TinySegmenter().eval()
    mask = np.zeros((96, 96), np.float32)
    mask[10:40, 60:90] = 1
    target = model_targets.SemanticSegmentationTarget(3, mask)
    expected = one_step(model, model.body, images, lambda out, _i: -(out[3] * torch.from_numpy(mask)).sum())
    exp, step = explained_step(model, "body", images, target)
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    assert exp.tail == "fx" and exp.targets.tolist() == [[-1], [-1]]


class TinyDetector(nn.Module):
    """Three boxes per image with labels and scores, as a dict of per-image rows."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.boxes = nn.Linear(8, 12)
        self.scores = nn.Linear(8, 3)

    def forward(self, x):
        pooled = self.body(x).mean(dim=(2, 3))
        corners = torch.sigmoid(self.boxes(pooled)).view(-1, 3, 2, 2) * 48
        boxes = torch.cat([corners[:, :, 0], corners[:, :, 0] + corners[:, :, 1] + 4], dim=2)
        labels = torch.tensor([1, 2, 3], device=x.device).expand(x.shape[0], 3)
        return {"boxes": boxes, "labels": labels, "scores": torch.sigmoid(self.scores(pooled))}


def test_box_score_target_against_the_oracle(images):
    torch.manual_seed(5)
    model = TinyDetector().eval()
    with torch.no_grad():
        own = model(images)["boxes"]
    targets = [[model_targets.FasterRCNNBoxScoreTarget([2], own[i, 1:2].numpy())] for i in range(2)]

    def loss(out, i):
        return -targets[i][0](out).sum()

    expected = one_step(model, model.body, images, loss)
    _, step = explained_step(model, "body", images, targets)
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)


def test_classes_and_callables_mix_in_one_batch(classifier, images):
    softmax = model_targets.ClassifierOutputSoftmaxTarget(1)
    mixed = caffast.explain(classifier, images, "layer4", mode="specific", targets=[[3, softmax], [softmax, 0]], max_iter=40)
    assert mixed.targets.tolist() == [[3, -1], [-1, 0]]
    alone_classes = caffast.explain(classifier, images, "layer4", mode="specific", targets=torch.tensor([[3], [0]]), max_iter=40)
    alone_softmax = caffast.explain(classifier, images, "layer4", mode="specific", targets=softmax, max_iter=40)
    torch.testing.assert_close(mixed.maps[0, 0], alone_classes.maps[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed.maps[1, 1], alone_classes.maps[1, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed.maps[0, 1], alone_softmax.maps[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed.maps[1, 0], alone_softmax.maps[1, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "targets",
    [
        np.array([[3, 1], [0, 5]]),
        [[3, 1], [0, 5]],
        [np.array([3, 1]), torch.tensor([0, 5])],
        [[np.int64(3), np.int32(1)], [torch.tensor(0), 5]],
    ],
    ids=["numpy (N, T)", "per-image lists", "per-image arrays", "numpy and tensor scalars"],
)
def test_per_image_forms_equal_the_tensor(classifier, images, targets):
    reference = caffast.explain(classifier, images, "layer4", mode="specific", targets=torch.tensor([[3, 1], [0, 5]]), max_iter=20)
    exp = caffast.explain(classifier, images, "layer4", mode="specific", targets=targets, max_iter=20)
    assert exp.targets.tolist() == [[3, 1], [0, 5]]
    torch.testing.assert_close(exp.maps, reference.maps)


def test_one_label_per_image_and_numpy_scalars(classifier, images):
    reference = caffast.explain(classifier, images, "layer4", mode="specific", targets=torch.tensor([[4], [2]]), max_iter=20)
    for labels in (torch.tensor([4, 2]), np.array([4, 2]), [[4], [2]]):
        exp = caffast.explain(classifier, images, "layer4", mode="specific", targets=labels, max_iter=20)
        assert exp.targets.tolist() == [[4], [2]]
        torch.testing.assert_close(exp.maps, reference.maps)
    top = np.argsort(classifier(images).detach().numpy()[0])[-1]  # an np.int64
    exp = caffast.explain(classifier, images, "layer4", mode="specific", targets=top, max_iter=5)
    assert exp.targets.tolist() == [[int(top)], [int(top)]]


@pytest.mark.parametrize(
    "targets, message",
    [
        (True, "boolean"),
        ([1, False], "boolean"),
        (torch.tensor([True, False]), "booleans"),
        (np.array([[1.0], [2.0]]), "float64"),
        (torch.tensor([1.0, 2.0]), "float32"),
        (2.0, "float"),
        ([[1, 2], [3]], "same number of targets"),
        ([[1], [2], [3]], "3 per-image target lists for 2 images"),
        ("cat", "category"),
    ],
)
def test_bad_targets_are_named(classifier, images, targets, message):
    with pytest.raises((TypeError, ValueError), match=message):
        caffast.explain(classifier, images, "layer4", mode="specific", targets=targets, max_iter=2)


class Pair(nn.Module):
    """A classifier that returns (logits, embedding); `together` returns them side by side."""

    def __init__(self, together=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.logits = nn.Linear(8, 5)
        self.embedding = nn.Linear(8, 3)
        self.together = together

    def forward(self, x):
        pooled = torch.relu(self.body(x)).amax(dim=(2, 3))
        logits, embedding = self.logits(pooled), self.embedding(pooled)
        return torch.cat([logits, embedding], dim=1) if self.together else (logits, embedding)


def test_class_oblivious_compares_every_tensor_of_the_output(images):
    torch.manual_seed(6)
    pair = Pair().eval()
    together = Pair(together=True).eval()
    together.load_state_dict(pair.state_dict())
    options = dict(max_iter=30, init="normal", seed=0)
    exp = caffast.explain(pair, images, "body", **options)
    reference = caffast.explain(together, images, "body", **options)
    torch.testing.assert_close(exp.maps, reference.maps)
    assert isinstance(exp.output, tuple) and len(exp.output) == 2
    with pytest.raises(ValueError, match="class targets need class scores"):
        caffast.explain(pair, images, "body", mode="specific", targets=1, max_iter=2)
