"""Checks of a dataset before training: every problem, named by file and annotation.

    report = check_dataset(coco="train.json", images="train/")
    print(report.format())
    if not report.ok: ...

Found: images that are missing or unreadable, or whose size differs from the annotation's;
polygons with fewer than 3 points or zero area, or with vertices outside the image; RLE masks
of the wrong size; masks with no pixels; category ids not among the categories; duplicate image,
annotation and category ids (and the readers' other tolerated problems, ``Dataset.problems``).
A file that cannot be read as annotations at all raises :class:`~maskrcnn.errors.DataError`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .dataset import Dataset, Problem
from .formats import open_dataset
from .images import read_image
from .segmentation import form_problem, is_rle, polygon_area, segmentation_to_mask


@dataclass
class DataReport:
    """What :func:`check_dataset` found.

    class_counts: instances per class name (every class listed, crowd regions included).
    crowd_count: how many of those instances are crowd regions.
    problems: every problem found, in the order found.
    bad_image_ids: internal ids of the images that cannot be read (missing, corrupt): a
        trainer leaves these out; unusable annotations are skipped by ``load_mask`` itself.
    """

    num_images: int = 0
    num_annotations: int = 0
    images_without_annotations: int = 0
    crowd_count: int = 0
    class_counts: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    bad_image_ids: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A human-readable summary: counts per class, then one line per problem."""
        lines = [f"{self.num_images} images, {self.num_annotations} annotations "
                 f"({self.crowd_count} crowd), {self.images_without_annotations} images without annotations"]
        if self.class_counts:
            width = max(len(name) for name in self.class_counts)
            lines.append(f"{'class':{width}}  instances")
            lines += [f"{name:{width}}  {count}" for name, count in self.class_counts.items()]
        if self.problems:
            lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}:")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def check_dataset(coco=None, labelme=None, via=None, images=None, class_attribute: str | None = None) -> DataReport:
    """Read the annotations (arguments as :func:`~maskrcnn.data.formats.open_dataset`) and check
    them and their images.  Raises DataError only when the annotations cannot be read at all."""
    return check_loaded(open_dataset(coco=coco, labelme=labelme, via=via, images=images,
                                     class_attribute=class_attribute))


def check_loaded(dataset: Dataset) -> DataReport:
    """Check a prepared Dataset.  Images whose ``image_info`` has ``annotations`` (the readers
    of this package) are checked annotation by annotation; others (a ported Matterport class
    with its own ``load_mask``) through ``load_mask``."""
    report = DataReport(num_images=len(dataset.image_info), problems=list(dataset.problems))
    counts: Counter = Counter()
    for image_id, info in enumerate(dataset.image_info):
        shape, readable = _check_image(dataset, image_id, report.problems)
        if not readable:
            report.bad_image_ids.append(image_id)
        if "annotations" in info:
            class_ids = _check_annotations(dataset, image_id, shape, report.problems)
        else:
            class_ids = _check_load_mask(dataset, image_id, shape, report.problems)
        report.num_annotations += len(class_ids)
        report.crowd_count += sum(1 for c in class_ids if c < 0)
        report.images_without_annotations += not class_ids
        counts.update(abs(c) for c in class_ids)
    report.class_counts = {dataset.class_names[i]: counts[i] for i in range(1, dataset.num_classes)}
    return report


def _check_image(dataset: Dataset, image_id: int, problems: list) -> tuple[tuple[int, int] | None, bool]:
    """((height, width), True) of the decoded image, or (the annotated size or None, False) if
    it cannot be read (then a problem is recorded)."""
    info = dataset.image_info[image_id]
    stated = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
    try:
        actual = read_image(info["path"]).shape[:2]
    except DataError as e:
        problems.append(Problem(info["path"], "", str(e).removeprefix(f"{info['path']}: ")))
        return stated, False
    if stated is not None and stated != actual:
        problems.append(Problem(info["path"], "", f"annotations say the image is {stated[1]}x{stated[0]} "
                                f"(width x height) but it is {actual[1]}x{actual[0]}"))
    return actual, True


def _check_annotations(dataset: Dataset, image_id: int, shape, problems: list) -> list[int]:
    """Check each stored annotation of one image; returns the internal class ids of the
    annotations whose category is known (negative for crowd)."""
    info = dataset.image_info[image_id]
    file = info.get("annotation_file", info["path"])
    class_ids = []
    for ann in info["annotations"]:
        found = []
        class_id = dataset.class_from_source_map.get(f"{info['source']}.{ann['category_id']}")
        if class_id is None:
            found.append(f"unknown category id {ann['category_id']!r}")
        else:
            class_ids.append(-class_id if ann.get("iscrowd") else class_id)
        if shape is not None:
            found += segmentation_problems(ann["segmentation"], *shape)
        problems += [Problem(file, ann["where"], message) for message in found]
    return class_ids


def segmentation_problems(segmentation, height: int, width: int) -> list[str]:
    """What is wrong with one COCO segmentation in a ``height`` x ``width`` image (empty list
    if nothing): malformed, wrong RLE size, degenerate rings, vertices outside, no pixels."""
    problem = form_problem(segmentation, height, width)
    if problem:
        return [problem]
    found = [] if is_rle(segmentation) else polygon_problems(segmentation, height, width)
    try:
        empty = not segmentation_to_mask(segmentation, height, width).any()
    except Exception as e:  # pycocotools rejects malformed RLE counts with assorted errors
        return found + [f"RLE cannot be decoded ({e})"]
    if empty and not any(message.startswith("degenerate") for message in found):
        found.append("empty mask (no pixel inside the image)")
    return found


def polygon_problems(rings: list, height: int, width: int) -> list[str]:
    """Degenerate rings (odd coordinate count, < 3 points, zero area) and vertices outside the
    image (outside [0, width] x [0, height])."""
    found = []
    for k, ring in enumerate(rings):
        label = f"polygon {k}" if len(rings) > 1 else "polygon"
        if len(ring) % 2:
            found.append(f"degenerate {label}: odd number of coordinates ({len(ring)})")
            continue
        if len(ring) < 6:
            found.append(f"degenerate {label}: {len(ring) // 2} points (needs at least 3)")
            continue
        if polygon_area(ring) == 0:
            found.append(f"degenerate {label}: zero area")
        xy = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        if lo[0] < 0 or lo[1] < 0 or hi[0] > width or hi[1] > height:
            found.append(f"{label} outside the image: x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g} "
                         f"in a {width}x{height} image")
    return found


def _check_load_mask(dataset: Dataset, image_id: int, shape, problems: list) -> list[int]:
    """Check a dataset's own ``load_mask``: mask size and empty masks; returns its class ids."""
    ref = dataset.image_reference(image_id) or str(dataset.image_info[image_id].get("path", image_id))
    try:
        masks, class_ids = dataset.load_mask(image_id)
    except DataError as e:
        problems.append(Problem(ref, "", str(e)))
        return []
    if masks.shape[2] and shape is not None and masks.shape[:2] != tuple(shape):
        problems.append(Problem(ref, "", f"masks are {masks.shape[1]}x{masks.shape[0]} (width x height) "
                                f"but the image is {shape[1]}x{shape[0]}"))
    for i in np.flatnonzero(~masks.reshape(-1, masks.shape[2]).any(axis=0)) if masks.shape[2] else []:
        problems.append(Problem(ref, f"instance {i}", "empty mask"))
    return [int(c) for c in class_ids if 0 < abs(int(c)) < dataset.num_classes]
