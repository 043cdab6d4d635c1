"""Matterport-style VOC average precision (``mrcnn/utils.py``: compute_matches, compute_ap),
reimplemented on masks ``[N, H, W]`` (our layout) instead of Matterport's ``[H, W, N]``.

Per image: predictions are sorted by score and greedily matched to the unmatched ground-truth
instance of the same class with the highest mask IoU >= ``iou_threshold``; AP is the area under
the interpolated precision-recall curve (VOC 2010+, every recall step).  Matterport reports the
mean of the per-image APs at IoU 0.5 as "mAP".
"""
from __future__ import annotations

import numpy as np


def compute_overlaps_masks(masks1: np.ndarray, masks2: np.ndarray) -> np.ndarray:
    """IoU of every pair of masks.  masks1: [N, H, W] bool, masks2: [M, H, W] bool -> [N, M]."""
    if len(masks1) == 0 or len(masks2) == 0:
        return np.zeros((len(masks1), len(masks2)), dtype=np.float64)
    m1 = masks1.reshape(len(masks1), -1).astype(np.float32)
    m2 = masks2.reshape(len(masks2), -1).astype(np.float32)
    area1 = m1.sum(axis=1)
    area2 = m2.sum(axis=1)
    intersections = (m1 @ m2.T).astype(np.float64)
    union = area1[:, None] + area2[None, :] - intersections
    return np.divide(intersections, union, out=np.zeros_like(intersections), where=union > 0)


def compute_matches(gt_class_ids: np.ndarray, gt_masks: np.ndarray, pred_class_ids: np.ndarray,
                    pred_scores: np.ndarray, pred_masks: np.ndarray, iou_threshold: float = 0.5,
                    score_threshold: float = 0.0):
    """Match predictions to ground truth in one image (Matterport's ``compute_matches``).

    gt_class_ids: [G] int; gt_masks: [G, H, W] bool.
    pred_class_ids: [P] int; pred_scores: [P] float; pred_masks: [P, H, W] bool.
    score_threshold: candidate pairs with IoU below it are not considered (Matterport's name).
    Returns gt_match [G] (index of the matched prediction in score order, or -1), pred_match [P]
    (index of the matched ground truth, or -1; predictions in descending score order) and the
    IoU matrix [P, G] (rows in descending score order).
    """
    order = np.argsort(-np.asarray(pred_scores), kind="stable")
    pred_class_ids = np.asarray(pred_class_ids)[order]
    overlaps = compute_overlaps_masks(np.asarray(pred_masks)[order], np.asarray(gt_masks))
    gt_match = -np.ones(len(gt_class_ids), dtype=np.int64)
    pred_match = -np.ones(len(pred_class_ids), dtype=np.int64)
    for i in range(len(pred_class_ids)):
        candidates = np.argsort(-overlaps[i], kind="stable")
        candidates = candidates[overlaps[i, candidates] >= score_threshold]
        for j in candidates:
            if gt_match[j] > -1:
                continue
            if overlaps[i, j] < iou_threshold:
                break
            if pred_class_ids[i] == gt_class_ids[j]:
                gt_match[j] = i
                pred_match[i] = j
                break
    return gt_match, pred_match, overlaps


def average_precision(pred_match: np.ndarray, num_gt: int):
    """Interpolated AP from matches in descending score order.

    Returns (ap, precisions, recalls) with the end points (0, 0) / (1, 0) added as Matterport
    does.  With no ground truth AP is undefined: NaN if there are no predictions either, else 0.
    """
    hits = np.cumsum(np.asarray(pred_match) > -1)
    if num_gt == 0:
        ap = float("nan") if len(pred_match) == 0 else 0.0
        return ap, np.array([0.0, 0.0]), np.array([0.0, 1.0])
    precisions = hits / (np.arange(len(pred_match)) + 1)
    recalls = hits.astype(np.float64) / num_gt
    precisions = np.concatenate([[0.0], precisions, [0.0]])
    recalls = np.concatenate([[0.0], recalls, [1.0]])
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]
    steps = np.flatnonzero(recalls[:-1] != recalls[1:]) + 1
    ap = float(np.sum((recalls[steps] - recalls[steps - 1]) * precisions[steps]))
    return ap, precisions, recalls


def compute_ap(gt_class_ids, gt_masks, pred_class_ids, pred_scores, pred_masks, iou_threshold: float = 0.5):
    """Matterport's ``compute_ap`` for one image: (mAP, precisions, recalls, overlaps).
    Arguments as :func:`compute_matches`."""
    gt_match, pred_match, overlaps = compute_matches(gt_class_ids, gt_masks, pred_class_ids, pred_scores,
                                                     pred_masks, iou_threshold)
    ap, precisions, recalls = average_precision(pred_match, len(gt_match))
    return ap, precisions, recalls, overlaps
