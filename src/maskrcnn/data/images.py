"""Reading images from disk as the model wants them: ``[H, W, 3]`` uint8 RGB, upright.

Cameras store the picture sideways and say so in an EXIF tag; annotation tools show it upright,
so the tag is applied here (``PIL.ImageOps.exif_transpose``) and masks line up with what the
annotator saw.  Other colour modes are converted to RGB:

* grayscale ``L``, bilevel ``1``, palette ``P``/``PA``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``:
  PIL's own conversion; the alpha channel is dropped, as Matterport's ``load_image`` does;
* 16-bit grayscale (``I;16`` and variants) and 32-bit integer ``I`` holding 0..65535: scaled
  by 255 / 65535 and rounded, so the full 16-bit range maps onto the full 8-bit range;
* anything that cannot be mapped to 0..255 without guessing (floating point ``F``, ``I``
  values outside 0..65535) is rejected with a :class:`~maskrcnn.errors.DataError`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

#: File name suffixes treated as still images when a folder is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_SIXTEEN_BIT_MAX = 65535
_EXIF_ORIENTATION = 0x0112


def read_image(path) -> np.ndarray:
    """The image at ``path`` as ``[H, W, 3]`` uint8 RGB with its EXIF orientation applied.

    Raises DataError("<path>: <why>") when the file is missing, is not an image, is truncated,
    or has pixel values that cannot be converted to 8-bit RGB.
    """
    with open_pil_image(path) as img:
        return pil_to_rgb(img, path)


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file, or an image format PIL cannot read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # PIL raises assorted errors for malformed EXIF blocks
        raise DataError(f"{path}: cannot apply the EXIF orientation ({e})") from None


def pil_to_rgb(img: Image.Image, path="image") -> np.ndarray:
    """Convert a decoded PIL image of any supported mode to ``[H, W, 3]`` uint8 RGB.

    ``path`` only names the image in error messages.
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(img).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > _SIXTEEN_BIT_MAX):
            raise DataError(f"{path}: {mode} pixel values span {gray.min()}..{gray.max()}, "
                            f"outside 0..{_SIXTEEN_BIT_MAX}; cannot convert to 8-bit RGB")
        gray8 = np.rint(gray * (255.0 / _SIXTEEN_BIT_MAX)).astype(np.uint8)
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
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file, or an image format PIL cannot read") from None
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
