"""The five Mask R-CNN losses, as Matterport defines them.

Each function takes the head's raw outputs and the targets of :mod:`maskrcnn.model.targets`
and returns a scalar.  Leading dimensions are free (one image ``[A, ...]`` or a batch
``[B, A, ...]``): they are flattened.  When a loss has nothing to average over (no sampled
anchor, no positive ROI) it returns ``0 * pred.sum()``: zero, but connected to the graph, so
``backward()`` and DistributedDataParallel see every parameter used.

The weighting by ``config.loss_weights`` is the model's job, not these functions'.

Which anchors or ROIs count is read from the labels (a ``nonzero`` of a mask, which on a GPU makes
the host wait for every kernel queued before it) unless the caller passes their indices: the
target builders know them already (``build_rpn_targets_batch``, ``sample_detection_targets_batch``),
and a training step that passes them waits for none of the four.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero(pred: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps ``pred`` in the autograd graph."""
    return pred.sum() * 0.0


def smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean smooth-L1 (Huber with beta 1: 0.5 d^2 if |d| < 1 else |d| - 0.5) over all elements,
    Matterport's ``smooth_l1_loss`` followed by ``K.mean``."""
    return F.smooth_l1_loss(pred, target.to(pred.dtype), beta=1.0, reduction="mean")


def _rows(mask: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """``given`` ([K] int64 row indices, ascending) or the rows where ``mask`` [R] is True."""
    return torch.nonzero(mask)[:, 0] if given is None else given


def rpn_class_loss(logits: torch.Tensor, labels: torch.Tensor, objectness: str,
                   sampled: torch.Tensor | None = None) -> torch.Tensor:
    """Anchor objectness loss, averaged over the sampled anchors.

    logits: [..., A, 2] (bg, fg) logits of a "softmax" head, or [..., A] one logit of a
            "sigmoid" head (``objectness``: the head's ``kind``).
    labels: [..., A] int64 from ``build_rpn_targets``: 1 positive, 0 negative, -1 ignored.
    sampled: [S] int64, the flattened indices of labels != -1 in ascending order
            (``build_rpn_targets_batch``'s ``sampled``); found from ``labels`` when None.
    Returns cross-entropy (softmax) or binary cross-entropy (sigmoid) over labels != -1.
    """
    labels = labels.reshape(-1)
    sampled = _rows(labels >= 0, sampled)
    if sampled.numel() == 0:
        return _zero(logits)
    if objectness == "softmax":
        return F.cross_entropy(logits.reshape(-1, 2)[sampled].float(), labels[sampled])
    return F.binary_cross_entropy_with_logits(logits.reshape(-1)[sampled].float(), labels[sampled].float())


def rpn_bbox_loss(deltas: torch.Tensor, target_deltas: torch.Tensor, labels: torch.Tensor,
                  positive: torch.Tensor | None = None) -> torch.Tensor:
    """Anchor box regression loss over the positive anchors.

    deltas:        [..., A, 4] predicted (dx, dy, log dw, log dh), in std-divided units.
    target_deltas: [..., A, 4] from ``build_rpn_targets`` (already divided by the std).
    labels:        [..., A] from ``build_rpn_targets``; only label 1 counts.
    positive:      [P] int64, the flattened indices of label 1 in ascending order
                   (``build_rpn_targets_batch``'s ``positive``); found from ``labels`` when None.
    Returns smooth-L1 averaged over positives x 4 coordinates (Matterport's ``K.mean``).
    """
    positive = _rows(labels.reshape(-1) == 1, positive)
    if positive.numel() == 0:
        return _zero(deltas)
    return smooth_l1(deltas.reshape(-1, 4)[positive].float(), target_deltas.reshape(-1, 4)[positive])


def mrcnn_class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROI classification loss.

    logits: [R, num_classes] class logits of the sampled ROIs (background = column 0).
    labels: [R] int64 class ids from ``build_detection_targets`` (0 for negatives).
    Returns cross-entropy averaged over the R ROIs.
    """
    labels = labels.reshape(-1)
    if labels.numel() == 0:
        return _zero(logits)
    return F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels)


def mrcnn_bbox_loss(deltas: torch.Tensor, target_deltas: torch.Tensor, labels: torch.Tensor,
                    positive: torch.Tensor | None = None) -> torch.Tensor:
    """ROI box refinement loss, on each positive ROI's own class only.

    deltas:        [R, num_classes, 4] predicted class-specific (dx, dy, log dw, log dh).
    target_deltas: [R, 4] from ``build_detection_targets`` (divided by ``bbox_std_dev``).
    labels:        [R] int64 class ids (0 = negative, ignored).
    positive:      [P] int64, the rows with labels > 0 in ascending order
                   (``sample_detection_targets_batch``'s ``positive_rows``); found when None.
    Returns smooth-L1 averaged over positives x 4 coordinates.
    """
    labels = labels.reshape(-1)
    positive = _rows(labels > 0, positive)
    if positive.numel() == 0:
        return _zero(deltas)
    deltas = deltas.reshape(labels.numel(), -1, 4)
    pred = deltas[positive, labels[positive]]
    return smooth_l1(pred.float(), target_deltas.reshape(-1, 4)[positive])


def mrcnn_mask_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor, labels: torch.Tensor,
                    positive: torch.Tensor | None = None) -> torch.Tensor:
    """Mask loss: per-pixel binary cross-entropy on each positive ROI's own class mask.

    mask_logits:  [R, num_classes, h, w] mask logits (before the sigmoid).
    target_masks: [R, h, w] float in {0, 1} from ``build_detection_targets``.
    labels:       [R] int64 class ids (0 = negative, ignored).
    positive:     [P] int64, the rows with labels > 0 in ascending order; found when None.
    Returns BCE averaged over positives x h x w pixels.
    """
    labels = labels.reshape(-1)
    positive = _rows(labels > 0, positive)
    if positive.numel() == 0:
        return _zero(mask_logits)
    pred = mask_logits[positive, labels[positive]]
    return F.binary_cross_entropy_with_logits(pred.float(), target_masks[positive].to(torch.float32))
