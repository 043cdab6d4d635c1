"""COCO instance annotations (``instances_*.json``) as a :class:`~maskrcnn.data.dataset.Dataset`.

Segmentations may be polygons, compressed RLE or uncompressed RLE (rasterised by pycocotools);
an annotation without a segmentation uses its ``bbox`` as a rectangle.  ``iscrowd: 1`` regions
load with a negative class id (Matterport's convention), except in a file where every
annotation says so: CVAT's COCO export marks each mask (RLE) annotation ``iscrowd: 1``
(cvat-ai/cvat#7030), and such a file is read as instances, with a warning; a file mixing
polygons and CVAT masks needs ``crowd_as_instances`` (``--crowd-as-instances``).  COCO category
ids need not be contiguous: they are registered in increasing order as internal ids 1..K, and
``dataset.category_ids[internal_id]`` gives the COCO id back for writing results.

A category named ``_background_`` (or ``background``) that no annotation uses is the background,
not a class: labelme's COCO export writes one as category 0.  Nor is a root category that no
annotation uses, has no supercategory of its own (none, ``"none"``, or itself) and is the
supercategory of the other categories: Roboflow's exports prepend one, named after the
project (``{"id": 0, "name": "peixos", "supercategory": "none"}`` before ``{"id": 1, "name":
"peix", "supercategory": "peixos"}``), which would otherwise become a class with no instances.

Every value is checked for type and range before use (:func:`validate_coco`).  Problems that
do not stop reading (duplicate ids, annotations of unknown images) are collected
in ``dataset.problems`` for :func:`~maskrcnn.data.checks.check_dataset`; a file that is not
JSON or lacks the COCO structure raises :class:`~maskrcnn.errors.DataError`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .dataset import WARNING, Dataset, Problem, report_found_by_name
from .images import locate_image
from .records import read_json, require_coordinates, require_id, require_image_size, require_text, show_value
from .segmentation import rectangle_polygon, validate_segmentation

SOURCE = "coco"
_REQUIRED = {"images": ("id", "file_name"), "categories": ("id", "name"),
             "annotations": ("id", "image_id", "category_id")}
#: Category names that labelme's COCO export (and other tools) give the background; such a
#: category with no annotations is the background, not a class.
BACKGROUND_NAMES = ("_background_", "__background__", "background")


def validate_coco(data, path) -> None:
    """Raise DataError unless ``data`` has COCO's structure and types: lists ``images`` and
    ``categories`` (and optionally ``annotations``) of objects with their required keys; ids
    integers or strings; file names and category names strings; image sizes positive
    integers within the pixel limit; boxes four finite numbers; segmentations as
    :func:`~maskrcnn.data.segmentation.validate_segmentation` wants them."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: not COCO instance annotations (expected a JSON object)")
    for key, required in _REQUIRED.items():
        if key not in data:
            if key == "annotations":
                continue
            raise DataError(f"{path}: not COCO instance annotations (no {key!r} list)")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: {key!r} must be a list")
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DataError(f"{path}: {key}[{i}] is not an object")
            missing = [k for k in required if k not in entry]
            if missing:
                raise DataError(f"{path}: {key}[{i}] has no {missing[0]!r}")
            for k in required:
                if k != "file_name" and k != "name":
                    require_id(entry[k], f"{path}: {key}[{i}]: {k!r}")
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        require_text(image["file_name"], f"{where}: 'file_name'")
        if "height" in image or "width" in image:
            require_image_size(image.get("height"), image.get("width"), where)
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat["name"], (str, int)) or isinstance(cat["name"], bool):
            raise DataError(f"{path}: categories[{i}]: 'name' must be a string, not {show_value(cat['name'])}")
    for i, ann in enumerate(data.get("annotations", [])):
        _validate_annotation(ann, f"{path}: annotations[{i}] (id {show_value(ann['id'])})")


def _validate_annotation(ann: dict, where: str) -> None:
    """Types of one annotation's ``iscrowd``, ``bbox`` and ``segmentation`` (stored normalised)."""
    if (ann.get("iscrowd") or 0) not in (0, 1):
        raise DataError(f"{where}: 'iscrowd' must be 0 or 1, not {show_value(ann['iscrowd'])}")
    if ann.get("bbox") is not None:
        box = require_coordinates(ann["bbox"], f"{where}: 'bbox'")
        if len(box) != 4 or box[2] < 0 or box[3] < 0:
            raise DataError(f"{where}: 'bbox' must be [x, y, width, height] with width, height >= 0, "
                            f"not {show_value(ann['bbox'])}")
        ann["bbox"] = box
    ann["segmentation"] = validate_segmentation(ann.get("segmentation"), where)


def annotation_segmentation(ann: dict):
    """The annotation's segmentation in COCO form; its bbox as a rectangle when it has none."""
    segmentation = ann.get("segmentation")
    if segmentation:
        return segmentation
    if ann.get("bbox"):
        return [rectangle_polygon(*ann["bbox"])]
    return []


def background_categories(data: dict) -> set:
    """Ids of the categories that are not classes, all used by no annotation: those named as
    the background (labelme's export writes ``{"id": 0, "name": "_background_"}``) and
    grouping roots (Roboflow's: named as the supercategory of other categories, without a
    supercategory of their own)."""
    used = {ann["category_id"] for ann in data.get("annotations", [])}
    parents = {}
    for cat in data["categories"]:
        parent = cat.get("supercategory")
        if isinstance(parent, str) and parent.strip() and parent != cat["name"]:
            parents.setdefault(parent, set()).add(cat["id"])

    def is_root(cat) -> bool:
        own = cat.get("supercategory")
        orphan = own is None or (isinstance(own, str) and own.strip().lower() in ("", "none", str(cat["name"]).lower()))
        return orphan and bool(parents.get(str(cat["name"]), set()) - {cat["id"]})
    return {cat["id"] for cat in data["categories"] if cat["id"] not in used
            and (str(cat["name"]).strip().lower() in BACKGROUND_NAMES or is_root(cat))}


class CocoDataset(Dataset):
    """A Dataset read from COCO instance annotations (``load_coco``)."""

    def load_coco(self, annotation_file, image_dir, crowd_as_instances: bool = False) -> None:
        """Register the categories, images and annotations of ``annotation_file``; image
        ``file_name`` s are relative to ``image_dir``.  ``crowd_as_instances``: read
        ``iscrowd: 1`` annotations as instances (CVAT's export marks each mask so)."""
        annotation_file, image_dir = Path(annotation_file), Path(image_dir)
        data = read_json(annotation_file)
        validate_coco(data, annotation_file)
        background = background_categories(data)
        self._add_categories([c for c in data["categories"] if c["id"] not in background], annotation_file)
        images = self._index_images(data["images"], image_dir)
        annotations = data.get("annotations", [])
        if not crowd_as_instances and annotations and all(ann.get("iscrowd") == 1 for ann in annotations):
            # nothing would be an instance: the file is a tool's, not a crowd-annotated set
            self.problems.append(Problem(str(annotation_file), "", (
                f"every annotation ({len(annotations)}) is iscrowd=1, as CVAT's COCO export marks each "
                "mask; read as instances (crowd regions would train nothing)"), WARNING))
            crowd_as_instances = True
        self._add_annotations(annotations, images, annotation_file, crowd_as_instances)
        by_name = []
        for entry, annotations in images.values():
            extra = {k: entry[k] for k in ("height", "width") if k in entry}
            path, found_by_name = locate_image(image_dir, entry["file_name"])
            if found_by_name:
                by_name.append(entry["file_name"])
            self.add_image(SOURCE, image_id=entry["id"], path=path, annotations=annotations, **extra)
        report_found_by_name(self.problems, annotation_file, image_dir, by_name)

    def _add_categories(self, categories: list, annotation_file: Path) -> None:
        seen = {}
        for cat in categories:
            cat = dict(cat, name=str(cat["name"]))
            if cat["id"] in seen:
                self.problems.append(Problem(str(annotation_file), f"category {cat['id']}",
                                             f"duplicate category id (names {seen[cat['id']]!r} "
                                             f"and {cat['name']!r})"))
                continue
            seen[cat["id"]] = cat["name"]
        for cat_id in sorted(seen, key=lambda c: (isinstance(c, str), c)):
            self.add_class(SOURCE, cat_id, seen[cat_id])

    def _index_images(self, images: list, image_dir: Path) -> dict:
        """``{coco image id: (image entry, [annotations])}`` in file order, first of duplicates."""
        index = {}
        for entry in images:
            if entry["id"] in index:
                first = index[entry["id"]][0]["file_name"]
                self.problems.append(Problem(str(image_dir / entry["file_name"]), f"image {entry['id']}",
                                             f"duplicate image id (also {first})"))
                continue
            index[entry["id"]] = (entry, [])
        return index

    def _add_annotations(self, annotations: list, images: dict, annotation_file: Path,
                         crowd_as_instances: bool = False) -> None:
        seen_ids = set()
        for ann in annotations:
            where = f"annotation {ann['id']}"
            if ann["id"] in seen_ids:
                self.problems.append(Problem(str(annotation_file), where, "duplicate annotation id (both are used)",
                                             WARNING))
            seen_ids.add(ann["id"])
            if ann["image_id"] not in images:
                self.problems.append(Problem(str(annotation_file), where,
                                             f"refers to unknown image id {ann['image_id']!r}"))
                continue
            images[ann["image_id"]][1].append({
                "id": ann["id"], "category_id": ann["category_id"],
                "segmentation": annotation_segmentation(ann),
                "iscrowd": bool(ann.get("iscrowd", 0)) and not crowd_as_instances, "where": where})


def read_coco(annotation_file, image_dir, crowd_as_instances: bool = False) -> CocoDataset:
    """A prepared :class:`CocoDataset` of ``annotation_file`` with images in ``image_dir``
    (``crowd_as_instances``: as :meth:`CocoDataset.load_coco`)."""
    dataset = CocoDataset()
    dataset.load_coco(annotation_file, image_dir, crowd_as_instances)
    dataset.prepare()
    return dataset
