"""Reading annotation files: JSON parsing and typed checks on every value a reader uses.

Annotation files come from tools, scripts and people; any value in them may be of the wrong
type (a ``file_name`` that is null, an image id that is a list, a ``width`` of "abc") or out of
range (a NaN or 1e300 polygon coordinate, an image said to be 100000 x 100000).  Every reader
passes each value it uses through one of these functions first, so that a bad one ends in one
:class:`~maskrcnn.errors.DataError` line naming the file, the record and the problem, instead
of a traceback, a crash inside pycocotools or an allocation the size of the machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from ..errors import DataError

#: The most bytes one image's instance masks ([H, W, N] bool, Matterport's layout) may take:
#: ~2000 instances on a 1024 x 2048 image.  A label image of random values or a file with a
#: million annotations on one image is refused before anything is allocated.
MAX_MASK_BYTES = 4 * 1024 ** 3

#: The largest coordinate magnitude accepted in a polygon, box or shape, in pixels.  Vertices
#: outside the image are clipped to it before rasterising; beyond this a value is not a pixel
#: position at all (a unit mix-up or garbage) and the file is rejected.
MAX_COORDINATE = 1e6


def read_json(path):
    """Parse the JSON file at ``path``; DataError("<path>: <why>") if missing or malformed.

    Python's parser accepts ``NaN`` and ``Infinity``; they are read here (the value checks
    below reject them where a number must be finite) rather than failing the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: malformed JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def is_number(value) -> bool:
    """True for an int or float (not a bool, which JSON's true/false become)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_id(value, where: str):
    """An id (image, annotation, category, group): an int or a non-empty string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise DataError(f"{where} must be an integer or a string, not {show_value(value)}")
    return value


def require_text(value, where: str) -> str:
    """A non-empty string (file names, labels)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} must be a non-empty string, not {show_value(value)}")
    return value


def require_size(value, where: str) -> int:
    """An image side in pixels: a positive integer (an integral float is accepted)."""
    if is_number(value) and math.isfinite(value) and value == int(value) and value > 0:
        return int(value)
    raise DataError(f"{where} must be a positive integer, not {show_value(value)}")


def require_image_size(height, width, where: str) -> tuple[int, int]:
    """``(height, width)`` as stated in an annotation file, each a positive integer and the
    area within PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``): masks of that
    size are allocated from it, so an absurd stated size must not get through."""
    height, width = require_size(height, f"{where}: height"), require_size(width, f"{where}: width")
    limit = pixel_limit()
    if limit and height * width > limit:
        raise DataError(f"{where}: {width}x{height} (width x height) is more than the "
                        f"{limit} pixels allowed (PIL.Image.MAX_IMAGE_PIXELS)")
    return height, width


def pixel_limit() -> int | None:
    """The largest image area, in pixels, read or allocated: PIL's decompression-bomb limit,
    which a user can raise (``PIL.Image.MAX_IMAGE_PIXELS = ...``) for genuinely huge images."""
    return Image.MAX_IMAGE_PIXELS


def require_mask_memory(count: int, height: int, width: int, where: str) -> None:
    """DataError unless ``count`` masks of ``height`` x ``width`` fit in :data:`MAX_MASK_BYTES`."""
    if count * height * width > MAX_MASK_BYTES:
        raise DataError(f"{where}: {count} instances of {width}x{height} would need "
                        f"{count * height * width / 1024 ** 3:.0f} GB of masks (at most "
                        f"{MAX_MASK_BYTES / 1024 ** 3:.0f} GB per image)")


def require_coordinates(values, where: str) -> list[float]:
    """A flat list of coordinates ``[x1, y1, x2, y2, ...]``: each a finite number of magnitude
    at most :data:`MAX_COORDINATE`.  Returns them as floats."""
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{where} must be a list of numbers, not {show_value(values)}")
    out = []
    for v in values:
        if not is_number(v):
            raise DataError(f"{where}: coordinate {show_value(v)} is not a number")
        if not math.isfinite(v):
            raise DataError(f"{where}: coordinate {v} is not finite")
        if abs(v) > MAX_COORDINATE:
            raise DataError(f"{where}: coordinate {v:g} is beyond +-{MAX_COORDINATE:g} pixels")
        out.append(float(v))
    return out


def require_points(points, where: str) -> list[float]:
    """A list of ``[x, y]`` pairs (labelme's ``points``) as one flat coordinate list."""
    if not isinstance(points, list):
        raise DataError(f"{where}: 'points' must be a list of [x, y], not {show_value(points)}")
    flat = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise DataError(f"{where}: point {show_value(point)} is not [x, y]")
        flat += point
    return require_coordinates(flat, where)


def show_value(value) -> str:
    """A short rendering of a bad value for a message (a huge list must not fill the screen)."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
