"""``maskrcnn check-data``: counts per class and every problem in a dataset's annotations."""
from __future__ import annotations

import argparse

from .common import add_annotation_arguments, open_annotations

EPILOG = """examples:
  maskrcnn check-data --coco annotations/instances_train.json --images train/
  maskrcnn check-data --labelme labelme_folder/
  maskrcnn check-data --via balloon/train/via_region_data.json --images balloon/train/
  maskrcnn check-data --via project.json --images photos/ --class-attribute species

Problems are listed one per line as FILE: ANNOTATION: WHAT.  Exit status: 0 clean,
1 problems found, 2 the annotations could not be read at all."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check-data", help="check annotations and images before training",
        description="Read annotations (COCO, labelme or VIA), open every image and check every annotation:\n"
                    "missing or unreadable images, polygons outside the image or degenerate, empty masks,\n"
                    "unknown category ids, duplicate ids.  Prints instances per class and each problem.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_annotation_arguments(parser)
    return parser


def run(args) -> int:
    from ..data.checks import check_loaded

    report = check_loaded(open_annotations(args))
    print(report.format())
    return 0 if report.ok else 1
