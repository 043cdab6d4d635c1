"""Instance shapes in COCO's ``segmentation`` form, and their rasterisation.

Every reader (COCO, labelme, VIA) turns its shapes into one of COCO's three forms, so one
function rasterises them all (pycocotools does the work):

* polygons: a list of rings ``[[x1, y1, x2, y2, ...], ...]``, in pixel coordinates of the
  upright image, where pixel (col, row) covers [col, col + 1) x [row, row + 1);
* compressed RLE: ``{"size": [H, W], "counts": "<string>"}``;
* uncompressed RLE: ``{"size": [H, W], "counts": [run, run, ...]}`` (column-major runs,
  starting with a run of zeros).

Rectangles, circles and ellipses become polygons (:func:`rectangle_polygon`,
:func:`ellipse_polygon`).
"""
from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

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
    polygons outside the image are clipped.  ValueError with :func:`form_problem`'s reason for
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
    rings = valid_rings(segmentation)
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
