"""COCO-style evaluation of detections (bbox and segm) with pycocotools, plus Matterport's VOC mAP.

    evaluator = CocoEvaluator(dataset.class_names)
    for (image, target), dets in zip(torch_dataset, detections):
        evaluator.add(target, dets)          # masks are RLE-encoded at once: memory stays small
    metrics = evaluator.compute()

or in one call, ``evaluate_detections(dataset_or_targets, detections)``.

Two sources of ground truth:

* the targets given to :meth:`CocoEvaluator.add` (rasterised masks; each ``area`` is a pixel
  count): for labelme / VIA data and validation during training;
* the original COCO annotation file (:func:`coco_ground_truth`): its own ``area``, ``iscrowd``,
  image and category ids, so that every number equals pycocotools' ``COCOeval`` run on that
  file and the results records (:func:`coco_metrics` does exactly what a pycocotools user does:
  ``loadRes`` the records once, ``COCOeval`` per iou type, ``summarize``).  The records hold
  both ``bbox`` and ``segmentation``, as Matterport's ``build_coco_results`` writes them, so
  ``loadRes`` reads them as box results and small/medium/large of ``segm`` go by the box area
  (Detectron2 drops ``bbox`` to use the mask area instead; we keep pycocotools' plain reading).

The metrics are a JSON-ready dict::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl",       # COCOeval stats[0:6]
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"},    # stats[6:12]
     "segm": {...same...},
     "per_class": {name: {"bbox": AP, "segm": AP, "instances": n}},   # AP over IoU .50:.95
     "voc_mAP50": float,      # mean over images of Matterport's per-image mask AP at IoU 0.5
     "num_images": int, "num_detections": int,
     "pr_curve": {"iou": 0.5, "recall": [101 values], "bbox": [...], "segm": [...]}}

Undefined values (no ground truth in a class or size range) are None.  Ground truth targets are
torchvision-style (``TorchDataset`` items): ``boxes`` [N, (x1, y1, x2, y2)] pixels with x2/y2
exclusive, ``labels`` [N] internal class ids, ``masks`` [N, H, W] bool and ``iscrowd`` [N];
crowd regions are COCO's ``iscrowd`` (detections on them are neither rewarded nor punished) and
are left out of the VOC mAP.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import DataError
from ..structures import Detections, encode_rle
from .voc import compute_ap

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
#: Names of COCOeval's 12 summary stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(fn, *args):
    """Call ``fn(*args)`` with pycocotools' progress prints captured."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _undefined_to_none(value: float):
    return None if value < 0 or np.isnan(value) else float(value)


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO object over an already parsed annotation dict."""
    coco = COCO()
    coco.dataset = data
    _quiet(coco.createIndex)
    return coco


def _load_results(coco_gt: COCO, records: list[dict]) -> COCO:
    if records:
        return _quiet(coco_gt.loadRes, [dict(r) for r in records])
    empty = COCO()  # loadRes cannot take an empty list
    empty.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                     "annotations": []}
    _quiet(empty.createIndex)
    return empty


def coco_metrics(coco_gt: COCO, records: list[dict], image_ids=None) -> dict:
    """COCOeval of result ``records`` against ``coco_gt`` for bbox and segm (segm only when
    every record has a ``segmentation``), on ``image_ids`` (default: every image of the
    ground truth).  Returns the module doc's dict without ``voc_mAP50``."""
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    cat_ids = sorted(coco_gt.getCatIds())
    names = unique_names(["BG"] + [str(coco_gt.cats[c]["name"]) for c in cat_ids])[1:]
    iou_types = IOU_TYPES if all("segmentation" in r for r in records) else ("bbox",)
    results = _load_results(coco_gt, records)
    per_class = {name: {"instances": 0} for name in names}
    index = dict(zip(cat_ids, names))
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if ann["category_id"] in index:
                per_class[index[ann["category_id"]]]["instances"] += 1
    scored = set(image_ids)
    metrics = {"num_images": len(image_ids), "num_detections": sum(r["image_id"] in scored for r in records)}
    pr_curve = {"iou": 0.5, "recall": np.linspace(0.0, 1.0, 101).tolist()}
    for iou_type in IOU_TYPES:
        if iou_type not in iou_types:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES)
            pr_curve[iou_type] = [None] * 101
            for name in names:
                per_class[name][iou_type] = None
            continue
        cocoeval = COCOeval(coco_gt, results, iou_type)
        cocoeval.params.imgIds = image_ids
        for step in (cocoeval.evaluate, cocoeval.accumulate, cocoeval.summarize):
            _quiet(step)
        metrics[iou_type] = {n: _undefined_to_none(v) for n, v in zip(STAT_NAMES, cocoeval.stats)}
        precision = cocoeval.eval["precision"]  # [iou T, recall R, class K, area A, maxDets M]
        for k, name in enumerate(names):
            per_class[name][iou_type] = _mean_defined(precision[:, :, k, 0, -1])
        pr_curve[iou_type] = [_mean_defined(precision[0, r, :, 0, -1]) for r in range(precision.shape[1])]
    metrics["per_class"] = per_class
    metrics["pr_curve"] = pr_curve
    return metrics


def _finite_numbers(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return False


def coco_ground_truth(annotation_file, dataset=None) -> COCO:
    """The original COCO annotation file as pycocotools ground truth.

    Only what pycocotools cannot do without is filled in: an image's ``height`` / ``width``
    (from ``dataset``, which read it from the image), an annotation's ``iscrowd`` (0),
    ``segmentation`` (its bbox as a rectangle), ``area`` (its segmentation's pixel count) and
    ``bbox`` (the mask's box).  Annotations whose segmentation pycocotools cannot rasterise
    (wrong form or size, non-finite numbers) are left out with one warning; ``maskrcnn
    check-data`` names them.  A file where nothing needs filling is used exactly as it is.
    """
    from ..data.coco import annotation_segmentation, validate_coco
    from ..data.records import read_json
    from ..data.segmentation import form_problem, is_rle

    data = read_json(annotation_file)
    validate_coco(data, annotation_file)
    images = {}
    for entry in data["images"]:
        if ("height" not in entry or "width" not in entry) and dataset is not None:
            index = dataset.image_from_source_map.get(f"coco.{entry['id']}")
            if index is not None:
                try:
                    entry["height"], entry["width"] = dataset.image_shape(index)
                except DataError:
                    pass
        images.setdefault(entry["id"], entry)
    kept, dropped = [], 0
    for ann in data.get("annotations", []):
        image = images.get(ann["image_id"])
        segmentation = annotation_segmentation(ann)
        usable = (image is not None and "height" in image and "width" in image
                  and form_problem(segmentation, image["height"], image["width"]) is None
                  and (is_rle(segmentation) or _finite_numbers(segmentation)))
        if not usable:
            dropped += 1
            continue
        ann.setdefault("iscrowd", 0)
        ann["segmentation"] = segmentation
        if "area" not in ann or "bbox" not in ann:
            rle = _annotation_rle(segmentation, image["height"], image["width"])
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
        kept.append(ann)
    if dropped:
        log.warning("%s: %d annotation(s) left out of the ground truth (no usable segmentation or image); "
                    "`maskrcnn check-data` lists them", annotation_file, dropped)
    data["annotations"] = kept
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return coco_from_dict(data)


def _annotation_rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def read_results(path, coco_gt: COCO | None = None) -> list[dict]:
    """COCO result records from a JSON file (as ``detect`` and ``evaluate`` write them, or any
    tool): a list of objects with ``image_id``, ``category_id``, ``score`` and ``bbox`` and / or
    ``segmentation`` (compressed RLE).  DataError naming the file and the first bad record;
    with ``coco_gt``, also for an image id the annotations do not have."""
    from ..data.records import read_json

    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: COCO results must be a JSON list of records")
    known = set(coco_gt.getImgIds()) if coco_gt is not None else None
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is not an object")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise DataError(f"{path}: record {i} has no {key!r}")
        if not _finite_numbers(r["score"]):
            raise DataError(f"{path}: record {i}: score {r['score']!r} is not a number")
        if "bbox" in r and not (isinstance(r["bbox"], list) and len(r["bbox"]) == 4 and _finite_numbers(r["bbox"])):
            raise DataError(f"{path}: record {i}: bbox must be 4 numbers [x, y, width, height]")
        if "segmentation" in r and not (isinstance(r["segmentation"], dict) and isinstance(
                r["segmentation"].get("counts"), str) and isinstance(r["segmentation"].get("size"), list)):
            raise DataError(f"{path}: record {i}: segmentation must be a compressed RLE {{size, counts}}")
        if "bbox" not in r and "segmentation" not in r:
            raise DataError(f"{path}: record {i} has neither 'bbox' nor 'segmentation'")
        if known is not None and r["image_id"] not in known:
            raise DataError(f"{path}: record {i}: image_id {r['image_id']!r} is not in the annotations")
    return records


def detections_from_records(records: list[dict], height: int, width: int, label_of: dict) -> Detections:
    """One image's result records as :class:`Detections` (for the VOC mAP), sorted by score.
    ``label_of`` maps category id -> internal class id; records of other categories are left
    out.  A record without ``segmentation`` gets its box as the mask."""
    records = sorted((r for r in records if r["category_id"] in label_of), key=lambda r: -r["score"])
    if not records:
        return Detections.empty(height, width)
    boxes, masks = [], []
    for r in records:
        if "segmentation" in r:
            mask = torch.from_numpy(mask_utils.decode(r["segmentation"]).astype(bool))
            box = r.get("bbox") or mask_utils.toBbox(r["segmentation"]).tolist()
        else:
            box = r["bbox"]
            mask = torch.zeros(height, width, dtype=torch.bool)
            x, y, w, h = (int(round(v)) for v in box)
            mask[max(y, 0):y + h, max(x, 0):x + w] = True
        boxes.append([box[0], box[1], box[0] + box[2], box[1] + box[3]])
        masks.append(mask)
    return Detections(torch.tensor(boxes, dtype=torch.float32),
                      torch.tensor([label_of[r["category_id"]] for r in records], dtype=torch.int64),
                      torch.tensor([r["score"] for r in records], dtype=torch.float32), torch.stack(masks))


class CocoEvaluator:
    """Accumulates ground truth and detections one image at a time; :meth:`compute` runs
    COCOeval for bbox and segm and averages Matterport's per-image VOC AP.

    class_names:  index = internal class id, entry 0 the background (``dataset.class_names``).
    category_ids: the category id written for each internal class id (``dataset.category_ids``;
                  default the class id itself).
    ground_truth: the original annotations (:func:`coco_ground_truth`) to score against;
                  default: built from the targets given to :meth:`add`.
    """

    def __init__(self, class_names: list[str], category_ids: list | None = None, ground_truth: COCO | None = None):
        self.class_names = unique_names(class_names)
        self.category_ids = list(category_ids) if category_ids is not None else list(range(len(class_names)))
        self.ground_truth = ground_truth
        self.images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.records: list[dict] = []
        self.voc_aps: list[float] = []

    def add(self, target: dict, detections: Detections, image_id=None, records: list[dict] | None = None) -> None:
        """Add one image: ``target`` its ground truth (see the module doc), ``detections`` the
        model's output for it (same H x W, same class ids as the target).  ``image_id``: the
        image's id in the ground truth (default: 1, 2, ... in order of adding).  ``records``:
        the result records to score for it, when they exist already (default:
        ``detections.to_coco``)."""
        gt_masks = torch.as_tensor(target["masks"]).bool()
        height, width = gt_masks.shape[-2:]
        if len(detections) and tuple(detections.masks.shape[-2:]) != (height, width):
            raise ValueError(f"detections are {tuple(detections.masks.shape[-2:])} but the ground truth "
                             f"is {(height, width)} (height, width)")
        image_id = len(self.images) + 1 if image_id is None else image_id
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        labels = torch.as_tensor(target["labels"]).to(torch.int64)
        iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(labels), dtype=torch.bool))).bool()
        if self.ground_truth is None:
            self._add_ground_truth(image_id, torch.as_tensor(target["boxes"]), labels, gt_masks, iscrowd)
        self.records += detections.to_coco(image_id, self.category_ids) if records is None else records
        ap = compute_ap(labels[~iscrowd].numpy(), gt_masks[~iscrowd].numpy(), detections.labels.numpy(),
                        detections.scores.numpy(), detections.masks.numpy())[0]
        if not np.isnan(ap):
            self.voc_aps.append(ap)

    def state(self) -> tuple:
        """What :meth:`add` has gathered (images, ground truth and result records as RLE, per-image
        VOC APs): small, picklable, for :meth:`extend` on another process's evaluator."""
        return self.images, self.gt_annotations, self.records, self.voc_aps

    def extend(self, state: tuple) -> None:
        """Add another evaluator's :meth:`state` (its images' ids must differ from these)."""
        images, annotations, records, voc_aps = state
        self.images += images
        for ann in annotations:
            self.gt_annotations.append(dict(ann, id=len(self.gt_annotations) + 1))
        self.records += records
        self.voc_aps += voc_aps

    def _add_ground_truth(self, image_id, boxes, labels, masks, iscrowd) -> None:
        areas = masks.flatten(1).sum(dim=1).tolist()
        b = boxes.to(torch.float64)
        xywh = torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()
        for box, label, rle, area, crowd in zip(xywh, labels.tolist(), encode_rle(masks), areas, iscrowd.tolist()):
            self.gt_annotations.append({"id": len(self.gt_annotations) + 1, "image_id": image_id,
                                        "category_id": self.category_ids[label], "bbox": box, "segmentation": rle,
                                        "area": float(area), "iscrowd": int(crowd)})

    def _built_ground_truth(self) -> COCO:
        # "info" and "licenses" are unused, but some pycocotools versions' loadRes copy them.
        return coco_from_dict({
            "info": {}, "licenses": [], "images": self.images, "annotations": self.gt_annotations,
            "categories": [{"id": self.category_ids[i], "name": n} for i, n in enumerate(self.class_names) if i > 0]})

    def compute(self) -> dict:
        """The metrics dict described in the module doc."""
        coco_gt = self.ground_truth if self.ground_truth is not None else self._built_ground_truth()
        metrics = coco_metrics(coco_gt, self.records, [im["id"] for im in self.images])
        metrics["voc_mAP50"] = float(np.mean(self.voc_aps)) if self.voc_aps else None
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
