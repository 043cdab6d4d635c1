"""ProposalLayer: turn RPN outputs into a few hundred/thousand candidate boxes per image.

top-k anchors by foreground score -> apply the predicted deltas -> clip -> (drop tiny boxes)
-> non-maximum suppression -> keep at most ``proposal_count``.
"""
from __future__ import annotations

import torch
from torchvision.ops import nms, remove_small_boxes

from ..boxes import apply_box_deltas, batched_nms, clip_boxes


def descending_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, highest first; equal scores keep the lower index
    first (TF's ``top_k`` and ``non_max_suppression`` order).  scores: [A] -> [k] int64."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def nms_in_order(boxes: torch.Tensor, iou_threshold: float, max_output: int) -> torch.Tensor:
    """NMS over boxes already sorted by descending score; ties keep their given order.

    boxes: [K, (x1, y1, x2, y2)].  Returns indices into ``boxes``, in order, at most ``max_output``.
    """
    ranks = torch.arange(boxes.shape[0], 0, -1, device=boxes.device, dtype=boxes.dtype)
    return nms(boxes, ranks, iou_threshold)[:max_output]


def propose_global(scores, deltas, anchors, window, pre_nms_limit: int, proposal_count: int,
                   nms_threshold: float, std, clip_log_size=None, min_size: float = 0.0):
    """Matterport's ProposalLayer for one image: one top-k and one NMS over all levels.

    scores:  [A] foreground probability per anchor.
    deltas:  [A, (dx, dy, log dw, log dh)] as predicted (multiplied by ``std`` here).
    anchors: [A, (x1, y1, x2, y2)] in the model's box frame.
    window:  [(x1, y1, x2, y2)] the clip window in the same frame.
    Returns (boxes [P, 4], scores [P]), P <= proposal_count, in NMS (descending score) order.
    """
    order = descending_order(scores, min(pre_nms_limit, scores.shape[0]))
    boxes = apply_box_deltas(anchors[order], deltas[order], std, clip_log_size)
    boxes = clip_boxes(boxes, window)
    top_scores = scores[order]
    if min_size > 0:
        keep = remove_small_boxes(boxes, min_size)
        boxes, top_scores = boxes[keep], top_scores[keep]
    keep = nms_in_order(boxes, nms_threshold, proposal_count)
    return boxes[keep], top_scores[keep]


def propose_per_level(logits, deltas, anchors, window, level_sizes: list[int], pre_nms_limit: int,
                      proposal_count: int, nms_threshold: float, std, clip_log_size=None,
                      min_size: float = 0.0):
    """torchvision's RPN filter for one image: top-k per level, NMS within each level, then the
    best ``proposal_count`` over all levels.

    logits: [A] objectness logits (sigmoid head); deltas, anchors, window as in
    :func:`propose_global`; level_sizes: anchors per level, in anchor order.
    Returns (boxes [P, 4], scores [P] probabilities), sorted by descending score.
    """
    top_logits, top_deltas, top_anchors, levels = [], [], [], []
    per_level = zip(logits.split(level_sizes), deltas.split(level_sizes), anchors.split(level_sizes))
    for lvl, (level_logits, level_deltas, level_anchors) in enumerate(per_level):
        top = level_logits.topk(min(pre_nms_limit, level_logits.shape[0])).indices
        top_logits.append(level_logits[top])
        top_deltas.append(level_deltas[top])
        top_anchors.append(level_anchors[top])
        levels.append(torch.full_like(top, lvl))
    levels = torch.cat(levels)
    boxes = apply_box_deltas(torch.cat(top_anchors), torch.cat(top_deltas), std, clip_log_size)
    boxes = clip_boxes(boxes, window)
    probs = torch.sigmoid(torch.cat(top_logits))
    keep = remove_small_boxes(boxes, min_size) if min_size > 0 else slice(None)
    boxes, probs, levels = boxes[keep], probs[keep], levels[keep]
    keep = batched_nms(boxes, probs, levels, nms_threshold)[:proposal_count]
    return boxes[keep], probs[keep]
