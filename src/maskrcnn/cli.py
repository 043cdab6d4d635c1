"""The ``maskrcnn`` command.

Each subcommand lives in ``maskrcnn/commands/<name>.py`` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``.  Errors from bad input
(:class:`maskrcnn.errors.MaskRCNNError`, an argument argparse rejects, a missing file, a full
disk) end as one line ``error: <what>: <why>`` on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MaskRCNNError

COMMANDS = ("demo", "train", "evaluate", "detect", "check_data", "convert", "export")

EPILOG = """examples:
  maskrcnn demo --out demo_out                      train on built-in shapes, write pictures
  maskrcnn detect --weights demo_out/model photo.jpg --out results/
  maskrcnn convert --from matterport mask_rcnn_coco.h5 coco_model --set num_classes=81
  maskrcnn check-data --coco annotations.json --images images/
  maskrcnn train --coco train.json --images train/ --out run1 --set learning_rate=0.002 --set images_per_gpu=1
  maskrcnn evaluate --weights run1/model --coco val.json --images val/ --out metrics.json
  maskrcnn export --weights run1/model --format onnx --out model.onnx

`maskrcnn COMMAND --help` shows each command's options and examples."""


class UsageError(MaskRCNNError):
    """A command line argparse rejects (a missing option, a value of the wrong type)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors end like every other bad input: one ``error:`` line, status 2."""

    def error(self, message):
        if message.startswith("unrecognized arguments") and "=" in message:
            message += " (one KEY=VALUE per --set: --set a=1 --set b=2)"
        raise UsageError(f"{message.removeprefix('argument ')} (`{self.prog} --help` shows the options)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="maskrcnn", description="Mask R-CNN instance segmentation: train, evaluate, detect, convert weights.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"maskrcnn.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except MaskRCNNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a full disk, a read-only folder
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
