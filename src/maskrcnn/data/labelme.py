"""A folder of labelme JSON files as a :class:`~maskrcnn.data.dataset.Dataset`.

Each ``*.json`` file annotates the image at its ``imagePath`` (relative to the JSON file).
Region shapes are ``polygon``, ``rectangle`` (two opposite corners) and ``circle`` (centre and
a point on the circle); shapes with the same label and the same non-null ``group_id`` form one
instance, as in labelme's own COCO export.  Class names are collected from every file and
numbered 1..K in sorted order (source ``"labelme"``).  Shapes that are not regions (``line``,
``point``, ...) are left out and recorded in ``dataset.problems``.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import DataError
from .dataset import Dataset, Problem
from .records import read_json, require_id, require_image_size, require_points, require_text, show_value
from .segmentation import ellipse_polygon, rectangle_polygon

SOURCE = "labelme"
REGION_SHAPES = ("polygon", "rectangle", "circle")


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


def shape_annotations(shapes: list, json_path: Path, problems: list) -> list[dict]:
    """Instances of one labelme file: ``{"id", "category_id" (the label), "segmentation",
    "iscrowd", "where"}``.  Shapes sharing label and group_id are merged into one instance;
    shapes that are not regions are left out, with a :class:`Problem` appended to ``problems``."""
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
            instances[key]["segmentation"].append(shape_ring(shape))
            instances[key]["where"] += f" + shape {i}"
        else:
            instances[key] = {"id": i, "category_id": shape["label"], "segmentation": [shape_ring(shape)],
                              "iscrowd": False, "where": where}
    return list(instances.values())


class LabelmeDataset(Dataset):
    """A Dataset read from a folder of labelme files (``load_labelme``)."""

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
        label_ids = self.add_named_classes(SOURCE, (s["label"] for _, data in entries for s in data["shapes"]))
        annotated: dict = {}
        for json_path, data in entries:
            image_path = (json_path.parent / str(data["imagePath"]).replace("\\", "/")).resolve()
            if image_path in annotated:
                self.problems.append(Problem(str(json_path), "", f"annotates {image_path.name}, "
                                             f"which {annotated[image_path].name} annotates too"))
            annotated.setdefault(image_path, json_path)
            annotations = shape_annotations(data["shapes"], json_path, self.problems)
            for ann in annotations:
                ann["category_id"] = label_ids[ann["category_id"]]
            extra = ({"height": data["imageHeight"], "width": data["imageWidth"]}
                     if data.get("imageHeight") and data.get("imageWidth") else {})
            self.add_image(SOURCE, image_id=json_path.stem, path=image_path, annotations=annotations,
                           annotation_file=str(json_path), **extra)


def read_labelme(folder) -> LabelmeDataset:
    """A prepared :class:`LabelmeDataset` of the labelme files in ``folder``."""
    dataset = LabelmeDataset()
    dataset.load_labelme(folder)
    dataset.prepare()
    return dataset
