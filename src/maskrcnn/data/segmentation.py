"""Instance shapes in COCO's ``segmentation`` form, and their rasterisation.

Every reader (COCO, labelme, VIA) turns its shapes into one of COCO's three forms, so one
function rasterises them all (pycocotools does the work):

* polygons: a list of rings ``[[x1, y1, x2, y2, ...], ...]``, in pixel coordinates of the
  upright image, where pixel (col, row) covers [col, col + 1) x [row, row + 1);
* compressed RLE: ``{"size": [H, W], "counts": "<string>"}``;
* uncompressed RLE: ``{"size": [H, W], "counts": [run, run, ...]}`` (column-major runs,
  starting with a run of zeros).

Rectangles, circles and ellipses become polygons (:func:`rectangle_polygon`,
:func:`ellipse_polygon`).  :func:`validate_segmentation` checks a segmentation read from a file
(types, finite coordinates, RLE runs that add up to its size) before anything rasterises it:
pycocotools trusts its input, and a NaN vertex or an RLE with too many runs crashes it.
Rings that reach outside the image are clipped to it (:func:`clip_ring`) before rasterising.
"""
from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError
from .records import show_value, is_number, require_coordinates, require_image_size

#: Vertices used to approximate a circle or ellipse.
ELLIPSE_VERTICES = 64


def is_rle(segmentation) -> bool:
    return isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation


def form_problem(segmentation, height: int, width: int) -> str | None:
    """Why ``segmentation`` cannot be rasterised in a ``height`` x ``width`` image (neither
    polygons nor RLE, or an RLE of another size), or None if it can."""
    if is_rle(segmentation):
        size = list(segmentation["size"])
        if size != [height, width]:
            return (f"RLE mask size {size[1]}x{size[0]} (width x height) does not match the image "
                    f"{width}x{height}")
        return None
    if (isinstance(segmentation, list) and segmentation
            and all(isinstance(r, list) and all(isinstance(v, (int, float)) for v in r) for r in segmentation)):
        return None
    return "segmentation is neither a list of polygons nor an RLE"


def validate_segmentation(segmentation, where: str):
    """A segmentation from a file, checked: a list of rings of finite coordinates (see
    :func:`~maskrcnn.data.records.require_coordinates`), or an RLE whose ``size`` is a sane
    ``[H, W]`` and whose runs are non-negative and add up to ``H * W``; None or an empty list
    is returned as ``[]`` (no segmentation).  DataError naming ``where`` otherwise."""
    if segmentation is None:
        return []
    if isinstance(segmentation, list):
        return [require_coordinates(ring, f"{where}: polygon {k}") for k, ring in enumerate(segmentation)]
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, list) or len(size) != 2:
            raise DataError(f"{where}: RLE size must be [height, width], not {show_value(size)}")
        height, width = require_image_size(*size, f"{where}: RLE size")
        counts = segmentation["counts"]
        runs = rle_string_counts(counts, where) if isinstance(counts, str) else counts
        if not isinstance(runs, list) or not all(is_number(c) and c >= 0 and c == int(c) for c in runs):
            raise DataError(f"{where}: RLE counts must be a string or a list of non-negative integers")
        if sum(runs) != height * width:
            raise DataError(f"{where}: RLE runs add up to {sum(runs)} pixels, not {height}x{width} = "
                            f"{height * width}")
        return {"size": [height, width], "counts": counts}
    raise DataError(f"{where}: segmentation must be a list of polygons or an RLE object, not {show_value(segmentation)}")


def rle_string_counts(counts: str, where: str) -> list[int]:
    """The runs of a compressed RLE string (COCO's LEB128-like code, pycocotools' ``rleFrString``).

    Decoded here so that they can be checked before pycocotools, which does not bound them,
    writes them into a mask."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        value, shift, more = 0, 0, True
        while more:
            if p >= n:
                raise DataError(f"{where}: RLE counts string ends in the middle of a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"{where}: RLE counts string has a character outside COCO's code ({counts[p]!r})")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def clip_ring(ring: list[float], height: int, width: int, margin: float | None = None) -> list[float]:
    """The part of the ring ``[x1, y1, ...]`` inside ``[-margin, width + margin] x [-margin,
    height + margin]`` (Sutherland-Hodgman clipping against each side); the ring itself if it
    lies inside.  ``margin`` defaults to the image's longer side.

    pycocotools' work grows with a polygon's perimeter, so a vertex at 1e6 would cost gigabytes;
    clipped, the ring is the same polygon within the image (its mask differs at most where
    pycocotools rounds the new vertices to 1/5 pixel), and a ring reaching a little outside the
    image, as annotation tools' rings do, is left exactly as it is."""
    margin = float(max(height, width)) if margin is None else margin
    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3 or (xy.min() >= -margin and xy[:, 0].max() <= width + margin
                       and xy[:, 1].max() <= height + margin):
        return ring
    points = [tuple(p) for p in xy]
    for axis, limit, keep_below in ((0, -margin, False), (0, width + margin, True),
                                    (1, -margin, False), (1, height + margin, True)):
        inside = (lambda p: p[axis] <= limit) if keep_below else (lambda p: p[axis] >= limit)
        clipped = []
        for i, current in enumerate(points):
            previous = points[i - 1]
            if inside(current) != inside(previous):
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                crossing = [previous[0] + t * (current[0] - previous[0]), previous[1] + t * (current[1] - previous[1])]
                crossing[axis] = limit
                clipped.append(tuple(crossing))
            if inside(current):
                clipped.append(current)
        points = clipped
        if not points:
            return []
    return [float(v) for p in points for v in p]


def valid_rings(polygons) -> list[list[float]]:
    """The rings of a polygon segmentation that pycocotools can rasterise: an even number of
    coordinates, at least 3 vertices.  (pycocotools reads a 4-number ring as a box.)"""
    return [list(map(float, r)) for r in polygons if len(r) >= 6 and len(r) % 2 == 0]


def polygon_area(ring) -> float:
    """Area enclosed by one ring ``[x1, y1, x2, y2, ...]`` (shoelace formula, absolute)."""
    xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, RLE or uncompressed RLE) into ``[H, W]`` bool.

    Polygon rings that cannot be rasterised (fewer than 3 vertices) contribute nothing; parts of
    polygons outside the image are clipped (:func:`clip_ring`).  ValueError with :func:`form_problem`'s reason for
    a segmentation of another form or size.
    """
    problem = form_problem(segmentation, height, width)
    if problem:
        raise ValueError(problem)
    if is_rle(segmentation):
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        return mask_utils.decode(rle).astype(bool)
    rings = [r for r in (clip_ring(ring, height, width) for ring in valid_rings(segmentation)) if len(r) >= 6]
    if not rings:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(rings, height, width))
    return mask_utils.decode(rle).astype(bool)


def rectangle_polygon(x: float, y: float, width: float, height: float) -> list[float]:
    """The ring of an axis-aligned rectangle with top-left corner (x, y)."""
    return [x, y, x + width, y, x + width, y + height, x, y + height]


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0,
                    vertices: int = ELLIPSE_VERTICES) -> list[float]:
    """The ring of an ellipse centred at (cx, cy) with radii rx, ry, rotated by ``theta``
    radians (clockwise in image coordinates, where y points down)."""
    t = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
    ex, ey = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(theta), math.sin(theta)
    xs = cx + c * ex - s * ey
    ys = cy + s * ex + c * ey
    return np.stack([xs, ys], axis=1).reshape(-1).tolist()


def points_to_ring(xs, ys) -> list[float]:
    """Interleave x and y coordinates into one ring ``[x1, y1, x2, y2, ...]``."""
    return [float(v) for xy in zip(xs, ys) for v in xy]
