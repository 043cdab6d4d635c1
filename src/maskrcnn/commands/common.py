"""Arguments and steps shared by the data-facing commands (check-data, evaluate, detect)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MaskRCNNError


def add_annotation_arguments(parser: argparse.ArgumentParser) -> None:
    """--coco / --labelme / --via / --labels / --mask-dirs / --images / --class-attribute /
    --class-name / --classes, as ``open_dataset`` takes them."""
    group = parser.add_argument_group("annotations (one of --coco, --labelme, --via, --labels, --mask-dirs)")
    group.add_argument("--coco", metavar="JSON", help="COCO instance annotations (needs --images)")
    group.add_argument("--labelme", metavar="DIR", help="folder of labelme JSON files")
    group.add_argument("--via", metavar="JSON", help="VIA 1 or 2 annotations, as in the balloon sample (needs --images)")
    group.add_argument("--labels", metavar="DIR", help="folder of instance label images (pixel = instance number, "
                       "0 = background; PNG/TIFF, 8/16/32-bit), one per image of --images, same file stem")
    group.add_argument("--mask-dirs", metavar="DIR", help="Matterport's nucleus layout: DIR/<id>/images/<id>.png "
                       "and DIR/<id>/masks/*.png, one binary mask per instance")
    group.add_argument("--images", metavar="DIR", help="folder of the images named by --coco or --via, or labelled by --labels")
    group.add_argument("--class-attribute", metavar="NAME",
                       help="VIA region attribute holding the class (default: a single class)")
    group.add_argument("--class-name", default="object", metavar="NAME",
                       help="the single class of --labels, --mask-dirs and VIA without --class-attribute (default object)")
    group.add_argument("--classes", metavar="JSON", help="class of each instance for --labels / --mask-dirs: "
                       '{"<image stem or folder>": {"<label or mask stem>": "<class>"}}')


def open_annotations(args):
    """The prepared Dataset named by the annotation arguments."""
    from ..data.formats import SOURCES, open_dataset

    sources = {name: getattr(args, name) for name in SOURCES}
    if all(value is None for value in sources.values()):
        raise MaskRCNNError("annotations: give --coco JSON --images DIR, --labelme DIR, --via JSON --images DIR, "
                            "--labels DIR --images DIR or --mask-dirs DIR")
    return open_dataset(**sources, images=args.images, class_attribute=args.class_attribute,
                        class_name=args.class_name, classes=args.classes)


def add_model_arguments(parser: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """--weights, --config, --set, --device, --batch-size."""
    group = parser.add_argument_group("model")
    group.add_argument("--weights", required=weights_required, metavar="PATH",
                       help="a model folder written by MaskRCNN.save (train, convert)")
    group.add_argument("--config", metavar="YAML", help="config to use instead of the one saved with the weights")
    group.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config values, e.g. --set detection_min_confidence=0.5 detection_max_instances=50")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per forward pass (default 1)")


def load_model(args):
    """The model of ``--weights`` with ``--config`` / ``--set`` applied, on ``--device``, in
    eval mode.  Raises MaskRCNNError subclasses for missing weights, unknown config keys and
    weights that do not fit the config."""
    import torch

    from ..config import Config
    from ..model.maskrcnn import MaskRCNN
    from ..weights.io import CONFIG_FILE

    weights = Path(args.weights)
    if not weights.exists():
        raise MaskRCNNError(f"{weights}: no such model folder or weights file")
    config = None
    if args.config or args.overrides:
        folder = weights if weights.is_dir() else weights.parent
        config_path = Path(args.config) if args.config else folder / CONFIG_FILE
        config = Config.load(config_path).with_overrides(args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise MaskRCNNError(f"--device {args.device}: {e}") from None
    return MaskRCNN.load(weights, map_location=device, config=config)


def model_class_names(model) -> list[str]:
    """Names of the model's classes, index = class id: its own, or "class <id>"."""
    names = getattr(model, "class_names", None)
    num_classes = model.config.num_classes
    if names and len(names) == num_classes:
        return list(names)
    return ["BG"] + [f"class {i}" for i in range(1, num_classes)]


def batches(items, size: int):
    """Consecutive lists of up to ``size`` items of an iterable, read lazily."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def progress(iterable, total=None, desc: str = ""):
    """A tqdm progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)
