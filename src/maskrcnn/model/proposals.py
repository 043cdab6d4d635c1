"""ProposalLayer: turn RPN outputs into a few hundred/thousand candidate boxes per image.

top-k anchors by foreground score -> apply the predicted deltas -> clip -> (drop tiny boxes)
-> non-maximum suppression -> keep at most ``proposal_count``.
"""
from __future__ import annotations

import torch
from torchvision.ops import nms, remove_small_boxes

from ..boxes import apply_box_deltas, batched_nms, clip_boxes


def descending_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row, highest first; equal scores keep the
    lower index first (TF's ``top_k`` and ``non_max_suppression`` order).
    scores: [..., A] -> [..., k] int64."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def nms_in_order(boxes: torch.Tensor, iou_threshold: float, max_output: int) -> torch.Tensor:
    """NMS over boxes already sorted by descending score; ties keep their given order.

    boxes: [K, (x1, y1, x2, y2)].  Returns indices into ``boxes``, in order, at most ``max_output``.
    """
    ranks = torch.arange(boxes.shape[0], 0, -1, device=boxes.device, dtype=boxes.dtype)
    return nms(boxes, ranks, iou_threshold)[:max_output]


def _decode(order: torch.Tensor, deltas, anchors, windows, std, clip_log_size) -> torch.Tensor:
    """The boxes of the anchors ``order`` [N, K] picks in each image: ``anchors`` [A, 4] moved
    by that image's ``deltas`` [N, A, 4] and clipped to its window (``windows`` [N, 4]), all
    images at once.  Returns [N, K, (x1, y1, x2, y2)]."""
    picked = deltas.gather(1, order[..., None].expand(-1, -1, deltas.shape[-1]))
    boxes = apply_box_deltas(anchors[order], picked, std, clip_log_size)
    return clip_boxes(boxes, windows[:, None, :])


def propose_global(scores, deltas, anchors, windows, pre_nms_limit: int, proposal_count: int,
                   nms_threshold: float, std, clip_log_size=None, min_size: float = 0.0):
    """Matterport's ProposalLayer over a batch: per image, one top-k and one NMS over all levels.

    scores:  [N, A] foreground probability per anchor.
    deltas:  [N, A, (dx, dy, log dw, log dh)] as predicted (multiplied by ``std`` here).
    anchors: [A, (x1, y1, x2, y2)] in the model's box frame.
    windows: [N, (x1, y1, x2, y2)] each image's clip window in the same frame.
    The top-k, the decoding and the clipping run on the whole batch (a few kernels, not a few
    per image); the size filter and NMS per image.
    Returns per image (boxes [P, 4], scores [P]), P <= proposal_count, in NMS (descending score)
    order.
    """
    order = descending_order(scores, min(pre_nms_limit, scores.shape[-1]))
    boxes = _decode(order, deltas, anchors, windows, std, clip_log_size)
    top_scores = scores.gather(1, order)
    out = []
    for image_boxes, image_scores in zip(boxes, top_scores):
        if min_size > 0:
            keep = remove_small_boxes(image_boxes, min_size)
            image_boxes, image_scores = image_boxes[keep], image_scores[keep]
        keep = nms_in_order(image_boxes, nms_threshold, proposal_count)
        out.append((image_boxes[keep], image_scores[keep]))
    return out


def propose_per_level(logits, deltas, anchors, windows, level_sizes: list[int], pre_nms_limit: int,
                      proposal_count: int, nms_threshold: float, std, clip_log_size=None,
                      min_size: float = 0.0):
    """torchvision's RPN filter over a batch: per image, top-k per level, NMS within each
    level, then the best ``proposal_count`` over all levels.

    logits: [N, A] objectness logits (sigmoid head); deltas, anchors, windows as in
    :func:`propose_global`; level_sizes: anchors per level, in anchor order.
    The per-level top-k (as torchvision, one per level for the batch), the decoding and the
    clipping run on the whole batch; the size filter and NMS per image.
    Returns per image (boxes [P, 4], scores [P] probabilities), sorted by descending score.
    """
    tops, levels, offset = [], [], 0
    for lvl, level_logits in enumerate(logits.split(level_sizes, dim=1)):
        k = min(pre_nms_limit, level_logits.shape[1])
        tops.append(level_logits.topk(k, dim=1).indices + offset)
        levels.append(torch.full((k,), lvl, dtype=torch.int64, device=logits.device))
        offset += level_logits.shape[1]
    order = torch.cat(tops, dim=1)
    levels = torch.cat(levels)
    boxes = _decode(order, deltas, anchors, windows, std, clip_log_size)
    probs = torch.sigmoid(logits.gather(1, order))
    out = []
    for image_boxes, image_probs in zip(boxes, probs):
        image_levels = levels
        if min_size > 0:
            keep = remove_small_boxes(image_boxes, min_size)
            image_boxes, image_probs, image_levels = image_boxes[keep], image_probs[keep], levels[keep]
        keep = batched_nms(image_boxes, image_probs, image_levels, nms_threshold)[:proposal_count]
        out.append((image_boxes[keep], image_probs[keep]))
    return out
