"""VGG Image Annotator (VIA) 1 and 2 JSON as a :class:`~maskrcnn.data.dataset.Dataset`.

The format of Matterport's balloon sample: an object keyed by ``filename + size`` whose entries
hold ``filename`` and ``regions``, a dict ``{"0": region, ...}`` (VIA 1) or a list (VIA 2); a
full VIA 2 project file keeps that object under ``_via_img_metadata``.  Each region has
``shape_attributes`` (``name``: polygon, rect, circle or ellipse) and ``region_attributes``.

Classes: with ``class_attribute``, a region's class is the value of that region attribute (a
string, or for a checkbox attribute the single key set to true); classes are numbered 1..K in
sorted order.  Without it every region is one class, ``default_class`` (the balloon sample).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .dataset import Dataset, Problem, report_found_by_name
from .images import locate_image
from .records import read_json, require_coordinates, require_text
from .segmentation import ellipse_polygon, points_to_ring, rectangle_polygon

SOURCE = "via"
REGION_SHAPES = ("polygon", "rect", "circle", "ellipse")


def via_entries(data, path) -> list[dict]:
    """The per-image entries of a VIA 1 / VIA 2 export or a VIA 2 project file, each with its
    ``regions`` as a list.  DataError if the structure is not VIA's."""
    if isinstance(data, dict) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]
    if not isinstance(data, dict):
        raise DataError(f"{path}: not VIA annotations (expected a JSON object of images)")
    entries = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{path}: entry {key!r} is not a VIA image (no 'filename')")
        regions = entry.get("regions", [])
        if isinstance(regions, dict):
            regions = [regions[k] for k in sorted(regions, key=_region_order)]
        if not isinstance(regions, list) or not all(isinstance(r, dict) for r in regions):
            raise DataError(f"{path}: {entry['filename']}: 'regions' must be a list or object of regions")
        entries.append({"filename": require_text(entry["filename"], f"{path}: entry {key!r}: 'filename'"),
                        "regions": regions})
    return entries


def _region_order(key: str):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


def region_ring(shape: dict, where: str = "region") -> list[float]:
    """The ring ``[x1, y1, ...]`` of a VIA ``shape_attributes`` (polygon, rect, circle, ellipse).
    KeyError if an attribute is missing; DataError naming ``where`` if one is not a finite
    number of sane size (:func:`~maskrcnn.data.records.require_coordinates`)."""
    kind = shape["name"]
    if kind == "polygon":
        xs = require_coordinates(shape["all_points_x"], f"{where}: all_points_x")
        ys = require_coordinates(shape["all_points_y"], f"{where}: all_points_y")
        if len(xs) != len(ys):
            raise DataError(f"{where}: all_points_x has {len(xs)} values but all_points_y {len(ys)}")
        return points_to_ring(xs, ys)
    names = {"rect": ("x", "y", "width", "height"), "circle": ("cx", "cy", "r"),
             "ellipse": ("cx", "cy", "rx", "ry")}[kind]
    values = dict(zip(names, require_coordinates([shape[k] for k in names], f"{where}: {kind}")))
    if kind == "rect":
        return rectangle_polygon(values["x"], values["y"], values["width"], values["height"])
    if kind == "circle":
        return ellipse_polygon(values["cx"], values["cy"], values["r"], values["r"])
    theta = require_coordinates([shape.get("theta", 0.0)], f"{where}: ellipse theta")[0]
    return ellipse_polygon(values["cx"], values["cy"], values["rx"], values["ry"], theta)


def region_class(attributes: dict, class_attribute: str):
    """The class name of a region from its ``region_attributes``, or None if it has none."""
    value = attributes.get(class_attribute) if isinstance(attributes, dict) else None
    if isinstance(value, dict):  # checkbox attribute: {"option": true, ...}
        chosen = [k for k, v in value.items() if v]
        return chosen[0] if len(chosen) == 1 else None
    if value is None or str(value).strip() == "":
        return None
    return str(value)


class ViaDataset(Dataset):
    """A Dataset read from VIA JSON (``load_via``)."""

    def load_via(self, annotation_file, image_dir, class_attribute: str | None = None,
                 default_class: str = "object") -> None:
        annotation_file, image_dir = Path(annotation_file), Path(image_dir)
        entries = via_entries(read_json(annotation_file), annotation_file)
        seen: dict[str, int] = {}
        images = []
        by_name = []
        for entry in entries:
            path, found_by_name = locate_image(image_dir, entry["filename"])
            if found_by_name:
                by_name.append(entry["filename"])
            if entry["filename"] in seen:
                self.problems.append(Problem(str(path), "", "image listed twice in the VIA file"))
                continue
            seen[entry["filename"]] = len(images)
            images.append((path, self._region_annotations(entry["regions"], path, class_attribute, default_class)))
        report_found_by_name(self.problems, annotation_file, image_dir, by_name)
        class_ids = self.add_named_classes(SOURCE, (ann["category_id"] for _, anns in images for ann in anns))
        for path, annotations in images:
            for ann in annotations:
                ann["category_id"] = class_ids[ann["category_id"]]
            self.add_image(SOURCE, image_id=path.name, path=path, annotations=annotations)

    def _region_annotations(self, regions: list, path: Path, class_attribute, default_class) -> list[dict]:
        annotations = []
        for i, region in enumerate(regions):
            where = f"region {i}"
            shape = region.get("shape_attributes") or {}
            kind = shape.get("name") if isinstance(shape, dict) else None
            if kind not in REGION_SHAPES:
                self.problems.append(Problem(str(path), where, f"shape {kind!r} is not a region "
                                             f"(use {', '.join(REGION_SHAPES)}); skipped"))
                continue
            try:
                ring = region_ring(shape, f"{path}: {where}")
            except KeyError as e:
                self.problems.append(Problem(str(path), where, f"{kind} has no attribute {e}; skipped"))
                continue
            name = default_class
            if class_attribute:
                name = region_class(region.get("region_attributes"), class_attribute)
                if name is None:
                    self.problems.append(Problem(str(path), where, f"no class in region attribute "
                                                 f"{class_attribute!r}; skipped"))
                    continue
            annotations.append({"id": i, "category_id": name, "segmentation": [ring],
                                "iscrowd": False, "where": where})
        return annotations


def read_via(annotation_file, image_dir, class_attribute: str | None = None,
             default_class: str = "object") -> ViaDataset:
    """A prepared :class:`ViaDataset` of ``annotation_file`` with images in ``image_dir``."""
    dataset = ViaDataset()
    dataset.load_via(annotation_file, image_dir, class_attribute, default_class)
    dataset.prepare()
    return dataset
