"""``maskrcnn export``: a model folder -> one ONNX file that ONNX Runtime runs."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, config_from_args, output_path

EPILOG = """examples:
  maskrcnn export --weights run1/model --format onnx --out model.onnx
  maskrcnn export --weights tv_coco --out tv_coco.onnx --set detection_min_confidence=0.5
  maskrcnn detect --weights model.onnx photos/       # runs it with ONNX Runtime

The file holds the network from the molded image to boxes, class ids, scores and mask
probabilities (dynamic image size, opset 18); the config, class names and category ids are in
its metadata.  The graph's thresholds are the config's at export time: pass --set here to change
them.  Needs the onnx extra: pip install 'maskrcnn[onnx]'."""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="export a model to ONNX (runs without this package's model code)",
        description="Export a model folder (MaskRCNN.save, train, convert) to an ONNX file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="PATH", help="a model folder written by MaskRCNN.save")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="output format (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE", type=output_path("--out", folder=False),
                   help="the file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 18, at least 17)")
    add_config_arguments(p, config_help="config to use instead of the one saved with the weights", device=False)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..export.onnx import OPSET, export_onnx, require_onnx
    from ..model.maskrcnn import MaskRCNN
    from ..weights.io import CONFIG_FILE

    require_onnx("onnx", "onnxscript")
    weights = Path(args.weights)
    config = None
    if args.config or args.overrides:
        folder = weights if weights.is_dir() else weights.parent
        config = config_from_args(args, default=folder / CONFIG_FILE)
    model = MaskRCNN.load(weights, config=config)
    path = export_onnx(model, args.out, args.opset or OPSET)
    cfg = model.config
    print(f"exported {weights} -> {path} ({cfg.backbone}, {cfg.num_classes} classes, "
          f"{path.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0
