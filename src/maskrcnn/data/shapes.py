"""Synthetic shapes: squares, circles and triangles on plain coloured backgrounds.

The built-in data set of the demo and the tests (Matterport's ``ShapesDataset``, made
deterministic and occlusion-aware).  Image ``i`` of a data set is a pure function of
``(seed, i)``, so the same seed gives the same images on every machine and in every worker.

Shapes are drawn one after another; a later shape hides what it covers of the earlier ones,
so each instance mask is the part of its shape that is *visible*.  Instances that end up fully
hidden or smaller than ``min_area`` pixels are dropped.  Each shape's colour differs from the
background by at least ``MIN_CONTRAST`` (summed over RGB), so every object can be seen.

    ds = ShapesDataset(500, seed=1)
    image, target = ds[0]    # uint8 [3, H, W]; dict(boxes, labels, masks, iscrowd, image_id)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..boxes import masks_to_boxes

CLASS_NAMES = ["BG", "square", "circle", "triangle"]
#: Minimum sum over R, G, B of |shape colour - background colour|.
MIN_CONTRAST = 120


def _colour(rng: np.random.Generator, away_from=None) -> tuple:
    """A random RGB colour; with ``away_from``, one at least MIN_CONTRAST from it."""
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if away_from is None or sum(abs(a - b) for a, b in zip(c, away_from)) >= MIN_CONTRAST:
            return c


def shape_mask(kind: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """[height, width] bool mask of one shape (Matterport's geometry).

    kind: "square" (side 2*size), "circle" (radius size) or "triangle" (equilateral, pointing
    up, height 2*size); (cx, cy) its centre in pixels."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "square":
        draw.rectangle([cx - size, cy - size, cx + size - 1, cy + size - 1], fill=1)
    elif kind == "circle":
        draw.ellipse([cx - size, cy - size, cx + size - 1, cy + size - 1], fill=1)
    elif kind == "triangle":
        half = size / math.sin(math.radians(60))
        draw.polygon([(cx, cy - size), (cx - half, cy + size), (cx + half, cy + size)], fill=1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.array(canvas, dtype=bool)


def random_scene(rng: np.random.Generator, height: int, width: int, max_shapes: int,
                 min_size: int, max_size: int) -> tuple[tuple, list[tuple]]:
    """Draw a background colour and 1..max_shapes shapes: (bg_rgb, [(kind, rgb, cx, cy, size)])."""
    bg = _colour(rng)
    shapes = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = CLASS_NAMES[1 + int(rng.integers(0, 3))]
        size = int(rng.integers(min_size, max_size + 1))
        cx = int(rng.integers(size // 2, width - size // 2))
        cy = int(rng.integers(size // 2, height - size // 2))
        shapes.append((kind, _colour(rng, bg), cx, cy, size))
    return bg, shapes


def render_scene(bg: tuple, shapes: list[tuple], height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint shapes in order over the background.

    Returns (image uint8 [H, W, 3], visible masks bool [N, H, W], labels int64 [N]) for all N
    shapes; a mask is what remains of its shape after the later shapes are painted over it."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = bg
    masks = np.zeros((len(shapes), height, width), dtype=bool)
    for i, (kind, colour, cx, cy, size) in enumerate(shapes):
        m = shape_mask(kind, cx, cy, size, height, width)
        image[m] = colour
        masks[:i] &= ~m
        masks[i] = m
    labels = np.array([CLASS_NAMES.index(s[0]) for s in shapes], dtype=np.int64)
    return image, masks, labels


class ShapesDataset(torch.utils.data.Dataset):
    """``count`` synthetic images of ``height`` x ``width``, deterministic in ``(seed, index)``.

    Item ``i``: ``(image, target)`` with
      image:  uint8 [3, H, W] RGB.
      target: dict(boxes float32 [N, (x1, y1, x2, y2)] pixels, x2/y2 exclusive (tight boxes of
              the visible masks); labels int64 [N] in 1..3 (``CLASS_NAMES``); masks bool
              [N, H, W]; iscrowd bool [N] (all False); image_id int (= i)).
    Shape half-sizes are drawn from [min_size, max_size], default H/16 .. H/4.
    """

    class_names = CLASS_NAMES

    def __init__(self, count: int, height: int = 128, width: int = 128, seed: int = 0,
                 max_shapes: int = 4, min_size: int | None = None, max_size: int | None = None,
                 min_area: int = 16):
        if count < 0 or height < 16 or width < 16:
            raise ValueError("ShapesDataset needs count >= 0 and images of at least 16 x 16")
        self.count, self.height, self.width, self.seed = count, height, width, seed
        self.max_shapes = max_shapes
        self.min_size = min_size or max(2, min(height, width) // 16)
        self.max_size = max_size or max(self.min_size, min(height, width) // 4)
        self.min_area = min_area

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        bg, shapes = random_scene(rng, self.height, self.width, self.max_shapes,
                                  self.min_size, self.max_size)
        image, masks, labels = render_scene(bg, shapes, self.height, self.width)
        keep = masks.sum(axis=(1, 2)) >= self.min_area
        masks = torch.from_numpy(masks[keep])
        target = {
            "boxes": masks_to_boxes(masks),
            "labels": torch.from_numpy(labels[keep]),
            "masks": masks,
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.bool),
            "image_id": int(index),
        }
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target
