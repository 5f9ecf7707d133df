"""Image files are read at their real range and upright, whatever mode Pillow opens them in.

Each file is made here with Pillow from a known array; the oracle is that array, scaled as the
mode's range says, computed with numpy.  Preprocessing at the file's own size leaves the pixels
as they are (no resampling), so they can be compared one by one.
"""

import numpy as np
import pytest
from PIL import Image

from caffast.apps import imagefiles
from caffast.apps.imagefiles import ImageReadError, read_image
from caffast.models.preprocessing import IMAGENET, Preprocessing

SIZE = 8
AS_IS = Preprocessing(SIZE, crop=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def gray(values):
    """The (H, W, 3) picture of a grayscale oracle."""
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=2)


def read(path, preprocessing=AS_IS):
    rgb, tensor = read_image(path, preprocessing)
    mean, std = np.array(preprocessing.mean), np.array(preprocessing.std)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), (rgb - mean) / std, atol=1e-6)
    return rgb.astype(np.float64)


@pytest.fixture
def ramp():
    """Asymmetric values, so that a rotation or flip shows."""
    return np.arange(SIZE * SIZE, dtype=np.float64).reshape(SIZE, SIZE) / (SIZE * SIZE - 1)


def test_eight_bit_rgb_is_unchanged(tmp_path, ramp):
    pixels = np.stack([ramp, ramp.T, 1 - ramp], axis=2)
    pixels = (pixels * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_allclose(read(tmp_path / "a.png"), pixels / 255, atol=1e-7)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grayscale_is_divided_by_65535(tmp_path, ramp, suffix):
    values = (ramp * 40000).astype(np.uint16)  # a dark image: under 8 bits' worth it would saturate
    Image.fromarray(values).save(tmp_path / f"a.{suffix}")
    assert Image.open(tmp_path / f"a.{suffix}").mode == "I;16"
    np.testing.assert_allclose(read(tmp_path / f"a.{suffix}"), gray(values / 65535), atol=1e-7)


def test_a_sixteen_bit_photo_is_not_white_after_the_imagenet_resize(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 20000, size=(300, 400)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    rgb = read(tmp_path / "a.png", IMAGENET)
    assert rgb.shape == (224, 224, 3)
    assert abs(rgb.mean() - (values / 65535).mean()) < 0.005


@pytest.mark.parametrize(
    "values,expected",
    [
        (lambda r: (r * 60000).astype(np.int32), lambda v: v / 65535),
        (lambda r: (r * 2e9).astype(np.int32), lambda v: v / (2**31 - 1)),
        (lambda r: (r * 4e9 - 2e9).astype(np.int32), lambda v: (v + 2**31) / (2**32 - 1)),
    ],
    ids=["16-bit values", "32-bit values", "signed values"],
)
def test_thirty_two_bit_integers_by_their_range(tmp_path, ramp, values, expected):
    data = values(ramp)
    Image.fromarray(data).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == "I"
    np.testing.assert_allclose(read(tmp_path / "a.tif"), gray(expected(data.astype(np.float64))), atol=1e-7)


def test_float_images_in_the_unit_range_are_taken_as_they_are(tmp_path, ramp):
    values = (ramp * 0.3 + 0.1).astype(np.float32)  # a dark image: read as bytes it came in black
    Image.fromarray(values).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == "F"
    np.testing.assert_allclose(read(tmp_path / "a.tif"), gray(values), atol=0)


def test_float_images_beyond_the_unit_range_are_min_max_scaled(tmp_path, ramp):
    values = (ramp * 500 - 20).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "a.tif")
    data = values.astype(np.float64)
    np.testing.assert_allclose(read(tmp_path / "a.tif"), gray((data - data.min()) / (data.max() - data.min())), atol=1e-7)


def test_a_float_image_with_nan_is_refused(tmp_path, ramp):
    values = ramp.astype(np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values).save(tmp_path / "a.tif")
    with pytest.raises(ImageReadError, match="a.tif.*NaN or infinite"):
        read_image(tmp_path / "a.tif", AS_IS)


# EXIF orientation -> what a viewer does to the stored pixels
ORIENTATIONS = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_honoured(tmp_path, ramp, orientation):
    pixels = (np.stack([ramp, ramp.T, 1 - ramp], axis=2) * 255).round().astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "a.png", exif=exif)
    np.testing.assert_allclose(read(tmp_path / "a.png"), ORIENTATIONS[orientation](pixels) / 255, atol=1e-7)


def test_an_exif_rotated_jpeg_is_upright(tmp_path):
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:2, :, 0] = 255  # a red band along the stored top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "a.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "a.jpg"), dtype=np.float64) / 255
    rgb = read(tmp_path / "a.jpg")
    np.testing.assert_allclose(rgb, np.rot90(stored, -1), atol=1e-7)
    assert rgb[:, -2:, 0].mean() > 0.8 and rgb[:, :2, 0].mean() < 0.2  # the band is on the right now


def test_alpha_is_composited_onto_white(tmp_path, ramp):
    colour = (np.stack([ramp, ramp.T, 1 - ramp], axis=2) * 255).round()
    alpha = (ramp.T * 255).round()
    Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), mode="RGBA").save(tmp_path / "a.png")
    weight = alpha[..., None] / 255
    np.testing.assert_allclose(read(tmp_path / "a.png"), (colour * weight + 255 * (1 - weight)) / 255, atol=1 / 255 + 1e-7)


def test_gray_with_alpha_is_composited_onto_white(tmp_path, ramp):
    level, alpha = (ramp * 255).round(), np.where(ramp > 0.5, 255.0, 0.0)
    Image.fromarray(np.dstack([level, alpha]).astype(np.uint8), mode="LA").save(tmp_path / "a.png")
    np.testing.assert_allclose(read(tmp_path / "a.png"), gray(np.where(alpha > 0, level / 255, 1.0)), atol=1e-7)


def test_a_palette_reads_its_colours_and_its_transparent_one_as_white(tmp_path):
    index = np.tile(np.arange(SIZE) % 3, (SIZE, 1)).astype(np.uint8)
    palette = [255, 0, 0, 0, 0, 255, 0, 255, 0]
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    image.save(tmp_path / "opaque.png")
    image.save(tmp_path / "transparent.png", transparency=2)
    colours = np.array(palette, dtype=np.float64).reshape(3, 3) / 255
    np.testing.assert_allclose(read(tmp_path / "opaque.png"), colours[index], atol=1e-7)
    colours[2] = 1.0
    np.testing.assert_allclose(read(tmp_path / "transparent.png"), colours[index], atol=1e-7)


def test_cmyk(tmp_path):
    inks = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    inks[2:4, :] = (0, 255, 255, 0)  # magenta and yellow: red
    inks[4:, :] = (0, 0, 0, 255)  # black
    Image.fromarray(inks, mode="CMYK").save(tmp_path / "a.tif")
    expected = np.ones((SIZE, SIZE, 3))
    expected[2:4] = (1, 0, 0)
    expected[4:] = 0
    np.testing.assert_allclose(read(tmp_path / "a.tif"), expected, atol=1e-7)


def test_bilevel(tmp_path, ramp):
    Image.fromarray(ramp > 0.5).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "1"
    np.testing.assert_allclose(read(tmp_path / "a.png"), gray(ramp > 0.5), atol=0)


def test_a_picture_too_long_for_its_width_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """A 1 x 8000 strip would become 2 048 000 x 256 pixels on the way to a 224 crop."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (8000, 1), (10, 200, 30)).save(strip)
    decoded = []
    monkeypatch.setattr(imagefiles, "_decoded", lambda image: decoded.append(image) or image.convert("RGB"))
    with pytest.raises(ImageReadError, match=r"8000 x 1 pixels, more than 100 times longer than wide.*crop it"):
        read_image(strip)
    assert not decoded
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 3), (10, 200, 30)).save(wide)  # a ratio of 100 is still read
    rgb, _ = read_image(wide)
    assert rgb.shape == (224, 224, 3)
    monkeypatch.setattr(imagefiles, "MAX_PIXELS", 899)
    with pytest.raises(ImageReadError, match=r"300 x 3 pixels, more than the 899 caffast reads"):
        read_image(wide)
