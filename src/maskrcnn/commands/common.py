"""Arguments and steps shared by the commands.

``add_config_arguments`` gives a command ``--config FILE``, ``--set KEY=VALUE`` (repeatable: one
KEY=VALUE per ``--set``), ``--device`` and ``--seed``; ``config_from_args`` turns them into a
Config.  The argument types below check their value while the command line is parsed, so a bad
``--device``, ``--out`` or count ends as one ``error:`` line before any work starts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MaskRCNNError


# ---- Config, device, seed ------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser, *, config_help: str | None = None,
                         device: bool = True, seed: bool = False) -> None:
    """--config (when ``config_help`` is given), --set, --device and --seed, as
    :func:`config_from_args` and the commands read them."""
    group = parser.add_argument_group("config")
    if config_help:
        group.add_argument("--config", metavar="FILE", help=config_help)
    group.add_argument("--set", dest="overrides", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                       help="override one config value (YAML syntax); repeat for more: "
                            "--set learning_rate=0.002 --set rpn_anchor_scales=[16,32,64,128,256]")
    if device:
        group.add_argument("--device", type=device_name, metavar="DEVICE",
                           help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    if seed:
        group.add_argument("--seed", type=at_least(0), default=0, metavar="N", help="random seed (default 0)")


def config_from_args(args, default=None, saved=None):
    """The command's Config: ``saved`` (a run's own config file, which wins when resuming), else
    --config's file, else ``default`` (a Config or a config file; Matterport's defaults when
    None); then each --set in order.  ConfigError names the file or key that is wrong."""
    from ..config import Config

    if saved is not None:
        config = Config.load(saved)
    elif getattr(args, "config", None):
        config = Config.load(args.config)
    elif default is None or isinstance(default, Config):
        config = default or Config()
    else:
        config = Config.load(default)
    return config.with_overrides(args.overrides)


def key_value(text: str) -> str:
    """argparse type of --set: one KEY=VALUE."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (one KEY=VALUE per --set)")
    return text


def device_name(text: str) -> str:
    """argparse type of --device: a device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise MaskRCNNError(f"--device {text}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MaskRCNNError(f"--device {text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MaskRCNNError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MaskRCNNError(f"--device {text}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise MaskRCNNError(f"--device {text}: not supported (cpu, cuda or cuda:N)")
    return text


# ---- Other checked argument types ---------------------------------------------------------------
def at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return integer


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def output_path(option: str, folder: bool = True):
    """argparse type of an output path (``option`` names it in errors): a folder (or a file when
    ``folder`` is False) that may not exist yet, but not a file where a folder goes, a folder
    where a file goes, nor under a file.  Nothing is created here."""
    def output(text: str) -> Path:
        path = Path(text)
        absolute = path.absolute()
        existing = next(p for p in (absolute, *absolute.parents) if p.exists())
        if existing == absolute and folder and not path.is_dir():
            raise MaskRCNNError(f"{option} {text}: is a file, not a folder")
        if existing == absolute and not folder and path.is_dir():
            raise MaskRCNNError(f"{option} {text}: is a folder; give a file name")
        if existing != absolute and not existing.is_dir():
            raise MaskRCNNError(f"{option} {text}: {existing} is a file, not a folder")
        return path
    return output


# ---- Annotations and models ---------------------------------------------------------------------


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
    group.add_argument("--crowd-as-instances", action="store_true",
                       help="--coco: read iscrowd=1 annotations as instances, not crowd regions (CVAT's COCO "
                            "export marks every mask annotation iscrowd=1)")


def open_annotations(args):
    """The prepared Dataset named by the annotation arguments."""
    from ..data.formats import SOURCES, open_dataset

    sources = {name: getattr(args, name) for name in SOURCES}
    if all(value is None for value in sources.values()):
        raise MaskRCNNError("annotations: give --coco JSON --images DIR, --labelme DIR, --via JSON --images DIR, "
                            "--labels DIR --images DIR or --mask-dirs DIR")
    return open_dataset(**sources, images=args.images, class_attribute=args.class_attribute,
                        class_name=args.class_name, classes=args.classes,
                        crowd_as_instances=args.crowd_as_instances)


def add_model_arguments(parser: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """--weights, --batch-size, and --config, --set, --device (:func:`add_config_arguments`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--weights", required=weights_required, metavar="PATH",
                       help="a model folder written by MaskRCNN.save (train, convert), or an ONNX file "
                            "written by maskrcnn export (run with ONNX Runtime)")
    group.add_argument("--batch-size", type=at_least(1), default=1, metavar="N",
                       help="images per forward pass (default 1)")
    add_config_arguments(parser, config_help="config to use instead of the one saved with the weights")


def load_model(args):
    """The model of ``--weights`` with ``--config`` / ``--set`` applied, on ``--device``, in
    eval mode.  Raises MaskRCNNError subclasses for missing weights, unknown config keys and
    weights that do not fit the config."""
    import torch

    from ..model.maskrcnn import MaskRCNN
    from ..weights.io import CONFIG_FILE

    weights = Path(args.weights)
    if not weights.exists():
        raise MaskRCNNError(f"{weights}: no such model folder or weights file")
    if weights.suffix.lower() == ".onnx":
        from ..export.onnx import OnnxMaskRCNN
        if args.config or args.overrides:
            raise MaskRCNNError(f"{weights}: an exported model's config is fixed; give --set to maskrcnn export")
        return OnnxMaskRCNN.load(weights)
    config = None
    if args.config or args.overrides:
        folder = weights if weights.is_dir() else weights.parent
        config = config_from_args(args, default=folder / CONFIG_FILE)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return MaskRCNN.load(weights, map_location=device, config=config)


def runtime_name(model) -> str:
    """What runs ``model``: "ONNX Runtime (CPU)" for an exported file, else the eager path
    (``MaskRCNN.inference_path``: device, threads, convolution algorithm)."""
    if getattr(model, "runtime", None):
        return model.runtime
    if hasattr(model, "inference_path"):
        return model.inference_path()
    return f"PyTorch eager ({getattr(model, 'device', 'cpu')})"


def model_class_names(model) -> list[str]:
    """Names of the model's classes, index = class id: its own, or "class <id>"."""
    names = getattr(model, "class_names", None)
    num_classes = model.config.num_classes
    if names and len(names) == num_classes:
        return list(names)
    return ["BG"] + [f"class {i}" for i in range(1, num_classes)]


def progress(iterable, total=None, desc: str = ""):
    """A tqdm progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)
