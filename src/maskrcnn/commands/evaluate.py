"""``maskrcnn evaluate``: COCO AP (bbox and segm), per-class AP and VOC mAP of a model on a dataset."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MaskRCNNError
from .common import add_annotation_arguments, add_model_arguments, batches, load_model, open_annotations, progress

EPILOG = """examples:
  maskrcnn evaluate --weights run1/model --coco val.json --images val/
  maskrcnn evaluate --weights run1/model --coco val.json --images val/ --out run1/metrics.json
  maskrcnn evaluate --weights run1/model --via val/via_region_data.json --images val/ --set detection_min_confidence=0.5

With --out metrics.json it also writes metrics_pr.png (precision-recall at IoU 0.5) and
metrics_results.json (the predictions as COCO results, in the dataset's image and category ids).
Undefined values (no ground truth of a class or size) show as "-" and are null in the JSON."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="COCO AP, per-class AP and VOC mAP of a model on annotated images",
        description="Run a trained model over an annotated dataset and report COCO AP, AP50, AP75,\n"
                    "APs/m/l for boxes and masks (pycocotools), AP per class and Matterport's VOC mAP@0.5.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_annotation_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--out", metavar="JSON", help="write the metrics here, with the PR plot and results beside")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images")
    return parser


def side_paths(out: Path) -> tuple[Path, Path]:
    """Where the PR plot and the COCO results go next to ``out``."""
    return out.with_name(f"{out.stem}_pr.png"), out.with_name(f"{out.stem}_results.json")


def run(args) -> int:
    from ..data.dataset import instances_target
    from ..evaluation import CocoEvaluator
    from ..utils import atomic_write_bytes
    from ..visualize import plot_precision_recall, save_png

    dataset = open_annotations(args)
    model = load_model(args)
    if model.config.num_classes != dataset.num_classes:
        raise MaskRCNNError(f"{args.weights}: the model has {model.config.num_classes} classes (background "
                            f"included) but the dataset has {dataset.num_classes}: {', '.join(dataset.class_names)}")
    count = len(dataset.image_info) if args.limit is None else min(args.limit, len(dataset.image_info))
    evaluator = CocoEvaluator(dataset.class_names)
    records = []
    for ids in batches(progress(range(count), count, "evaluate"), max(1, args.batch_size)):
        images = [dataset.load_image(i) for i in ids]
        for i, image, det in zip(ids, images, model.detect(images)):
            evaluator.add(instances_target(*dataset.load_mask(i), i), det)
            source_id = dataset.image_info[i]["id"]
            records += det.to_coco(source_id if isinstance(source_id, int) else i, dataset.category_ids)
    metrics = evaluator.compute()
    print(format_metrics(metrics))
    if args.out:
        out = Path(args.out)
        plot_path, results_path = side_paths(out)
        curves = {t: metrics["pr_curve"][t] for t in ("bbox", "segm")}
        save_png(plot_precision_recall(metrics["pr_curve"]["recall"], curves, "precision-recall, IoU 0.5"), plot_path)
        atomic_write_bytes(results_path, json.dumps(records).encode())
        atomic_write_bytes(out, json.dumps(metrics, indent=1).encode())
        print(f"wrote {out}, {plot_path}, {results_path}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_metrics(metrics: dict) -> str:
    """The metrics as text tables: COCO summary for bbox and segm, VOC mAP, AP per class."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = [f"{'':6}" + "".join(f"{n:>8}" for n in names)]
    for iou_type in ("bbox", "segm"):
        lines.append(f"{iou_type:6}" + "".join(f"{_fmt(metrics[iou_type][n]):>8}" for n in names))
    lines.append(f"VOC mAP@0.5 (Matterport, masks): {_fmt(metrics['voc_mAP50'])}")
    lines.append(f"{metrics['num_images']} images, {metrics['num_detections']} detections")
    width = max([len("class")] + [len(n) for n in metrics["per_class"]])
    lines.append(f"{'class':{width}}  instances  bbox AP  segm AP")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:{width}}  {row['instances']:>9}  {_fmt(row['bbox']):>7}  {_fmt(row['segm']):>7}")
    return "\n".join(lines)
