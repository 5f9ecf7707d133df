"""Procedural scenes: deterministic per seed, masks that are exactly the drawn pixels, valid pairs."""

import numpy as np
import pytest
import torch

from caffast.eval.scenes import NUM_CLASSES, SceneDataset, make_scene, normalize, target_distribution

SEEDS = range(40)


def test_a_seed_always_gives_the_same_scene():
    for objects in (1, 2):
        a, b = make_scene(7, objects=objects), make_scene(7, objects=objects)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.labels == b.labels
    assert not np.array_equal(make_scene(7).image, make_scene(8).image)


@pytest.mark.parametrize("objects", [1, 2])
def test_scene_types_and_ranges(objects):
    scene = make_scene(3, size=48, objects=objects)
    assert scene.image.shape == (3, 48, 48) and scene.image.dtype == np.float32
    assert scene.image.min() >= 0 and scene.image.max() <= 1
    assert scene.masks.shape == (objects, 48, 48) and scene.masks.dtype == bool
    assert len(scene.labels) == objects and all(0 <= c < NUM_CLASSES for c in scene.labels)


@pytest.mark.parametrize("objects", [1, 2])
def test_masks_are_exactly_the_object_pixels(objects):
    for seed in SEEDS:
        scene = make_scene(seed, objects=objects)
        pixels = scene.image.transpose(1, 2, 0)
        outside = ~scene.masks.any(axis=0)
        for mask, colour in zip(scene.masks, scene.colours):
            assert mask.sum() > 30
            np.testing.assert_array_equal(pixels[mask], np.broadcast_to(np.float32(colour), (mask.sum(), 3)))
            # no background pixel comes close to the object's colour
            assert np.abs(pixels[outside] - np.float32(colour)).max(axis=1).min() > 0.1


def test_two_objects_have_different_classes_and_do_not_touch():
    for seed in SEEDS:
        scene = make_scene(seed, objects=2)
        assert scene.labels[0] != scene.labels[1]
        first, second = scene.masks
        assert not (first & second).any()


def test_every_class_occurs():
    assert {make_scene(seed).labels[0] for seed in SEEDS} == set(range(NUM_CLASSES))


def test_dataset_items_are_normalized_images_and_target_distributions():
    image, target = SceneDataset([5], objects=2)[0]
    scene = make_scene(5, objects=2)
    torch.testing.assert_close(image, normalize(scene.image))
    torch.testing.assert_close(target, target_distribution(scene.labels))
    assert target.sum() == 1 and (target > 0).sum() == 2
    assert len(SceneDataset(range(10))) == 10
