"""``maskrcnn train``: train or fine-tune on COCO / labelme / VIA annotations or built-in shapes."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import LAYER_REGIMES
from ..errors import MaskRCNNError
from .common import add_annotation_arguments, add_config_arguments, at_least, config_from_args, output_path

log = logging.getLogger("maskrcnn")

EPILOG = """examples:
  maskrcnn train --shapes 500 --out runs/shapes --steps 2000 --set num_classes=4
  maskrcnn train --coco train.json --images train/ --out runs/exp1 --weights coco_model --layers heads
  maskrcnn train --via via_region_data.json --images balloon/train --out runs/balloon \\
      --weights coco_model --steps 3000 --set learning_rate=0.002
  maskrcnn train --out runs/exp1 --coco train.json --images train/ --resume   # continue a killed run
  torchrun --nproc_per_node=4 -m maskrcnn.cli train --coco train.json --images train/ --out runs/ddp

The run folder gets checkpoints/ (every --checkpoint-every steps, last --keep kept),
metrics.jsonl and tb/ (TensorBoard), config.yaml and, at the end, model/ (MaskRCNN.load)."""


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
    p.add_argument("--weights", metavar="PATH", help="pretrained model folder or weights file to start from; "
                   "class-specific layers whose shape differs are re-initialised")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--eval-every", type=at_least(0), default=0, metavar="N", help="validate every N steps (default: at the end)")
    p.add_argument("--checkpoint-every", type=at_least(1), default=500, metavar="N", help="default 500")
    p.add_argument("--keep", type=at_least(1), default=3, metavar="K", help="checkpoints kept (default 3)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (default auto: bf16/fp16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--workers", type=at_least(0), default=2, metavar="N", help="data loading processes (default 2)")
    return p


def build_config(args, num_classes: int):
    """The run's config: the saved one when resuming, else --config; then --set; num_classes
    from the data when neither set it."""
    from ..config import Config

    saved = Path(args.out) / "config.yaml"
    config = config_from_args(args, saved=saved if args.resume and saved.exists() else None)
    if config.num_classes != num_classes:
        if config.num_classes != Config().num_classes:
            raise MaskRCNNError(f"num_classes={config.num_classes} in the config, but the data has "
                                f"{num_classes} classes (background included)")
        config = config.replace(num_classes=num_classes)
    return config


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
    report = check_loaded(dataset)
    if report.problems:
        log.warning("data: %d error(s), %d warning(s), first: %s; `maskrcnn check-data` lists them all",
                    len(report.errors), len(report.warnings), report.problems[0])
    log.info("data: %s", report.training_summary())
    bad = set(report.bad_image_ids)
    usable = [i for i in range(len(dataset.image_info)) if i not in bad]
    if bad:
        log.warning("%d missing or unreadable image(s) left out of training", len(bad))
    if not usable:
        raise MaskRCNNError("annotations: none of the images can be read")
    train_ids, val_ids = split_indices(len(usable), args.val_split, args.seed)
    train_ids, val_ids = [usable[i] for i in train_ids], [usable[i] for i in val_ids]
    train = Subset(TorchDataset(dataset, build_transforms(train=True)), train_ids)
    val = Subset(TorchDataset(dataset), val_ids) if val_ids else None
    return train, val, list(dataset.class_names), list(dataset.category_ids)


def ap_evaluator(dataset, class_names: list[str], batch_size: int = 4):
    """``evaluate(model) -> {"mask_AP", "mask_AP50", "box_AP", "box_AP50"}`` on ``dataset``
    (items ``(image, target)``), with ``maskrcnn.evaluation``'s COCO evaluator."""
    def evaluate(model) -> dict:
        from ..evaluation.coco_eval import evaluate_detections

        targets, detections = [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            detections += model.detect([image for image, _ in items])
            targets += [target for _, target in items]
        m = evaluate_detections(targets, detections, class_names)
        return {"mask_AP": m["segm"]["AP"], "mask_AP50": m["segm"]["AP50"],
                "box_AP": m["bbox"]["AP"], "box_AP50": m["bbox"]["AP50"]}
    return evaluate


def run(args) -> int:
    from ..data.images import IntensityScaling
    from ..engine.checkpoint import load_pretrained
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.trainer import Trainer
    from ..model.maskrcnn import MaskRCNN

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, val, class_names, category_ids = training_data(args)
    config = build_config(args, len(class_names))
    scaling = IntensityScaling.from_config(config)
    for part in (train, val):  # Subset -> TorchDataset -> Dataset: 16-bit images by the config's rule
        dataset = getattr(getattr(part, "dataset", None), "dataset", None)
        if dataset is not None:
            dataset.intensity_scaling = scaling
    info = init_distributed(args.device)
    try:
        out = Path(args.out)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config.save(out / "config.yaml")
        model = MaskRCNN(config, class_names, category_ids)
        if args.weights and not args.resume:
            load_pretrained(model, args.weights)
        layers = args.layers or ("heads" if args.weights else "all")
        trainer = Trainer(model, train, out, config, layers=layers,
                          evaluate=ap_evaluator(val, class_names) if val is not None else None,
                          eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                          keep=args.keep, seed=args.seed, num_workers=args.workers, info=info, amp=args.amp)
        result = trainer.fit(args.steps, resume=args.resume)
        if info.is_main:
            model.save(out / "model")
            losses = ", ".join(f"{k} {v:.3f}" for k, v in result["losses"].items())
            val_text = "".join(f", {k} {v:.3f}" for k, v in result.items()
                               if k.startswith("val/") and v is not None)
            print(f"trained {result['step']} steps in {result['seconds'] / 60:.1f} min "
                  f"({result['it_per_s']:.2f} it/s): {losses}{val_text}")
            print(f"model: {out / 'model'}  logs: {out / 'metrics.jsonl'}, {out / 'tb'}")
    finally:
        cleanup()
    return 0
