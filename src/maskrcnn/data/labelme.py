"""A folder of labelme JSON files as a :class:`~maskrcnn.data.dataset.Dataset`.

Each ``*.json`` file annotates the image at its ``imagePath`` (relative to the JSON file), or
the image it embeds in ``imageData`` (base64, what labelme stores with "Save With Image Data")
when that path is missing or not an image: labelme itself reads ``imageData`` first, and its own
``examples/tutorial`` file points ``imagePath`` at the JSON.  Such an image is decoded from the
JSON each time it is loaded (nothing is kept in memory), and the JSON names it in messages.
Region shapes are ``polygon``, ``rectangle`` (two opposite corners), ``circle`` (centre and a
point on the circle), ``oriented_rectangle`` (four corners) and ``mask`` (labelme 5.5+, what its
AI-mask tool draws: a base64 PNG in ``mask`` whose top-left pixel sits at the integer part of the
first point, as labelme pastes it); shapes with the same label and the same non-null
``group_id`` form one instance, as in labelme's own COCO export.  An instance with a mask shape
is stored as a COCO RLE of the whole image (``imageHeight`` x ``imageWidth``, or the image's own
size when the file does not say); mask pixels outside the image are clipped and reported.  Class
names are the labels of region shapes in every file, numbered 1..K in sorted order (source
``"labelme"``): a label that only lines or points carry is no class.
Shapes that are not regions (``line``, ``point``, ...) are left out and recorded in
``dataset.problems``.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..structures import encode_rle
from .dataset import WARNING, Dataset, Problem
from .images import IntensityScaling, decode_pil_image, image_size, pil_to_rgb
from .records import read_json, require_id, require_image_size, require_points, require_text, show_value
from .segmentation import ellipse_polygon, rectangle_polygon, segmentation_to_mask

SOURCE = "labelme"
REGION_SHAPES = ("polygon", "rectangle", "circle", "oriented_rectangle", "mask")


def validate_labelme(data, path) -> None:
    """Raise DataError unless ``data`` is a labelme file with usable values: an object with an
    ``imagePath`` string and a list of ``shapes``, each with a string ``label``, a list of
    ``[x, y]`` points of finite, sane coordinates, a string ``shape_type`` (or none) and an
    integer or string ``group_id`` (or none); ``imageHeight`` / ``imageWidth``, when given,
    positive integers within the pixel limit.  Points are stored back as floats."""
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or "imagePath" not in data:
        raise DataError(f"{path}: not a labelme file (needs 'imagePath' and a 'shapes' list)")
    require_text(data["imagePath"], f"{path}: 'imagePath'")
    if data.get("imageHeight") is not None or data.get("imageWidth") is not None:
        require_image_size(data.get("imageHeight"), data.get("imageWidth"), f"{path}: imageHeight/imageWidth")
    for i, shape in enumerate(data["shapes"]):
        if not isinstance(shape, dict) or "label" not in shape or "points" not in shape:
            raise DataError(f"{path}: shape {i} needs a 'label' and a list of 'points'")
        require_text(shape["label"], f"{path}: shape {i}: 'label'")
        if shape.get("shape_type") is not None and not isinstance(shape["shape_type"], str):
            raise DataError(f"{path}: shape {i}: 'shape_type' must be a string, not {show_value(shape['shape_type'])}")
        if shape.get("group_id") is not None:
            require_id(shape["group_id"], f"{path}: shape {i}: 'group_id'")
        flat = require_points(shape["points"], f"{path}: shape {i}")
        shape["points"] = [flat[k:k + 2] for k in range(0, len(flat), 2)]
        if shape.get("shape_type") == "mask":
            if not isinstance(shape.get("mask"), str) or not shape["mask"]:
                raise DataError(f"{path}: shape {i}: a mask shape needs its 'mask' as a base64 PNG string, "
                                f"not {show_value(shape.get('mask'))}")
            if len(shape["points"]) != 2:
                raise DataError(f"{path}: shape {i}: a mask shape needs 2 points (its box), not "
                                f"{len(shape['points'])}")


def shape_ring(shape: dict) -> list[float]:
    """The ring ``[x1, y1, ...]`` of a labelme region shape (polygon, rectangle or circle).
    A rectangle or circle with fewer than 2 points gives its points as they are (a degenerate
    ring that :func:`~maskrcnn.data.checks.check_dataset` reports)."""
    points = shape["points"]
    kind = shape.get("shape_type") or "polygon"
    if kind == "rectangle" and len(points) >= 2:
        (xa, ya), (xb, yb) = points[:2]
        return rectangle_polygon(min(xa, xb), min(ya, yb), abs(xb - xa), abs(yb - ya))
    if kind == "circle" and len(points) >= 2:
        (cx, cy), (px, py) = points[:2]
        r = math.hypot(px - cx, py - cy)
        return ellipse_polygon(cx, cy, r, r)
    return [float(v) for point in points for v in point]


def decode_base64_image(text, where: str):
    """A PIL image from base64 ``text`` (labelme's ``imageData`` and ``mask``), its size checked
    against the pixel limit from its header before it is decoded.  DataError naming ``where``."""
    if not isinstance(text, str) or not text:
        raise DataError(f"{where}: not base64 image text, but {show_value(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where} is not base64 text") from None
    return decode_pil_image(io.BytesIO(raw), where)


def embedded_image(json_path, scaling: IntensityScaling | None = None) -> np.ndarray:
    """The image a labelme file embeds (``imageData``) as [H, W, 3] uint8 RGB, read as
    :func:`~maskrcnn.data.images.read_image` reads a file (16/32-bit pixels by ``scaling``)."""
    data = read_json(json_path)
    text = data.get("imageData") if isinstance(data, dict) else None
    with decode_base64_image(text, f"{json_path}: 'imageData'") as img:
        return pil_to_rgb(img, json_path, scaling)


def decode_mask(text: str, where: str) -> np.ndarray:
    """A labelme ``mask`` (base64 PNG, any mode) as [h, w] bool: its nonzero pixels.  The PNG's
    size is checked against the pixel limit before it is decoded; DataError naming ``where``
    for text that is not base64 or not an image."""
    with decode_base64_image(text, f"{where}: 'mask'") as img:
        return np.asarray(img.convert("L")) > 0


def paste_mask_shape(shape: dict, height: int, width: int, where: str):
    """The [height, width] bool mask of a labelme ``mask`` shape, and what had to be fixed
    (None, or a message): its PNG pasted with its top-left pixel at the integer part of the
    shape's first point (labelme's ``mask[y1:y2 + 1, x1:x2 + 1] = shape["mask"]``), clipped to
    the image."""
    mask = decode_mask(shape["mask"], where)
    (xa, ya), (xb, yb) = shape["points"]
    x0, y0, x1, y1 = int(xa), int(ya), int(xb), int(yb)  # toward zero, as numpy's astype(int)
    mh, mw = mask.shape
    fixes = []
    if (mh, mw) != (y1 - y0 + 1, x1 - x0 + 1):
        fixes.append(f"its PNG is {mw}x{mh} but its points span {x1 - x0 + 1}x{y1 - y0 + 1}; "
                     f"pasted at ({x0}, {y0})")
    full = np.zeros((height, width), dtype=bool)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + mh, height), min(x0 + mw, width)
    if bottom > top and right > left:
        full[top:bottom, left:right] = mask[top - y0:bottom - y0, left - x0:right - x0]
    if int(full.sum()) != int(mask.sum()):
        fixes.append(f"mask reaches outside the {width}x{height} image; clipped to the image")
    return full, "; ".join(fixes) or None


def shape_annotations(shapes: list, json_path: Path, problems: list, image_shape=None) -> list[dict]:
    """Instances of one labelme file: ``{"id", "category_id" (the label), "segmentation",
    "iscrowd", "where"}``.  Shapes sharing label and group_id are merged into one instance;
    shapes that are not regions are left out, with a :class:`Problem` appended to ``problems``.
    ``image_shape``: (height, width), or a function giving it (needed by mask shapes only): an
    instance with a mask shape becomes one RLE of that size, its other parts rasterised in."""
    instances: dict = {}
    for i, shape in enumerate(shapes):
        where = f"shape {i} ({shape['label']!r})"
        kind = shape.get("shape_type") or "polygon"
        if kind not in REGION_SHAPES:
            problems.append(Problem(str(json_path), where, f"shape type {kind!r} is not a region "
                                    f"(use {', '.join(REGION_SHAPES)}); skipped"))
            continue
        group = shape.get("group_id")
        key = ("shape", i) if group is None else ("group", shape["label"], group)
        if key in instances:
            instances[key]["shapes"].append(shape)
            instances[key]["where"] += f" + shape {i}"
        else:
            instances[key] = {"id": i, "category_id": shape["label"], "shapes": [shape], "iscrowd": False,
                              "where": where}
    out = []
    for ann in instances.values():
        parts = ann.pop("shapes")
        masks = [s for s in parts if s.get("shape_type") == "mask"]
        rings = [shape_ring(s) for s in parts if s.get("shape_type") != "mask"]
        if not masks:
            out.append(dict(ann, segmentation=rings))
            continue
        if callable(image_shape):
            try:
                image_shape = image_shape()
            except DataError as e:
                problems.append(Problem(str(json_path), ann["where"], f"a mask shape needs the image's size: {e}; "
                                        "skipped"))
                continue
        height, width = image_shape
        full = segmentation_to_mask(rings, height, width) if rings else np.zeros((height, width), dtype=bool)
        for shape in masks:
            pasted, fixed = paste_mask_shape(shape, height, width, f"{json_path}: {ann['where']}")
            full |= pasted
            if fixed:
                problems.append(Problem(str(json_path), ann["where"], fixed, WARNING))
        out.append(dict(ann, segmentation=encode_rle(torch.from_numpy(full)[None])[0]))
    return out


class LabelmeDataset(Dataset):
    """A Dataset read from a folder of labelme files (``load_labelme``).  An image whose file
    is missing but which its JSON embeds has ``embedded: True`` in ``image_info`` and the JSON
    as its ``path``."""

    def load_image(self, image_id: int) -> np.ndarray:
        if self.image_info[image_id].get("embedded"):
            return embedded_image(self.image_info[image_id]["path"], self.intensity_scaling)
        return super().load_image(image_id)

    def image_shape(self, image_id: int) -> tuple[int, int]:
        info = self.image_info[image_id]
        if info.get("embedded") and not ("height" in info and "width" in info):
            return self.load_image(image_id).shape[:2]
        return super().image_shape(image_id)

    def load_labelme(self, folder) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder of labelme files")
        files = sorted(folder.glob("*.json"))
        if not files:
            raise DataError(f"{folder}: no labelme .json files")
        entries = []
        for json_path in files:
            data = read_json(json_path)
            validate_labelme(data, json_path)
            entries.append((json_path, data))
        # classes are the labels of region shapes: a label only lines or points carry is no class
        label_ids = self.add_named_classes(SOURCE, (s["label"] for _, data in entries for s in data["shapes"]
                                                    if (s.get("shape_type") or "polygon") in REGION_SHAPES))
        annotated: dict = {}
        for json_path, data in entries:
            image_path = (json_path.parent / str(data["imagePath"]).replace("\\", "/")).resolve()
            embedded = uses_embedded_image(image_path, data)
            if image_path in annotated:
                self.problems.append(Problem(str(json_path), "", f"annotates {image_path.name}, "
                                             f"which {annotated[image_path].name} annotates too"))
            annotated.setdefault(image_path, json_path)
            extra = ({"height": data["imageHeight"], "width": data["imageWidth"]}
                     if data.get("imageHeight") and data.get("imageWidth") else {})
            if embedded:
                extra["embedded"] = True
                shape = lambda j=json_path: embedded_image(j).shape[:2]  # noqa: E731
            else:
                shape = lambda p=image_path: image_size(p)  # noqa: E731
            annotations = shape_annotations(data["shapes"], json_path, self.problems,
                                            (extra["height"], extra["width"]) if "height" in extra else shape)
            for ann in annotations:
                ann["category_id"] = label_ids[ann["category_id"]]
            self.add_image(SOURCE, image_id=json_path.stem, path=json_path if embedded else image_path,
                           annotations=annotations, annotation_file=str(json_path), **extra)


def uses_embedded_image(image_path: Path, data: dict) -> bool:
    """Whether a labelme file's image comes from its ``imageData``: it embeds one and
    ``image_path`` is missing or not an image (read from its header only)."""
    if not isinstance(data.get("imageData"), str) or not data["imageData"]:
        return False
    try:
        image_size(image_path)
    except DataError:
        return True
    return False


def read_labelme(folder) -> LabelmeDataset:
    """A prepared :class:`LabelmeDataset` of the labelme files in ``folder``."""
    dataset = LabelmeDataset()
    dataset.load_labelme(folder)
    dataset.prepare()
    return dataset
