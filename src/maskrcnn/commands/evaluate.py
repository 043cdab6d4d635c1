"""``maskrcnn evaluate``: COCO AP and AR (bbox and segm), per-class AP and VOC mAP of a model, or
of an existing results file, on an annotated dataset."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import DataError, MaskRCNNError
from ..utils import batches, read_ahead
from .common import (add_annotation_arguments, add_model_arguments, at_least, load_model, open_annotations,
                     output_path, progress, runtime_name)

log = logging.getLogger("maskrcnn")

EPILOG = """examples:
  maskrcnn evaluate --weights run1/model --coco val.json --images val/
  maskrcnn evaluate --weights run1/model --coco val.json --images val/ --out run1/metrics.json
  maskrcnn evaluate --coco val.json --images val/ --results detections/results.json
  maskrcnn evaluate --weights run1/model --via val/via_region_data.json --images val/ --set detection_min_confidence=0.5

With --coco the ground truth is the annotation file itself (its area, iscrowd, image and
category ids): every AP and AR printed equals pycocotools' COCOeval run on that file and the
results file written here (loadRes once, then COCOeval for "bbox" and for "segm").
With --out metrics.json it also writes metrics_pr.png (precision-recall at IoU 0.5) and
metrics_results.json (the predictions as COCO results, in the dataset's image and category ids).
An image that cannot be read is skipped with a warning and left out of the scores; the run
then exits with status 1.  Undefined values (no ground truth of a class or size) show as "-"
and are null in the JSON."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="COCO AP/AR, per-class AP and VOC mAP of a model or a results file on annotated images",
        description="Run a trained model over an annotated dataset (or read a COCO results file) and report\n"
                    "COCO AP, AP50, AP75, APs/m/l and AR1/10/100, ARs/m/l for boxes and masks (pycocotools),\n"
                    "AP per class and Matterport's VOC mAP@0.5.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_annotation_arguments(parser)
    add_model_arguments(parser, weights_required=False)
    parser.add_argument("--results", metavar="JSON",
                        help="score this COCO results file (from detect, or any tool) instead of running a model")
    parser.add_argument("--out", type=output_path("--out", folder=False), metavar="JSON",
                        help="write the metrics here, with the PR plot and results beside")
    parser.add_argument("--limit", type=at_least(1), metavar="N", help="evaluate only the first N images")
    return parser


def side_paths(out: Path) -> tuple[Path, Path]:
    """Where the PR plot and the COCO results go next to ``out``."""
    return out.with_name(f"{out.stem}_pr.png"), out.with_name(f"{out.stem}_results.json")


def image_id(dataset, index: int, from_coco: bool):
    """The id results use for image ``index``: the annotation file's id for COCO, else the
    source's id when it is an integer, else the index."""
    source_id = dataset.image_info[index]["id"]
    return source_id if from_coco or isinstance(source_id, int) else index


def dataset_labels(model, dataset, weights) -> list:
    """Model class id (index) -> the dataset's class id, or None where the dataset has no such
    category.  A model that knows its category ids (trained on a COCO file, converted from
    torchvision's COCO weights) is matched by id; one that does not must have the dataset's
    class count and is matched by position."""
    model_ids = getattr(model, "category_ids", None)
    if model_ids is None:
        if model.config.num_classes != dataset.num_classes:
            raise MaskRCNNError(f"{weights}: the model has {model.config.num_classes} classes (background "
                                f"included) but the dataset has {dataset.num_classes}: {', '.join(dataset.class_names)}")
        return list(range(dataset.num_classes))
    by_category = {c: i for i, c in enumerate(dataset.category_ids) if i > 0}
    mapping = [None] + [by_category.get(c) for c in model_ids[1:]]
    if not any(m is not None for m in mapping):
        raise MaskRCNNError(f"{weights}: none of the model's category ids ({', '.join(map(str, model_ids[1:6]))}"
                            f"...) is a category of the dataset ({', '.join(map(str, dataset.category_ids[1:6]))}...)")
    unknown = [dataset.class_names[i] for i in range(1, dataset.num_classes) if i not in mapping]
    if unknown:
        log.warning("the model does not know %d of the dataset's categories (%s): they score 0",
                    len(unknown), ", ".join(unknown[:5]))
    names = getattr(model, "class_names", None) or []
    renamed = [(names[k], dataset.class_names[m]) for k, m in enumerate(mapping)
               if m is not None and k < len(names) and names[k] != dataset.class_names[m]]
    if renamed:
        log.warning("%d category id(s) have other names in the model than in the dataset, e.g. %r vs %r",
                    len(renamed), *renamed[0])
    return mapping


def relabel(detections, mapping: list):
    """``detections`` with class ids mapped through ``mapping``; instances mapped to None dropped."""
    import torch

    from ..structures import Detections

    labels = torch.tensor([-1 if mapping[k] is None else mapping[k] for k in detections.labels.tolist()],
                          dtype=torch.int64)
    keep = labels >= 0
    return Detections(detections.boxes[keep], labels[keep], detections.scores[keep], detections.masks[keep])


def _target(dataset, index: int) -> dict:
    from ..data.dataset import instances_target
    return instances_target(*dataset.load_mask(index), index)


def _skip(skipped: list, dataset, index: int, error: Exception) -> None:
    name = dataset.image_reference(index)
    log.warning("skipped %s: %s", name, error)
    skipped.append(name)


def score_model(args, dataset, evaluator, indices, from_coco: bool, skipped: list) -> None:
    """Run the model of ``--weights`` over ``indices`` and add each image to ``evaluator``."""
    from ..data.images import IntensityScaling

    model = load_model(args)
    log.info("running on %s", runtime_name(model))
    dataset.intensity_scaling = IntensityScaling.from_config(model.config)
    mapping = dataset_labels(model, dataset, args.weights)
    batch_size = max(1, args.batch_size)

    def load(i: int):
        try:
            return i, dataset.load_image(i), _target(dataset, i)
        except (DataError, OSError, ValueError) as e:
            _skip(skipped, dataset, i, e)
            return None

    # the next batch's images and masks are read while the model runs on this one
    items = read_ahead(map(load, indices), batch_size)
    for chunk in batches(progress(items, len(indices), "evaluate"), batch_size):
        loaded = [item for item in chunk if item is not None]
        if not loaded:
            continue
        for (i, _, target), det in zip(loaded, model.detect([image for _, image, _ in loaded])):
            evaluator.add(target, relabel(det, mapping), image_id(dataset, i, from_coco))


def score_results(path, dataset, evaluator, indices, from_coco: bool, skipped: list) -> None:
    """Add each image of ``indices`` to ``evaluator`` with its records from the results file."""
    from ..evaluation.coco_eval import detections_from_records, read_results

    records = read_results(path, evaluator.ground_truth)
    per_image = {}
    for record in records:
        per_image.setdefault(record["image_id"], []).append(record)
    label_of = {c: i for i, c in enumerate(dataset.category_ids) if i > 0}
    for i in progress(indices, len(indices), "evaluate"):
        try:
            target = _target(dataset, i)
        except (DataError, OSError, ValueError) as e:
            _skip(skipped, dataset, i, e)
            continue
        key = image_id(dataset, i, from_coco)
        mine = per_image.get(key, [])
        height, width = target["masks"].shape[-2:]
        evaluator.add(target, detections_from_records(mine, height, width, label_of), key, records=mine)


def run(args) -> int:
    from ..evaluation.coco_eval import CocoEvaluator, coco_ground_truth
    from ..utils import atomic_write_bytes
    from ..visualize import plot_precision_recall, save_png

    if (args.weights is None) == (args.results is None):
        raise MaskRCNNError("evaluate: give --weights MODEL to run a model, or --results JSON to score a "
                            "results file (one of them)")
    dataset = open_annotations(args)
    count = len(dataset.image_info) if args.limit is None else min(args.limit, len(dataset.image_info))
    indices = list(range(count))
    from_coco = args.coco is not None
    ground_truth = coco_ground_truth(args.coco, dataset) if from_coco else None
    evaluator = CocoEvaluator(dataset.class_names, dataset.category_ids, ground_truth)
    skipped: list[str] = []
    if args.results:
        score_results(args.results, dataset, evaluator, indices, from_coco, skipped)
    else:
        score_model(args, dataset, evaluator, indices, from_coco, skipped)
    if not evaluator.images:
        raise DataError("evaluate: none of the images could be read")
    metrics = evaluator.compute()
    print(format_metrics(metrics))
    if args.out:
        out = Path(args.out)
        plot_path, results_path = side_paths(out)
        curves = {t: metrics["pr_curve"][t] for t in ("bbox", "segm")}
        save_png(plot_precision_recall(metrics["pr_curve"]["recall"], curves, "precision-recall, IoU 0.5"), plot_path)
        atomic_write_bytes(results_path, json.dumps(evaluator.records).encode())
        atomic_write_bytes(out, json.dumps(metrics, indent=1).encode())
        print(f"wrote {out}, {plot_path}, {results_path}")
    if skipped:
        print(f"skipped {len(skipped)} of {count} images (not scored): {', '.join(skipped)}")
        return 1
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_metrics(metrics: dict) -> str:
    """The metrics as text tables: COCO AP and AR for bbox and segm, VOC mAP, AP per class."""
    from ..evaluation.coco_eval import STAT_NAMES

    lines = []
    for names in (STAT_NAMES[:6], STAT_NAMES[6:]):
        lines.append(f"{'':6}" + "".join(f"{n:>8}" for n in names))
        for iou_type in ("bbox", "segm"):
            lines.append(f"{iou_type:6}" + "".join(f"{_fmt(metrics[iou_type][n]):>8}" for n in names))
    lines.append(f"VOC mAP@0.5 (Matterport, masks): {_fmt(metrics['voc_mAP50'])}")
    lines.append(f"{metrics['num_images']} images, {metrics['num_detections']} detections")
    width = max([len("class")] + [len(n) for n in metrics["per_class"]])
    lines.append(f"{'class':{width}}  instances  bbox AP  segm AP")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:{width}}  {row['instances']:>9}  {_fmt(row['bbox']):>7}  {_fmt(row['segm']):>7}")
    return "\n".join(lines)
