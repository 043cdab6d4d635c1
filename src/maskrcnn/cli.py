"""The ``maskrcnn`` command.

Each subcommand lives in ``maskrcnn/commands/<name>.py`` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``.  Errors from bad input
(:class:`maskrcnn.errors.MaskRCNNError`, a missing file) end as one line
``error: <what>: <why>`` on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "train", "evaluate", "detect", "check_data", "convert")

EPILOG = """examples:
  maskrcnn demo --out demo_out                      train on built-in shapes, write pictures
  maskrcnn detect --weights demo_out/model photo.jpg --out results/
  maskrcnn convert --from matterport mask_rcnn_coco.h5 coco_model --set num_classes=81
  maskrcnn check-data --coco annotations.json --images images/
  maskrcnn train --coco train.json --images train/ --out run1 --set num_classes=4
  maskrcnn evaluate --weights run1/model --coco val.json --images val/ --out metrics.json

`maskrcnn COMMAND --help` shows each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn", description="Mask R-CNN instance segmentation: train, evaluate, detect, convert weights.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"maskrcnn.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"maskrcnn.commands.{name}":
                continue
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    from .errors import MaskRCNNError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MaskRCNNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
