"""``maskrcnn convert``: Matterport .h5 or torchvision checkpoint -> our format."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, config_from_args, output_path

EPILOG = """examples:
  # Matterport's COCO weights (ResNet-101, 81 classes)
  maskrcnn convert --from matterport mask_rcnn_coco.h5 coco_model --set num_classes=81
  # a balloon model trained with Matterport, with the config it was trained with
  maskrcnn convert --from matterport mask_rcnn_balloon.h5 balloon --config balloon.yaml
  # torchvision's maskrcnn_resnet50_fpn checkpoint (any class count; the preset is chosen for you)
  maskrcnn convert --from torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth tv_coco
  # ... or let torchvision download its COCO weights
  maskrcnn convert --from torchvision coco tv_coco

The result is a folder (model.safetensors + config.yaml) that MaskRCNN.load, detect,
evaluate and train --weights read."""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert Matterport .h5 or torchvision weights to our format",
        description="Convert a Matterport Keras .h5 (model.save_weights) or a torchvision "
                    "maskrcnn_resnet50_fpn state dict into a maskrcnn model folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=("matterport", "torchvision"),
                   help="where the weights come from")
    p.add_argument("src", metavar="SRC", help='weights file (.h5 / .pth), or "coco" for torchvision\'s COCO weights')
    p.add_argument("dst", metavar="DST", type=output_path("DST"), help="output folder")
    add_config_arguments(p, config_help="the config the weights were trained with (default: Matterport's defaults "
                         "with backbone and num_classes read from the file, or the torchvision preset)",
                         device=False)
    p.add_argument("--class-names", metavar="NAMES", help="comma-separated class names, background first")
    return p


def run(args) -> int:
    from ..config import Config
    from ..model.maskrcnn import MaskRCNN

    config = None
    if args.config or args.overrides:
        config = config_from_args(args, default=Config.preset("torchvision") if args.source == "torchvision" else None)
    names = args.class_names.split(",") if args.class_names else None
    if args.source == "matterport":
        model = MaskRCNN.from_matterport(args.src, config, names)
    else:
        model = MaskRCNN.from_torchvision(args.src, config, names)
    model.save(args.dst)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.source} weights {args.src} -> {args.dst} "
          f"({cfg.backbone}, {cfg.num_classes} classes, {n / 1e6:.1f}M parameters)")
    return 0
