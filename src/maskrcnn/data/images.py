"""Reading images from disk as the model wants them: ``[H, W, 3]`` uint8 RGB, upright.

Cameras store the picture sideways and say so in an EXIF tag; annotation tools show it upright,
so the tag is applied here (``PIL.ImageOps.exif_transpose``) and masks line up with what the
annotator saw.  Other colour modes are converted to RGB:

* grayscale ``L``, bilevel ``1``, palette ``P``/``PA``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``:
  PIL's own conversion; the alpha channel is dropped, as Matterport's ``load_image`` does;
* 16-bit grayscale (``I;16`` and variants) and 32-bit integer ``I``: mapped to 0..255 by an
  :class:`IntensityScaling` (the config's ``image_intensity_range`` and ``intensity_percentiles``).
  The default, ``percentile``, stretches each image over its own 0.1..99.9 percentile range, as
  microscopy viewers' auto-contrast does: a 12-bit camera's 0..4095, or a dim 0..235, fills
  0..255 instead of turning black under 255 / 65535.  ``full`` keeps the fixed rule (0..65535
  onto 0..255, the same for every image; 32-bit values outside 0..65535 are rejected);
* floating-point ``F`` images have no defined range and are rejected with a
  :class:`~maskrcnn.errors.DataError`.

The same function (:func:`read_image`, or :func:`pil_to_rgb` for decoded frames) serves
training, evaluation and ``detect``, so a model sees a 16-bit image the same way in each.
Images larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused
from their header, before any pixel is decoded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .records import pixel_limit

#: File name suffixes treated as still images when a folder is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_SIXTEEN_BIT_MAX = 65535
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class IntensityScaling:
    """How 16- and 32-bit integer pixels become 0..255 (8-bit images are left as they are).

    mode: ``"percentile"``: per image, ``percentiles[0]`` of the pixel values maps to 0 and
        ``percentiles[1]`` to 255, values beyond are clipped (an image whose percentiles are
        equal uses its min..max instead; a constant image becomes 0); ``"full"``: value * 255 / 65535.
    percentiles: (low, high) in 0..100.
    """

    mode: str = "percentile"
    percentiles: tuple = (0.1, 99.9)

    @classmethod
    def from_config(cls, config) -> "IntensityScaling":
        return cls(config.image_intensity_range, tuple(config.intensity_percentiles))

    def to_uint8(self, gray: np.ndarray, path="image", mode: str = "I") -> np.ndarray:
        """``[H, W]`` integer pixels as ``[H, W]`` uint8 by this rule (``path`` and the PIL
        ``mode`` only name the image in errors)."""
        values = gray.astype(np.float64)
        if self.mode == "full":
            if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX):
                raise DataError(f"{path}: {mode} pixel values span {values.min():g}..{values.max():g}, outside "
                                f"0..{_SIXTEEN_BIT_MAX}; cannot convert to 8-bit RGB with image_intensity_range=full "
                                "(use percentile)")
            return np.rint(values * (255.0 / _SIXTEEN_BIT_MAX)).astype(np.uint8)
        if not values.size:
            return np.zeros(gray.shape, dtype=np.uint8)
        low, high = np.percentile(values, self.percentiles)
        if high <= low:
            low, high = values.min(), values.max()
        if high <= low:
            return np.zeros(gray.shape, dtype=np.uint8)
        return np.rint(np.clip((values - low) * (255.0 / (high - low)), 0.0, 255.0)).astype(np.uint8)


def read_image(path, scaling: IntensityScaling | None = None) -> np.ndarray:
    """The image at ``path`` as ``[H, W, 3]`` uint8 RGB with its EXIF orientation applied;
    16/32-bit pixels mapped to 0..255 by ``scaling`` (default: :class:`IntensityScaling` ()).

    Raises DataError("<path>: <why>") when the file is missing, is not an image, is truncated,
    is larger than the pixel limit, or has pixel values that cannot be converted to 8-bit RGB.
    """
    with open_pil_image(path) as img:
        return pil_to_rgb(img, path, scaling)


def open_pil_image(path) -> Image.Image:
    """Open ``path`` with PIL, decode it fully and apply its EXIF orientation.

    Returns a PIL image in its stored mode (not yet converted to RGB).  Raises DataError for
    missing, unreadable, truncated or non-image files.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image")
    if not path.exists():
        raise DataError(f"{path}: no such image file")
    img = decode_pil_image(path, path)
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # PIL raises assorted errors for malformed EXIF blocks
        raise DataError(f"{path}: cannot apply the EXIF orientation ({e})") from None


def decode_pil_image(source, where) -> Image.Image:
    """Decode an image from ``source`` (a path or a binary file object, e.g. ``io.BytesIO``),
    its size checked against the pixel limit from its header before any pixel is decoded.
    DataError naming ``where`` for anything that is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            check_pixel_count(img.size, where)
            img.load()
            return img
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image file, or an image format PIL cannot read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: image too large ({e}); raise PIL.Image.MAX_IMAGE_PIXELS for genuinely "
                        "huge images") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: corrupt or truncated image ({e})") from None


def check_pixel_count(size: tuple[int, int], path) -> None:
    """DataError unless an image of ``size`` (width, height), read from its header, is within
    the pixel limit: decoding must not be what finds out that it does not fit in memory."""
    limit = pixel_limit()
    if limit and size[0] * size[1] > limit:
        raise DataError(f"{path}: {size[0]}x{size[1]} (width x height) is more than the {limit} pixels "
                        "allowed (PIL.Image.MAX_IMAGE_PIXELS; raise it for genuinely huge images)")


def pil_to_rgb(img: Image.Image, path="image", scaling: IntensityScaling | None = None) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to ``[H, W, 3]`` uint8 RGB; 16/32-bit
    integer pixels by ``scaling`` (default :class:`IntensityScaling` ()).

    ``path`` only names the image in error messages.
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        gray8 = (scaling or IntensityScaling()).to_uint8(np.asarray(img), path, mode)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"{path}: floating-point pixels (mode F) have no defined 8-bit range; "
                        "save the image as 8- or 16-bit")
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot convert image mode {mode} to RGB ({e})") from None


def image_size(path) -> tuple[int, int]:
    """``(height, width)`` of the image at ``path`` as :func:`read_image` returns it (EXIF
    rotation by 90 degrees swaps the sides), read from the header without decoding pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            check_pixel_count(img.size, path)
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file, or an image format PIL cannot read") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt image ({e})") from None
    # Orientations 5..8 are the transposed ones (a rotation by 90 or 270 degrees).
    if orientation in (5, 6, 7, 8):
        return width, height
    return height, width


def list_images(folder) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix, case-insensitive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def locate_image(image_dir: Path, name: str) -> tuple[Path, bool]:
    """Where the image an annotation file names as ``name`` is, relative to ``image_dir``:
    ``(path, found_by_name)``.  ``name`` as written (a Windows ``a\\b.jpg`` read as ``a/b.jpg``);
    where that is missing, the file of the same name directly in ``image_dir`` (exporters write
    the paths of their own machine: an absolute path, a server's upload folder, a URL), then
    ``found_by_name`` is True.  A name found nowhere gives its path as written (reported missing)."""
    written = image_dir / name.replace("\\", "/")
    if written.exists():
        return written, False
    base = PureWindowsPath(name).name if "\\" in name else Path(name).name
    if base and (image_dir / base).is_file():
        return image_dir / base, True
    return written, False
