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


# ---- the release's picture (style="release") and its keywords ----

def test_mirror_edges_are_scipys_mirror_mode():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    coarse = np.random.default_rng(3).random((7, 5))
    size = (224, 160)
    ys = (np.arange(size[0]) + 0.5) * 7 / size[0] - 0.5
    xs = (np.arange(size[1]) + 0.5) * 5 / size[1] - 0.5
    expected = scipy_ndimage.map_coordinates(coarse, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="mirror")
    mirrored = resize_bilinear(coarse, size, edges="mirror")
    np.testing.assert_allclose(mirrored, expected, rtol=0, atol=1e-12)
    clamped = resize_bilinear(coarse, size)
    inner = (slice(17, -17), slice(17, -17))  # the two differ only within half a cell of the border
    np.testing.assert_allclose(clamped[inner], mirrored[inner], rtol=0, atol=1e-12)
    assert np.abs(clamped - mirrored).max() > 0.01
    np.testing.assert_allclose(resize_bilinear(np.full((1, 1), 3.0), 5, edges="mirror"), np.full((5, 5), 3.0))


def test_release_picture_size_mode_and_dpi(tmp_path):
    image = np.random.default_rng(4).random((224, 224, 3))
    path = tmp_path / "release.png"
    picture = apply_heatmap(image, np.random.default_rng(5).random((7, 7)), save=path, axis="off", style="release")
    assert picture.size == (480, 480) and picture.mode == "RGBA"
    with Image.open(path) as written:
        assert written.size == (480, 480) and written.mode == "RGBA"
        assert written.info["dpi"] == pytest.approx((100, 100), abs=1e-3)
    wide = apply_heatmap(np.zeros((224, 300, 3)), np.eye(3), style="release")
    assert wide.size == (640, 477)  # fits the 640 x 480 figure, as matplotlib's tight crop gives


def test_release_picture_of_a_flat_map_is_the_plain_image():
    image = np.round(np.random.default_rng(6).random((224, 224, 3)) * 255).astype(np.uint8)
    with np.errstate(all="raise"):
        picture = apply_heatmap(image, np.full((7, 7), 1 / 7), style="release")
    plain = Image.fromarray(image).resize((480, 480), Image.Resampling.HAMMING).convert("RGBA")
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(plain))


def release_drawing(image, heatmap, alpha=0.6, cmap="bwr"):
    """The release's matplotlib drawing restated: skimage-style resize (scipy's mirror mode), min-max,
    the image and the map drawn with imshow, saved tight without padding."""
    matplotlib = pytest.importorskip("matplotlib")
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    import io

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    ys = (np.arange(h) + 0.5) * heatmap.shape[0] / h - 0.5
    xs = (np.arange(w) + 0.5) * heatmap.shape[1] / w - 0.5
    resized = scipy_ndimage.map_coordinates(heatmap, np.meshgrid(ys, xs, indexing="ij"), order=1, mode="mirror")
    with np.errstate(invalid="ignore"):
        scaled = (resized - resized.min()) / (resized.max() - resized.min())
    figure = plt.figure()
    plt.imshow(image)
    plt.imshow(255 * scaled, alpha=alpha, cmap=cmap)
    plt.axis("off")
    plt.subplots_adjust(top=1, bottom=0, right=1, left=0, hspace=0, wspace=0)
    plt.margins(0, 0)
    buffer = io.BytesIO()
    plt.savefig(buffer, bbox_inches="tight", pad_inches=0, format="png")
    plt.close(figure)
    return np.asarray(Image.open(buffer)).astype(float)


@pytest.mark.parametrize("heatmap", [np.random.default_rng(7).random((7, 7)), np.ones((7, 7))])
def test_release_picture_is_close_to_the_releases_matplotlib_drawing(heatmap):
    rng = np.random.default_rng(8)
    image = np.kron(rng.random((28, 28, 3)), np.ones((8, 8, 1)))  # 8-pixel blocks: resampling shows
    expected = release_drawing(image, heatmap)
    picture = np.asarray(apply_heatmap(image, heatmap, alpha=0.6, save=None, axis="off", cmap="bwr", style="release"))
    assert picture.shape == expected.shape == (480, 480, 4)
    assert np.abs(picture - expected).mean() < 2.0  # of 255: the resampling filters differ slightly
    caffast_style = np.asarray(apply_heatmap(image, heatmap).resize((480, 480), Image.Resampling.HAMMING).convert("RGBA"))
    assert np.abs(caffast_style - expected).mean() > np.abs(picture - expected).mean()


def test_the_releases_positional_order_and_keywords(tmp_path, monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(Image.Image, "show", lambda self, *args, **kwargs: shown.append(self.size))
    path = tmp_path / "positional.png"
    picture = apply_heatmap(np.zeros((8, 8, 3)), np.eye(2), 0.6, True, str(path), "bwr", "off", True)
    assert path.is_file() and shown == [(8, 8)]
    assert capsys.readouterr().out == f"save image: {path}\n"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(picture))
    with pytest.raises(ValueError, match="unknown axis"):
        apply_heatmap(np.zeros((8, 8, 3)), np.eye(2), axis="sideways")
    with pytest.raises(ValueError, match="unknown style"):
        apply_heatmap(np.zeros((8, 8, 3)), np.eye(2), style="tf")


def test_save_mask_writes_the_map_as_imageio_does(tmp_path):
    from caffast.viz import save_mask

    save_mask(np.array([[0.0, 0.5], [1.0, 0.2]]), tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(mask), [[0, 127], [255, 51]])  # v * 255 + 0.499999999, floored
    save_mask(torch.tensor([[-1.0, 0.0, 1.0]]), tmp_path / "signed.png")  # outside [0, 1]: min-max scaled
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "signed.png")), [[0, 127, 255]])
