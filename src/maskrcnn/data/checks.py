"""Checks of a dataset before training: every problem, named by file and annotation.

    report = check_dataset(coco="train.json", images="train/")
    print(report.format())
    if not report.ok: ...          # errors; report.passed(strict=True) counts warnings too

Errors make an image or annotation unusable, and training leaves it out: images that are missing
or unreadable, or whose size differs from the annotation's; degenerate polygons (fewer than 3
points, zero area); RLE masks of the wrong size; masks with no pixel inside the image; category
ids not among the categories; duplicate image and category ids (and the readers' other
problems, ``Dataset.problems``).  Warnings name a fix that is applied, and the annotation is
used: a polygon reaching outside the image is clipped to it (annotation tools and COCO itself
put vertices a fraction of a pixel, or a few pixels, outside); a degenerate part of a polygon
whose other parts are fine is dropped; a duplicate annotation id is kept.  A file that cannot
be read as annotations at all raises :class:`~maskrcnn.errors.DataError`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .dataset import ERROR, WARNING, Dataset, Problem
from .formats import open_dataset
from .records import require_mask_memory
from .segmentation import form_problem, is_rle, polygon_area, segmentation_to_mask

#: Why training leaves an annotation out, as counted in ``DataReport.skipped``.
SKIP_UNKNOWN_CATEGORY = "unknown category"
SKIP_UNUSABLE_SHAPE = "unusable segmentation"
SKIP_EMPTY = "no pixel inside the image"
SKIP_UNREADABLE_IMAGE = "image unreadable"
SKIP_READER = "rejected while reading"


@dataclass
class DataReport:
    """What :func:`check_dataset` found.

    class_counts: instances per class name (every class listed, crowd regions included).
    crowd_count: how many of those instances are crowd regions.
    problems: every problem found, in the order found.
    bad_image_ids: internal ids of the images that cannot be used (missing, corrupt, masks of
        another size): a trainer leaves these out; unusable annotations are skipped by
        ``load_mask`` itself.
    skipped: annotations training leaves out, counted by reason (the SKIP_* names).
    used, clipped: annotations training uses, and how many of them were clipped to the image.
    """

    num_images: int = 0
    num_annotations: int = 0
    images_without_annotations: int = 0
    crowd_count: int = 0
    class_counts: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    bad_image_ids: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    used: int = 0
    clipped: int = 0

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.severity != WARNING]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def passed(self, strict: bool = False) -> bool:
        """No errors, and with ``strict`` no warnings either (``check-data --strict``)."""
        return not self.problems if strict else self.ok

    def format(self) -> str:
        """A human-readable summary: counts per class, then one line per error and per warning."""
        lines = [f"{self.num_images} images, {self.num_annotations} annotations "
                 f"({self.crowd_count} crowd), {self.images_without_annotations} images without annotations"]
        if self.crowd_count:
            lines.append(f"the {self.crowd_count} crowd regions (iscrowd=1) train no instance; if your tool marks "
                         "masks so (CVAT's COCO export does), --crowd-as-instances reads them as instances")
        if self.class_counts:
            width = max(len(name) for name in self.class_counts)
            lines.append(f"{'class':{width}}  instances")
            lines += [f"{name:{width}}  {count}" for name, count in self.class_counts.items()]
        for title, found in (("error", self.errors), ("warning", self.warnings)):
            if found:
                lines.append(f"{len(found)} {title}{'s' if len(found) != 1 else ''}:")
                lines += [f"  {p}" for p in found]
        if not self.problems:
            lines.append("no problems found")
        lines.append(self.training_summary())
        return "\n".join(lines)

    def training_summary(self) -> str:
        """One line: what training does with the annotations (used, clipped, left out and why)."""
        text = f"{self.used} annotations used ({self.clipped} clipped to the image)"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])))
            text += f", {sum(self.skipped.values())} left out ({reasons})"
        return text


def check_dataset(**sources) -> DataReport:
    """Read the annotations (keyword arguments as :func:`~maskrcnn.data.formats.open_dataset`)
    and check them and their images.  Raises DataError only when they cannot be read at all."""
    return check_loaded(open_dataset(**sources))


def check_loaded(dataset: Dataset) -> DataReport:
    """Check a prepared Dataset.  Images whose ``image_info`` has ``annotations`` (the COCO,
    labelme and VIA readers) are checked annotation by annotation; others (mask images, a
    ported Matterport class with its own ``load_mask``) through ``load_mask``."""
    report = DataReport(num_images=len(dataset.image_info), problems=list(dataset.problems))
    report.skipped[SKIP_READER] = sum(1 for p in dataset.problems if p.severity == ERROR and p.where.startswith(
        ("annotation", "shape", "region")))
    counts: Counter = Counter()
    for image_id, info in enumerate(dataset.image_info):
        shape, readable = _check_image(dataset, image_id, report.problems)
        if "annotations" in info:
            class_ids = _check_annotations(dataset, image_id, shape, report)
            if shape is not None and readable:
                try:
                    require_mask_memory(len(info["annotations"]), *shape, info["path"])
                except DataError as e:
                    report.problems.append(Problem(info["path"], "", str(e).removeprefix(f"{info['path']}: ")))
                    readable = False
        else:
            class_ids = _check_load_mask(dataset, image_id, shape, report)
            readable = readable and class_ids is not None
            class_ids = class_ids or []
        if not readable:
            report.bad_image_ids.append(image_id)
            report.skipped[SKIP_UNREADABLE_IMAGE] += len(class_ids)
        else:
            report.used += len(class_ids)
        report.num_annotations += len(class_ids)
        report.crowd_count += sum(1 for c in class_ids if c < 0)
        report.images_without_annotations += not class_ids
        counts.update(abs(c) for c in class_ids)
    report.class_counts = {dataset.class_names[i]: counts[i] for i in range(1, dataset.num_classes)}
    report.skipped = +report.skipped
    return report


def _check_image(dataset: Dataset, image_id: int, problems: list) -> tuple[tuple[int, int] | None, bool]:
    """((height, width), True) of the decoded image, or (the annotated size or None, False) if
    it cannot be used (then an error is recorded): missing, unreadable, or of another size than
    the annotations say (their masks would not fit it)."""
    info = dataset.image_info[image_id]
    stated = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
    try:
        actual = dataset.load_image(image_id).shape[:2]
    except DataError as e:
        problems.append(Problem(info["path"], "", str(e).removeprefix(f"{info['path']}: ")))
        return stated, False
    if stated is not None and stated != actual:
        problems.append(Problem(info["path"], "", f"annotations say the image is {stated[1]}x{stated[0]} "
                                f"(width x height) but it is {actual[1]}x{actual[0]}"))
        return stated, False
    return actual, True


def _check_annotations(dataset: Dataset, image_id: int, shape, report: DataReport) -> list[int]:
    """Check each stored annotation of one image; returns the internal class ids of the
    annotations that training uses (negative for crowd).  The others are counted in
    ``report.skipped``."""
    info = dataset.image_info[image_id]
    file = info.get("annotation_file", info["path"])
    class_ids = []
    for ann in info["annotations"]:
        class_id = dataset.class_id(image_id, ann["category_id"])
        found = [] if shape is None else segmentation_problems(ann["segmentation"], *shape)
        if class_id is None:
            found.insert(0, (f"unknown category id {ann['category_id']!r}", ERROR))
        report.problems += [Problem(file, ann["where"], message, severity) for message, severity in found]
        skip = _skip_reason(class_id, found)
        if skip:
            report.skipped[skip] += 1
            continue
        report.clipped += any("clipped" in message for message, _ in found)
        class_ids.append(-class_id if ann.get("iscrowd") else class_id)
    return class_ids


def _skip_reason(class_id, found: list) -> str | None:
    """Why training leaves an annotation out (None: it is used)."""
    errors = [message for message, severity in found if severity == ERROR]
    if class_id is None:
        return SKIP_UNKNOWN_CATEGORY
    if any(message.startswith("empty mask") for message in errors):
        return SKIP_EMPTY
    return SKIP_UNUSABLE_SHAPE if errors else None


def segmentation_problems(segmentation, height: int, width: int) -> list[tuple[str, str]]:
    """What is wrong with one COCO segmentation in a ``height`` x ``width`` image, as
    ``(message, severity)`` pairs (empty if nothing): malformed or wrong-size RLE, degenerate
    rings, vertices outside the image (clipped: a warning), no pixel inside the image."""
    problem = form_problem(segmentation, height, width)
    if problem:
        return [(problem, ERROR)]
    try:
        empty = not segmentation_to_mask(segmentation, height, width).any()
    except Exception as e:  # pycocotools rejects malformed RLE counts with assorted errors
        return [(f"RLE cannot be decoded ({e})", ERROR)]
    if is_rle(segmentation):
        return [("empty mask (no pixel inside the image)", ERROR)] if empty else []
    found = polygon_problems(segmentation, height, width)
    if empty:
        degenerate = [(message, ERROR) for message in found if message.startswith("degenerate")]
        outside = [message.split(" outside the image: ")[1] for message in found if " outside the image: " in message]
        return degenerate or [("empty mask (no pixel inside the image)" + (f": polygon at {outside[0]}" if outside else ""),
                               ERROR)]
    return [(f"{message}; clipped to the image" if " outside " in message else f"{message}; the other parts "
             "are used", WARNING) for message in found]


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


def _check_load_mask(dataset: Dataset, image_id: int, shape, report: DataReport) -> list[int] | None:
    """Check a dataset's own ``load_mask`` (mask size, empty masks, and the problems of a
    reader that reports them through ``load_mask_checked``); returns the class ids of the
    instances training uses, or None if the image's masks cannot be used at all."""
    ref = dataset.image_reference(image_id) or str(dataset.image_info[image_id].get("path", image_id))
    checked = getattr(dataset, "load_mask_checked", None)
    try:
        if checked is not None:
            masks, class_ids, found = checked(image_id)
            report.problems += found
            report.skipped[SKIP_READER] += sum(1 for p in found if p.severity == ERROR)
        else:
            masks, class_ids = dataset.load_mask(image_id)
    except DataError as e:
        report.problems.append(Problem(ref, "", str(e).removeprefix(f"{ref}: ")))
        return None
    if shape is not None and masks.shape[:2] != tuple(shape):
        report.problems.append(Problem(ref, "", f"masks are {masks.shape[1]}x{masks.shape[0]} (width x height) "
                                       f"but the image is {shape[1]}x{shape[0]}"))
        return None
    empty = np.flatnonzero(~masks.reshape(-1, masks.shape[2]).any(axis=0)) if masks.shape[2] else []
    for i in empty:
        report.problems.append(Problem(ref, f"instance {i}", "empty mask"))
    report.skipped[SKIP_EMPTY] += len(empty)
    keep = np.ones(len(class_ids), dtype=bool)
    keep[list(empty)] = False
    return [int(c) for c, k in zip(class_ids, keep) if k and 0 < abs(int(c)) < dataset.num_classes]
