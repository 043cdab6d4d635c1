"""``maskrcnn train``: train or fine-tune on COCO / labelme / VIA / label-image / mask-folder
annotations or built-in shapes, with a validation set and the best model kept."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..config import LAYER_REGIMES
from ..errors import MaskRCNNError
from ..engine.checkpoint import PRETRAINED_NAMES
from .common import add_annotation_arguments, add_config_arguments, at_least, config_from_args, output_path

log = logging.getLogger("maskrcnn")

EPILOG = """examples:
  maskrcnn train --shapes 500 --out runs/shapes --steps 2000 --set num_classes=4
  maskrcnn train --coco train.json --images train/ --out runs/exp1 --weights coco \
      --val-coco val.json --val-images val/ --eval-every 500 --patience 5
  maskrcnn train --labels masks/ --images images/ --out runs/cells --weights imagenet --set backbone=resnet50
  maskrcnn train --via via_region_data.json --images balloon/train --out runs/balloon \\
      --weights coco_model --steps 3000 --set learning_rate=0.002
  maskrcnn train --out runs/exp1 --coco train.json --images train/ --resume   # continue a killed run
  torchrun --nproc_per_node=4 -m maskrcnn.cli train --coco train.json --images train/ --out runs/ddp

The run folder gets checkpoints/ (every --checkpoint-every steps, last --keep kept),
metrics.jsonl and tb/ (TensorBoard), config.yaml, model/ at the end (MaskRCNN.load) and, with a
validation set, model_best/ (the highest validation mask AP; step and AP in best.json).
A folder that holds a run is continued with --resume or replaced with --overwrite, never reused
silently.  --weights coco / imagenet read torchvision's weights from torch's hub cache
(~/.cache/torch/hub/checkpoints; downloaded when online)."""

#: What makes a folder a run folder (refused without --resume or --overwrite).
RUN_ENTRIES = ("config.yaml", "checkpoints", "metrics.jsonl", "tb", "model", "model_best")
#: Validation annotation arguments: --val-<source> for each training source.
VAL_SOURCES = ("coco", "labelme", "via", "labels", "mask_dirs")


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train a model", description="Train or fine-tune Mask R-CNN on COCO, labelme or VIA annotations, or on built-in shapes.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=output_path("--out"), metavar="DIR",
                   help="run folder (checkpoints, logs, final model)")
    add_config_arguments(p, config_help="config file, YAML or JSON (default: Matterport's defaults)", seed=True)
    add_annotation_arguments(p)
    p.add_argument("--shapes", type=at_least(1), metavar="N", help="train on N built-in synthetic shapes images instead")
    p.add_argument("--val-split", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of the images for validation AP (default 0; --shapes "
                        "always validates on separate shapes)")
    p.add_argument("--steps", type=at_least(0), default=1000, metavar="N", help="optimizer steps in total (default 1000)")
    p.add_argument("--layers", choices=tuple(LAYER_REGIMES),
                   help="which layers train (default: heads with --weights, else all)")
    p.add_argument("--weights", metavar="PATH", help="start from: coco (torchvision's COCO Mask R-CNN, with its "
                   "config), imagenet (torchvision's ImageNet ResNet backbone; backbone_style pytorch), a model "
                   "folder, a weights file, or a torchvision ResNet/Mask R-CNN state dict; class-specific "
                   "layers whose shape differs are re-initialised")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its checkpoints, logs, models)")
    val = p.add_argument_group("validation (evaluated on all its images: COCO mask and box AP)")
    val.add_argument("--val-coco", metavar="JSON", help="COCO annotations of the validation set (with --val-images)")
    val.add_argument("--val-labelme", metavar="DIR", help="folder of labelme JSON files")
    val.add_argument("--val-via", metavar="JSON", help="VIA annotations (with --val-images)")
    val.add_argument("--val-labels", metavar="DIR", help="instance label images (with --val-images)")
    val.add_argument("--val-mask-dirs", metavar="DIR", help="Matterport's nucleus layout")
    val.add_argument("--val-images", metavar="DIR", help="images of --val-coco, --val-via or --val-labels")
    p.add_argument("--eval-every", type=at_least(0), default=0, metavar="N", help="validate every N steps (default: at the end)")
    p.add_argument("--patience", type=at_least(1), metavar="N",
                   help="stop after N validations in a row without a better mask AP (default: never)")
    p.add_argument("--checkpoint-every", type=at_least(1), default=500, metavar="N", help="default 500")
    p.add_argument("--log-every", type=at_least(1), default=20, metavar="N",
                   help="log the mean losses every N steps to metrics.jsonl and TensorBoard (default 20)")
    p.add_argument("--keep", type=at_least(1), default=3, metavar="K", help="checkpoints kept (default 3)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (default auto: bf16/fp16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--workers", type=at_least(0), metavar="N",
                   help="data loading processes per training process (default: 2 on a CPU; on CUDA one per "
                        "free core, at most 8, so that the next batch is ready when the GPU is)")
    return p


def build_config(args, num_classes: int):
    """The run's config: the saved one when resuming, else --config, else torchvision's preset
    for --weights coco / imagenet, else Matterport's defaults; then --set; num_classes from the
    data when none of them set it; BatchNorm trained when starting from random weights.  A
    resumed run keeps its saved config (and takes --set on top): a --config file that says
    otherwise is named in a warning with the keys that differ."""
    from ..config import Config

    saved = Path(args.out) / "config.yaml"
    resuming = args.resume and saved.exists()
    default = Config.preset("torchvision") if args.weights in PRETRAINED_NAMES else None
    if resuming:
        config = _with_data_classes(config_from_args(args, saved=saved), num_classes)
        if getattr(args, "config", None):
            _warn_config_differs(saved, args.config, config, _fresh_config(args, num_classes, default, quiet=True))
        return config
    return _fresh_config(args, num_classes, default)


def _fresh_config(args, num_classes: int, default, quiet: bool = False):
    """The config of a new run from this command line (--config or ``default``, --set, the data)."""
    config = _with_data_classes(config_from_args(args, default=default), num_classes)
    if not args.weights:
        config = scratch_batchnorm(config, explicit=_sets_train_bn(args), quiet=quiet)
    return config


def _with_data_classes(config, num_classes: int):
    from ..config import Config

    if config.num_classes != num_classes:
        if config.num_classes != Config().num_classes:
            raise MaskRCNNError(f"num_classes={config.num_classes} in the config, but the data has "
                                f"{num_classes} classes (background included)")
        config = config.replace(num_classes=num_classes)
    return config


def _warn_config_differs(saved: Path, given: str, resumed, fresh) -> None:
    """Log which keys of --config's file (as a new run would read it) differ from the resumed run's."""
    ours, theirs = resumed.to_dict(), fresh.to_dict()
    keys = [k for k in ours if ours[k] != theirs.get(k)]
    if not keys:
        return
    shown = ", ".join(f"{k} (run {ours[k]!r}, --config {theirs.get(k)!r})" for k in keys[:4])
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    log.warning("resuming with the run's own %s; --config %s differs in %s%s. A resumed run keeps its "
                "config (--set still applies); train into a new --out to use the file's", saved, given,
                shown, more)


def _sets_train_bn(args) -> bool:
    """True when --set or the --config file names train_bn (the user's own choice)."""
    if any(o.partition("=")[0].strip().lower() == "train_bn" for o in args.overrides):
        return True
    if getattr(args, "config", None):
        import re
        return re.search(r"(?im)^\s*\"?train_bn\"?\s*:", Path(args.config).read_text()) is not None
    return False


def scratch_batchnorm(config, explicit: bool, quiet: bool = False):
    """The config for training from random weights: frozen BatchNorm (Matterport's default,
    meant for pretrained statistics) would stay at its initial identity, which the README's
    sweep measured at 0.64 against 0.89 mask AP@0.5, so BN trains, with one log line either way
    (none when ``quiet``)."""
    if config.train_bn:
        return config
    if explicit:
        if quiet:
            return config
        log.info("training from random weights with frozen BatchNorm because train_bn: false was set "
                 "(BN stays at its initial identity; the README measured 0.64 vs 0.89 mask AP@0.5)")
        return config
    if not quiet:
        log.info("training from random weights: BatchNorm trains (train_bn: true; --set train_bn=false "
                 "freezes it)")
    return config.replace(train_bn=True)


def default_layers(weights: str | None, backbone_only: bool) -> str:
    """--layers when not given: "heads" from a trained model, "3+" from a backbone alone
    (ImageNet: torchvision's default of three trainable ResNet stages), "all" from random weights."""
    if not weights:
        return "all"
    return "3+" if backbone_only else "heads"


def split_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) index lists: a seeded shuffle, ``fraction`` of the ``count`` items held out."""
    import torch

    if not 0.0 <= fraction < 1.0:
        raise MaskRCNNError(f"--val-split {fraction}: must be in [0, 1)")
    n_val = int(round(count * fraction))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val:], order[:n_val]


def training_data(args):
    """(train dataset, validation dataset or None, class names, the dataset's category id of each
    class or None) named by the arguments."""
    if args.shapes is not None:
        from ..data.shapes import CLASS_NAMES, ShapesDataset
        return (ShapesDataset(args.shapes, seed=args.seed),
                ShapesDataset(max(10, args.shapes // 10), seed=args.seed + 10_000), list(CLASS_NAMES), None)
    from torch.utils.data import Subset

    from ..data.checks import check_loaded
    from ..data.dataset import TorchDataset
    from ..data.transforms import build_transforms
    from .common import open_annotations

    dataset = open_annotations(args)
    usable = usable_images(dataset, "training")
    train_ids, val_ids = split_indices(len(usable), args.val_split, args.seed)
    train_ids, val_ids = [usable[i] for i in train_ids], [usable[i] for i in val_ids]
    train = Subset(TorchDataset(dataset, build_transforms(train=True)), train_ids)
    val = Subset(TorchDataset(dataset), val_ids) if val_ids else None
    return train, val, list(dataset.class_names), list(dataset.category_ids)


def usable_images(dataset, role: str) -> list[int]:
    """Indices of ``dataset``'s images that can be read, after one log line on its problems
    (``role``: "training" or "validation" in the messages)."""
    from ..data.checks import check_loaded

    report = check_loaded(dataset)
    if report.problems:
        log.warning("%s data: %d error(s), %d warning(s), first: %s; `maskrcnn check-data` lists them all",
                    role, len(report.errors), len(report.warnings), report.problems[0])
    log.info("%s data: %s", role, report.training_summary())
    bad = set(report.bad_image_ids)
    usable = [i for i in range(len(dataset.image_info)) if i not in bad]
    if bad:
        log.warning("%d missing or unreadable image(s) left out of %s", len(bad), role)
    if not usable:
        raise MaskRCNNError(f"{role} annotations: none of the images can be read")
    return usable


class RelabeledItems:
    """Items ``(image, target)`` of ``items`` with ``target["labels"]`` mapped through
    ``table`` (a LongTensor: the validation set's class id -> the model's)."""

    def __init__(self, items, table):
        self.items, self.table = items, table

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        return image, {**target, "labels": self.table[target["labels"]]}


def validation_data(args, class_names: list[str]):
    """The --val-* validation set as items ``(image, target)`` with the training set's class
    ids (classes matched by name), or None when no --val-* source is given."""
    import torch
    from torch.utils.data import Subset

    from ..data.dataset import TorchDataset
    from ..data.formats import open_dataset

    sources = {name: getattr(args, f"val_{name}") for name in VAL_SOURCES}
    if all(value is None for value in sources.values()):
        if args.val_images is not None:
            raise MaskRCNNError("--val-images: give the validation annotations too (--val-coco, --val-via or --val-labels)")
        return None
    if args.val_split:
        raise MaskRCNNError("--val-split and a --val-* validation set: give one of them")
    dataset = open_dataset(**sources, images=args.val_images, class_attribute=args.class_attribute,
                           class_name=args.class_name, classes=args.classes,
                           crowd_as_instances=args.crowd_as_instances and sources.get("coco") is not None)
    unknown = [name for name in dataset.class_names[1:] if name not in class_names]
    if unknown:
        raise MaskRCNNError(f"validation data: class(es) {', '.join(map(repr, unknown))} not in the training "
                            f"data's classes ({', '.join(class_names[1:])})")
    table = torch.tensor([class_names.index(name) if i else 0 for i, name in enumerate(dataset.class_names)])
    items = Subset(TorchDataset(dataset), usable_images(dataset, "validation"))
    return RelabeledItems(items, table)


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to reuse a run folder silently: a folder holding a run (RUN_ENTRIES) needs
    --resume (continue it) or --overwrite (its run entries are deleted here).  An empty,
    absent or unrelated folder is fine."""
    import shutil

    if resume and overwrite:
        raise MaskRCNNError("--resume and --overwrite: give one of them")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 decides (and deletes); its error ends every rank
    found = [name for name in RUN_ENTRIES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise MaskRCNNError(f"{out} holds a run: use --resume to continue it or --overwrite to replace it")
    log.info("--overwrite: deleting the run in %s (%s)", out, ", ".join(found))
    try:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as e:
        raise MaskRCNNError(f"{out}: cannot delete the old run ({e.strerror or e})") from None


def run(args) -> int:
    from ..data.images import IntensityScaling
    from ..engine.checkpoint import load_pretrained, save_model_folder
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.trainer import Trainer, default_workers, seed_everything
    from ..model.maskrcnn import MaskRCNN

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    prepare_run_folder(out, args.resume, args.overwrite)
    train, val, class_names, category_ids = training_data(args)
    val = validation_data(args, class_names) or val
    config = build_config(args, len(class_names))
    scaling = IntensityScaling.from_config(config)
    for part in (train, getattr(val, "items", val)):  # Subset -> TorchDataset -> Dataset: 16-bit
        dataset = getattr(getattr(part, "dataset", None), "dataset", None)  # images by the config's rule
        if dataset is not None:
            dataset.intensity_scaling = scaling
    info = init_distributed(args.device)
    try:
        seed_everything(args.seed)  # before the model: its initial weights follow --seed
        model = MaskRCNN(config, class_names, category_ids)
        backbone_only = False
        if args.weights and not args.resume:  # before anything is written: a missing file leaves no run
            backbone_only = load_pretrained(model, args.weights)["backbone_only"]
        if info.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MaskRCNNError(f"{out}: cannot create the run folder ({e.strerror or e})") from None
            config.save(out / "config.yaml")
        trainer = Trainer(model, train, out, config, layers=args.layers or default_layers(args.weights, backbone_only),
                          val_dataset=val, eval_every=args.eval_every, patience=args.patience,
                          checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                          keep=args.keep, seed=args.seed,
                          num_workers=default_workers(info.device) if args.workers is None else args.workers,
                          info=info, amp=args.amp)
        if info.is_main:
            log.info("training on %s%s, %s precision, batch %d, %d data workers per process",
                     info.device, f" x {info.world_size} processes" if info.world_size > 1 else "",
                     str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "float32",
                     trainer.batch_size, trainer.num_workers)
        result = trainer.fit(args.steps, resume=args.resume)
        if info.is_main:
            save_model_folder(model, out / "model")
            losses = ", ".join(f"{k} {v:.3f}" for k, v in result["losses"].items())
            val_text = "".join(f", {k} {v:.3f}" for k, v in result.items()
                               if k.startswith("val/") and v is not None)
            print(f"trained {result['step']} steps in {result['seconds'] / 60:.1f} min "
                  f"({result['it_per_s']:.2f} it/s): {losses}{val_text}")
            if result.get("best_step") is not None:
                print(f"best: val/mask_AP {result['best_value']:.3f} at step {result['best_step']}: "
                      f"{out / 'model_best'}")
            print(f"model: {out / 'model'}  logs: {out / 'metrics.jsonl'}, {out / 'tb'}")
    finally:
        cleanup()
    return 0
