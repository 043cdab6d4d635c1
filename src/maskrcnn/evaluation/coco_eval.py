"""COCO-style evaluation of detections (bbox and segm) with pycocotools, plus Matterport's VOC mAP.

    evaluator = CocoEvaluator(dataset.class_names)
    for (image, target), dets in zip(torch_dataset, detections):
        evaluator.add(target, dets)          # masks are RLE-encoded at once: memory stays small
    metrics = evaluator.compute()

or in one call, ``evaluate_detections(dataset_or_targets, detections)``.

The metrics are a JSON-ready dict::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"},     # COCOeval stats[0:6], maxDets 100
     "segm": {...same...},
     "per_class": {name: {"bbox": AP, "segm": AP, "instances": n}},   # AP over IoU .50:.95
     "voc_mAP50": float,      # mean over images of Matterport's per-image mask AP at IoU 0.5
     "num_images": int, "num_detections": int,
     "pr_curve": {"iou": 0.5, "recall": [101 values], "bbox": [...], "segm": [...]}}

Undefined values (no ground truth in a class or size range) are None.  Ground truth is given as
torchvision-style targets (``TorchDataset`` items): ``boxes`` [N, (x1, y1, x2, y2)] pixels with
x2/y2 exclusive, ``labels`` [N] internal class ids, ``masks`` [N, H, W] bool and ``iscrowd`` [N];
crowd regions are COCO's ``iscrowd`` (detections on them are neither rewarded nor punished) and
are left out of the VOC mAP.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..structures import Detections
from .voc import compute_ap

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """COCO compressed RLEs (counts as str) of masks [N, H, W] bool."""
    if len(masks) == 0:
        return []
    array = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    """[N, (x1, y1, x2, y2)] pixel corners (x2/y2 exclusive) -> COCO [x, y, width, height]."""
    b = boxes.to(torch.float64)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def _quiet(fn, *args):
    """Call ``fn(*args)`` with pycocotools' progress prints captured."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _undefined_to_none(value: float):
    return None if value < 0 or np.isnan(value) else float(value)


class CocoEvaluator:
    """Accumulates ground truth and detections one image at a time; :meth:`compute` runs
    COCOeval for bbox and segm and averages Matterport's per-image VOC AP.

    class_names: index = internal class id, entry 0 the background (``dataset.class_names``).
    """

    def __init__(self, class_names: list[str]):
        self.class_names = unique_names(class_names)
        self.images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.results: dict[str, list[dict]] = {t: [] for t in IOU_TYPES}
        self.voc_aps: list[float] = []

    def add(self, target: dict, detections: Detections) -> None:
        """Add one image: ``target`` its ground truth (see the module doc), ``detections`` the
        model's output for it (same H x W)."""
        gt_masks = torch.as_tensor(target["masks"]).bool()
        height, width = gt_masks.shape[-2:]
        if len(detections) and tuple(detections.masks.shape[-2:]) != (height, width):
            raise ValueError(f"detections are {tuple(detections.masks.shape[-2:])} but the ground truth "
                             f"is {(height, width)} (height, width)")
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        labels = torch.as_tensor(target["labels"]).to(torch.int64)
        iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(labels), dtype=torch.bool))).bool()
        self._add_ground_truth(image_id, torch.as_tensor(target["boxes"]), labels, gt_masks, iscrowd)
        self._add_detections(image_id, detections)
        ap = compute_ap(labels[~iscrowd].numpy(), gt_masks[~iscrowd].numpy(), detections.labels.numpy(),
                        detections.scores.numpy(), detections.masks.numpy())[0]
        if not np.isnan(ap):
            self.voc_aps.append(ap)

    def _add_ground_truth(self, image_id, boxes, labels, masks, iscrowd) -> None:
        areas = masks.flatten(1).sum(dim=1).tolist()
        for box, label, rle, area, crowd in zip(xyxy_to_xywh(boxes), labels.tolist(), encode_masks(masks),
                                                areas, iscrowd.tolist()):
            self.gt_annotations.append({"id": len(self.gt_annotations) + 1, "image_id": image_id,
                                        "category_id": label, "bbox": box, "segmentation": rle,
                                        "area": float(area), "iscrowd": int(crowd)})

    def _add_detections(self, image_id, detections: Detections) -> None:
        scores = detections.scores.tolist()
        labels = detections.labels.tolist()
        for box, label, score in zip(xyxy_to_xywh(detections.boxes), labels, scores):
            self.results["bbox"].append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
        for rle, label, score in zip(encode_masks(detections.masks), labels, scores):
            self.results["segm"].append({"image_id": image_id, "category_id": label,
                                         "segmentation": rle, "score": score})

    def _ground_truth(self) -> COCO:
        coco = COCO()
        # "info" and "licenses" are unused, but pycocotools 2.0.10's loadRes copies them.
        coco.dataset = {"info": {}, "licenses": [], "images": self.images, "annotations": self.gt_annotations,
                        "categories": [{"id": i, "name": n} for i, n in enumerate(self.class_names) if i > 0]}
        _quiet(coco.createIndex)
        return coco

    @staticmethod
    def _load_results(coco_gt: COCO, records: list[dict]) -> COCO:
        if records:
            return _quiet(coco_gt.loadRes, [dict(r) for r in records])
        empty = COCO()  # loadRes cannot take an empty list
        empty.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                         "annotations": []}
        _quiet(empty.createIndex)
        return empty

    def compute(self) -> dict:
        """The metrics dict described in the module doc."""
        coco_gt = self._ground_truth()
        metrics = {"num_images": len(self.images), "num_detections": len(self.results["bbox"])}
        per_class = {name: {"instances": 0} for name in self.class_names[1:]}
        for ann in self.gt_annotations:
            per_class[self.class_names[ann["category_id"]]]["instances"] += 1
        pr_curve = {"iou": 0.5, "recall": np.linspace(0.0, 1.0, 101).tolist()}
        for iou_type in IOU_TYPES:
            cocoeval = COCOeval(coco_gt, self._load_results(coco_gt, self.results[iou_type]), iou_type)
            for step in (cocoeval.evaluate, cocoeval.accumulate, cocoeval.summarize):
                _quiet(step)
            metrics[iou_type] = {n: _undefined_to_none(v) for n, v in zip(STAT_NAMES, cocoeval.stats[:6])}
            precision = cocoeval.eval["precision"]  # [iou T, recall R, class K, area A, maxDets M]
            for k, name in enumerate(self.class_names[1:]):
                per_class[name][iou_type] = _mean_defined(precision[:, :, k, 0, -1])
            pr_curve[iou_type] = [_mean_defined(precision[0, r, :, 0, -1]) for r in range(precision.shape[1])]
        metrics["per_class"] = per_class
        metrics["voc_mAP50"] = float(np.mean(self.voc_aps)) if self.voc_aps else None
        metrics["pr_curve"] = pr_curve
        return metrics


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats told apart by their class id ("car (3)"), so that per-class
    results keyed by name keep every class."""
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({i})" if counts[name] > 1 else str(name) for i, name in enumerate(names)]


def _mean_defined(values: np.ndarray):
    """Mean of the entries COCOeval defines (>= 0), None if there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def evaluate_detections(gt, predictions: list[Detections], class_names: list[str] | None = None) -> dict:
    """Evaluate ``predictions`` (one Detections per image, in order) against ``gt``: a prepared
    :class:`~maskrcnn.data.dataset.Dataset` (its images in order) or a list of targets as
    described in the module doc.  ``class_names`` defaults to the dataset's, or to
    "class <id>" up to the largest label seen.  Returns the metrics dict of the module doc."""
    targets = _targets(gt)
    if class_names is None:
        class_names = getattr(gt, "class_names", None) or _default_class_names(gt, predictions)
    evaluator = CocoEvaluator(class_names)
    count = 0
    for target, dets in zip(targets, predictions):
        evaluator.add(target, dets)
        count += 1
    expected = len(gt.image_info) if hasattr(gt, "image_info") else len(gt)
    if count != expected or len(predictions) != expected:
        raise ValueError(f"{len(predictions)} predictions for {expected} ground-truth images")
    return evaluator.compute()


def _targets(gt):
    if hasattr(gt, "load_mask"):
        from ..data.dataset import instances_target
        return (instances_target(*gt.load_mask(i), i) for i in range(len(gt.image_info)))
    return iter(gt)


def _default_class_names(targets: list[dict], predictions: list[Detections]) -> list[str]:
    labels = [int(t["labels"].max()) for t in targets if len(t["labels"])]
    labels += [int(d.labels.max()) for d in predictions if len(d)]
    return ["BG"] + [f"class {i}" for i in range(1, max(labels, default=0) + 1)]
