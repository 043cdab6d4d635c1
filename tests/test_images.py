"""read_image: EXIF orientation, odd modes converted to RGB uint8, clear errors."""
import numpy as np
import pytest
from PIL import Image

from maskrcnn.data.images import IntensityScaling, image_size, pil_to_rgb, read_image
from maskrcnn.errors import DataError


def test_rgb_png_round_trips(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("LA", (77, 10), (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),      # alpha dropped, colour kept even if transparent
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_modes_become_rgb(tmp_path, mode, value, expected):
    path = tmp_path / ("a.tif" if mode == "CMYK" else "a.png")
    Image.new(mode, (5, 4), value).save(path)
    out = read_image(path)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert tuple(out[2, 3]) == expected


def test_palette_image_uses_its_palette(tmp_path):
    img = Image.new("P", (4, 3), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.save(tmp_path / "p.png")
    assert tuple(read_image(tmp_path / "p.png")[1, 1]) == (200, 100, 50)


def test_sixteen_bit_scaled_by_full_range(tmp_path):
    gray16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    out = read_image(tmp_path / "g16.png", IntensityScaling("full"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("top", [4095, 235, 65535])
def test_sixteen_bit_stretched_over_its_own_range(tmp_path, top):
    """A 12-bit camera's 0..4095, or a dim 0..235, fills 0..255 (255/65535 made them black)."""
    ramp = np.linspace(0, top, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "g.tif")
    out = read_image(tmp_path / "g.tif")[..., 0]
    assert out.min() == 0 and out.max() == 255
    # A linear ramp stays linear: the middle pixel is mid-grey, not 255 * 2047 / 65535 = 8.
    assert abs(int(out.reshape(-1)[len(ramp.reshape(-1)) // 2]) - 128) <= 1
    assert np.all(np.diff(out.reshape(-1).astype(int)) >= 0)


def test_percentiles_clip_outliers():
    values = np.full((100, 100), 1000, dtype=np.int32)
    values[:50] = 2000
    values[0, 0], values[0, 1] = 0, 60000   # one dark and one hot pixel: below/above 0.1..99.9 %
    out = IntensityScaling().to_uint8(values)
    assert out[0, 0] == 0 and out[0, 1] == 255
    assert out[60, 5] == 0 and out[10, 5] == 255
    wide = IntensityScaling("percentile", (0.0, 100.0)).to_uint8(values)
    assert wide[0, 0] == 0 and wide[0, 1] == 255 and wide[60, 5] == round(1000 * 255 / 60000)


def test_constant_and_flat_images():
    assert IntensityScaling().to_uint8(np.full((4, 4), 700, np.uint16)).max() == 0
    # Percentiles equal (99.9 % of the pixels are one value): min..max instead.
    flat = np.full((100, 100), 5, np.uint16)
    flat[0, 0] = 10
    out = IntensityScaling().to_uint8(flat)
    assert out[0, 0] == 255 and out[1, 1] == 0


def test_32_bit_any_range_stretched_full_range_rejected():
    img = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(pil_to_rgb(img, "x.png")[0, :, 0], [0, 255])
    with pytest.raises(DataError, match=r"x\.png: I pixel values span -5\.\.70000"):
        pil_to_rgb(img, "x.png", IntensityScaling("full"))


def test_scaling_follows_the_config():
    from maskrcnn.config import Config
    assert IntensityScaling.from_config(Config()) == IntensityScaling()
    config = Config(image_intensity_range="full", intensity_percentiles=(1, 99))
    assert IntensityScaling.from_config(config) == IntensityScaling("full", (1, 99))


def test_dataset_and_frames_use_one_rule(tmp_path):
    """Training / evaluation (Dataset.load_image) and detect (iter_frames) see the same pixels."""
    from maskrcnn.commands.detect import iter_frames
    from maskrcnn.data.dataset import images_dataset

    ramp = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    ds = images_dataset([tmp_path / "a.png"])
    frame = next(iter_frames([tmp_path / "a.png"]))
    np.testing.assert_array_equal(ds.load_image(0), frame.image)
    assert ds.load_image(0).max() == 255
    full = IntensityScaling("full")
    ds.intensity_scaling = full
    np.testing.assert_array_equal(ds.load_image(0), next(iter_frames([tmp_path / "a.png"], full)).image)
    assert ds.load_image(0).max() == round(32 * 32 * 3 * 255 / 65535)


def test_float_image_rejected(tmp_path):
    Image.fromarray(np.ones((3, 3), dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: floating-point pixels"):
        read_image(tmp_path / "f.tif")


def test_exif_orientation_applied(tmp_path):
    # Stored 20 wide x 10 high: left half red, right half blue.  Orientation 6 = rotate 90
    # degrees clockwise for display, so the upright image is 10 wide x 20 high, red on top.
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (20, 10, 3)
    assert image_size(tmp_path / "rot.jpg") == (20, 10)
    top, bottom = out[2, 5].astype(int), out[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: no such image file"):
        read_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.jpg: not an image file"):
        read_image(tmp_path / "notes.jpg")


def test_truncated_image(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: corrupt or truncated image"):
        read_image(tmp_path / "cut.png")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_image(tmp_path)
