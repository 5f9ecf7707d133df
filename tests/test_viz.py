"""Colormaps, bilinear resizing and the reference overlay: alpha * colour + (1 - alpha) * image."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caffast.viz import apply_colormap, apply_heatmap, colormap, resize_bilinear, save_gif, scale_map

STEP = 1 / 255  # one lookup-table entry


def test_bwr_runs_blue_white_red():
    lut = colormap("bwr")
    assert lut.shape == (256, 3)
    np.testing.assert_allclose(lut[0], [0, 0, 1])
    np.testing.assert_allclose(lut[-1], [1, 0, 0])
    np.testing.assert_allclose(apply_colormap(0.5, "bwr"), [1, 1, 1], atol=STEP + 1e-12)
    np.testing.assert_allclose(apply_colormap(np.array([0.0, 1.0]), "bwr"), [[0, 0, 1], [1, 0, 0]])


def test_jet_endpoints_and_midpoint():
    lut = colormap("jet")
    np.testing.assert_allclose(lut[0], [0, 0, 0.5])
    np.testing.assert_allclose(lut[-1], [0.5, 0, 0])
    # matplotlib's jet(0.5) (checked against matplotlib 3.11): entry 128, a pale green
    np.testing.assert_allclose(apply_colormap(0.5, "jet"), [0.4901960784, 1.0, 0.4775458571], atol=1e-9)
    with pytest.raises(ValueError, match="unknown colormap"):
        colormap("viridis")


def test_resize_bilinear_matches_torch_and_keeps_a_constant():
    coarse = np.random.default_rng(0).random((8, 8))
    expected = F.interpolate(torch.from_numpy(coarse)[None, None], size=(64, 48), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(coarse, (64, 48)), expected[0, 0].numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(resize_bilinear(np.full((3, 3), 2.5), 10), np.full((10, 10), 2.5))


def test_overlay_is_the_alpha_blend_of_the_scaled_map():
    image = np.random.default_rng(1).random((16, 16, 3))
    heatmap = np.arange(16.0).reshape(4, 4)
    picture = apply_heatmap(image, heatmap, alpha=0.6)
    assert isinstance(picture, Image.Image) and picture.size == (16, 16) and picture.mode == "RGB"
    scaled = scale_map(heatmap, (16, 16))
    assert scaled.min() == 0 and scaled.max() == 1
    for y, x in [(0, 0), (15, 15), (7, 9)]:
        expected = 0.6 * apply_colormap(scaled[y, x]) + 0.4 * image[y, x]
        np.testing.assert_array_equal(np.asarray(picture)[y, x], np.round(expected * 255).astype(np.uint8))
    # the corners hold the map's extremes: blue at the minimum, red at the maximum
    blue = np.round((0.6 * np.array([0, 0, 1]) + 0.4 * image[0, 0]) * 255)
    np.testing.assert_allclose(np.asarray(picture)[0, 0], blue)


def test_image_layouts_give_the_same_picture():
    rgb = np.random.default_rng(2).random((12, 10, 3))
    uint8 = np.round(rgb * 255).astype(np.uint8)
    heatmap = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    reference = np.asarray(apply_heatmap(uint8 / 255.0, heatmap))
    for image in (uint8, Image.fromarray(uint8), torch.from_numpy(uint8 / 255.0).permute(2, 0, 1)):
        np.testing.assert_array_equal(np.asarray(apply_heatmap(image, heatmap)), reference)


def test_constant_map_is_drawn_without_dividing_by_zero():
    image = np.zeros((8, 8, 3))
    with np.errstate(all="raise"):
        picture = np.asarray(apply_heatmap(image, np.ones((2, 2)), alpha=1.0))
    assert (picture == [0, 0, 255]).all()  # the low end of bwr, as matplotlib draws a flat image


def test_files_are_written(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    path = tmp_path / "overlay.png"
    picture = apply_heatmap(image, np.eye(2), save=path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(picture))
    frames = [apply_heatmap(image, heatmap) for heatmap in (np.eye(2), 1 - np.eye(2), np.diag([1.0, 0.0]))]
    save_gif(frames, tmp_path / "run.gif", duration_ms=50)
    with Image.open(tmp_path / "run.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (8, 8)


def test_symmetric_scaling_puts_zero_at_the_centre():
    heatmap = np.array([[-1.0, 0.0], [0.5, 2.0]])
    scaled = scale_map(heatmap, (2, 2), symmetric=True)
    np.testing.assert_allclose(scaled, 0.5 + 0.5 * heatmap / 2.0)
    picture = np.asarray(apply_heatmap(np.zeros((2, 2, 3)), heatmap, alpha=1.0, symmetric=True))
    assert (picture[0, 1] >= 250).all() and (picture[1, 1] == [255, 0, 0]).all()  # zero white, top red
