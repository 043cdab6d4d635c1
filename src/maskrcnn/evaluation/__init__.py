"""Evaluation: COCO AP for boxes and masks (pycocotools), Matterport-style VOC mAP."""
from .coco_eval import CocoEvaluator, evaluate_detections
from .voc import compute_ap, compute_matches, compute_overlaps_masks

__all__ = ["CocoEvaluator", "evaluate_detections", "compute_ap", "compute_matches", "compute_overlaps_masks"]
