"""``maskrcnn check-data``: counts per class, and every error and warning in a dataset."""
from __future__ import annotations

import argparse

from .common import add_annotation_arguments, open_annotations

EPILOG = """examples:
  maskrcnn check-data --coco annotations/instances_train.json --images train/
  maskrcnn check-data --labelme labelme_folder/
  maskrcnn check-data --via balloon/train/via_region_data.json --images balloon/train/
  maskrcnn check-data --via project.json --images photos/ --class-attribute species
  maskrcnn check-data --images nuclei/images/ --labels nuclei/masks/
  maskrcnn check-data --mask-dirs stage1_train/ --strict

Errors make an image or annotation unusable (training leaves it out); warnings name a fix that
training applies (a polygon reaching outside the image is clipped to it) and the annotation is
used.  Each is listed on one line as FILE: ANNOTATION: WHAT.  Exit status: 0 no errors
(warnings allowed), 1 errors found (or, with --strict, warnings), 2 the annotations could not
be read at all."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check-data", help="check annotations and images before training",
        description="Read annotations (COCO, labelme, VIA, label images or mask folders), open every image and\n"
                    "check every annotation: missing or unreadable images, degenerate polygons, masks with no\n"
                    "pixel in the image, unknown category ids, duplicate ids (errors); polygons reaching\n"
                    "outside the image (warnings: clipped).  Prints instances per class and each problem.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_annotation_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    return parser


def run(args) -> int:
    from ..data.checks import check_loaded

    report = check_loaded(open_annotations(args))
    print(report.format())
    return 0 if report.passed(strict=args.strict) else 1
