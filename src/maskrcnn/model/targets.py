"""Training targets: which anchors and which ROIs the losses look at, and what they should predict.

Two pure functions, one per stage, both on whatever device their inputs are on:

* :func:`build_rpn_targets` labels every anchor positive / negative / ignored against the ground
  truth and samples a balanced subset (Matterport's ``build_rpn_targets``, vectorised).
* :func:`build_detection_targets` samples ROIs from the proposals, gives each a class id, the
  box deltas to its ground truth and a ``mask_shape`` mask target (Matterport's
  ``detection_targets_graph``).

All boxes are ``(x1, y1, x2, y2)`` in pixels of the molded image (x2, y2 exclusive), the frame of
:mod:`maskrcnn.boxes`.  Crowd annotations are never matched; anything that overlaps a crowd box at
all (IoU >= ``CROWD_IOU``) is not used as a negative either, since it may show an object.

Masks come full-size ([G, H, W], the molded image) or as Matterport's mini masks ([G, h, w],
each instance's box area resized to ``mini_mask_shape``: :func:`minimize_masks`), whose memory
does not grow with the image; mask targets are then cropped from the mini mask.
:func:`keep_largest` applies ``max_gt_instances`` and :func:`random_rois` replaces the RPN's
proposals when ``use_rpn_rois`` is False.

Random subsampling draws from ``generator`` (a CPU ``torch.Generator``) or, when None, from
torch's global generator, so a run is reproducible from its seed and a resumed run from the
RNG state saved in its checkpoint.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..boxes import box_deltas
from ..device import device_constant, to_device

log = logging.getLogger(__name__)

#: An anchor or ROI with at least this IoU with a crowd box is not a negative (Matterport).
CROWD_IOU = 0.001


#: Below this many candidates per sample, :func:`random_choice` permutes them all; above it,
#: it draws indices one by one and skips repeats (0.2 ms for 256 of an 800x1066 image's 200k
#: negative anchors, where a permutation of them all took 2 ms of host time a training image).
DENSE_CHOICE_RATIO = 4


def random_choice(n: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``min(count, n)`` distinct integers of ``range(n)``, uniformly at random and in random
    order: [k] int64 on the CPU, drawn from ``generator`` (a CPU generator, or torch's global
    one), so the choice does not depend on where the candidates live.

    Few of many (``n >= DENSE_CHOICE_RATIO * count``): uniform draws of ``range(n)`` in turn,
    each kept unless drawn before (sequential sampling without replacement: every ordered
    choice equally likely), in O(count) work.  Otherwise the first ``count`` of a permutation.
    """
    count = max(0, min(int(count), n))
    if n < DENSE_CHOICE_RATIO * count:
        return torch.randperm(n, generator=generator)[:count]
    chosen: dict[int, None] = {}
    while len(chosen) < count:
        for value in torch.randint(n, (2 * (count - len(chosen)),), generator=generator).tolist():
            chosen.setdefault(value)
            if len(chosen) == count:
                break
    return torch.tensor(list(chosen), dtype=torch.int64)


def _subset_positions(count_available: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Which of ``count_available`` candidates to keep: all, in order, when they fit in
    ``count``, else :func:`random_choice`.  [k] int64 on the CPU."""
    count = max(int(count), 0)
    if count_available <= count:
        return torch.arange(count_available)
    return random_choice(count_available, count, generator)


def balanced_sample(positive: torch.Tensor, negative: torch.Tensor, num_samples: int, positive_ratio: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The positive/negative sampler of both stages (Matterport's, and torchvision's
    ``BalancedPositiveNegativeSampler``) over a batch: in each image at most
    ``int(num_samples * positive_ratio)`` of its positives, then negatives up to
    ``num_samples`` in all, each chosen at random; image by image, its positives drawn before
    its negatives, so a batch draws what one call per image would.

    positive, negative: [N, K] bool, each image's candidates.  The host waits for the GPU
    three times (twice for one image): each image's counts, and one ``nonzero`` of each mask.
    Returns (positive indices [sum P_i], negative indices [sum M_i], both int64 into the
    flattened [N * K] candidates, image by image, each image's in random order; per image
    (P_i, M_i) on the host), P_i + M_i <= num_samples.
    """
    pos_idx = torch.nonzero(positive.view(-1))[:, 0]  # image by image, in candidate order
    neg_idx = torch.nonzero(negative.view(-1))[:, 0]
    if positive.shape[0] == 1:
        counts = [[pos_idx.numel()], [neg_idx.numel()]]
    else:
        counts = torch.stack([positive.sum(dim=1), negative.sum(dim=1)]).tolist()
    keep_pos, keep_neg, sizes, pos_start, neg_start = [], [], [], 0, 0
    for num_pos, num_neg in zip(*counts):
        chosen_pos = _subset_positions(num_pos, int(num_samples * positive_ratio), generator)
        chosen_neg = _subset_positions(num_neg, num_samples - chosen_pos.numel(), generator)
        keep_pos.append(chosen_pos + pos_start)
        keep_neg.append(chosen_neg + neg_start)
        sizes.append((chosen_pos.numel(), chosen_neg.numel()))
        pos_start, neg_start = pos_start + num_pos, neg_start + num_neg
    return (pos_idx[to_device(torch.cat(keep_pos), pos_idx.device)],
            neg_idx[to_device(torch.cat(keep_neg), neg_idx.device)], sizes)


def _usable(gt_boxes: torch.Tensor, gt_crowd: torch.Tensor) -> torch.Tensor:
    """[G] bool: non-crowd gt with a positive width and height (an instance whose mask vanished
    in resizing has an empty box, which has no IoU with anything and no deltas)."""
    return ~gt_crowd & (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])


#: IoU entries (boxes x gt) computed at a time.  Anchors x gt at 1024x1024 with 300 instances is
#: 78M IoUs, and torchvision's box_iou adds [A, G, 2] temporaries (about 2 GB in all); blocks of
#: rows keep each temporary near 4M floats (16 MB).  The budget is in entries, not rows: with a
#: few gt boxes every anchor of an 800x1066 image (213k) fits in one block, since on a GPU each
#: block is a dozen tiny kernels whose launches, not their arithmetic, set the time (16384-row
#: blocks were 13 blocks and two passes, ~1250 launches per image).
IOU_BLOCK_ELEMENTS = 1 << 22


def _iou_block(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """IoU [..., n, G] of boxes [..., n, 4] with gt_boxes [..., G, 4] (leading dims: a batch of
    images, each its boxes with its gt): torchvision's ``box_iou`` arithmetic, the same floats,
    without its [n, G, 2] temporaries."""
    bx1, by1, bx2, by2 = boxes[..., :, None, :].unbind(-1)
    gx1, gy1, gx2, gy2 = gt_boxes[..., None, :, :].unbind(-1)
    area1 = (bx2 - bx1) * (by2 - by1)
    area2 = (gx2 - gx1) * (gy2 - gy1)
    inter = (torch.min(bx2, gx2) - torch.max(bx1, gx1)).clamp_(min=0)
    inter *= (torch.min(by2, gy2) - torch.max(by1, gy1)).clamp_(min=0)
    union = area1 + area2 - inter
    return inter.div_(union)


def _masked_block(boxes: torch.Tensor, gt_boxes: torch.Tensor, usable: torch.Tensor,
                  crowd: torch.Tensor | None):
    """IoU [..., n, G] of boxes [..., n, 4] with gt_boxes [..., G, 4], -1 in the columns of gt
    that is not ``usable`` [..., G] bool (so it is nobody's best match), and with ``crowd``
    [..., G] bool the rows overlapping some crowd gt with IoU >= CROWD_IOU ([..., n] bool, else
    None)."""
    iou = _iou_block(boxes, gt_boxes)
    near_crowd = ((iou >= CROWD_IOU) & crowd[..., None, :]).any(dim=-1) if crowd is not None else None
    return iou.masked_fill_(~usable[..., None, :], -1.0), near_crowd


def _has_gt_best(iou: torch.Tensor, gt_best: torch.Tensor) -> torch.Tensor:
    """[..., n] bool: row i of ``iou`` [..., n, G] holds some gt's best IoU ``gt_best``
    [..., 1, G] (or [G]; ties included), when that IoU is > 0."""
    return ((iou == gt_best) & (gt_best > 0)).any(dim=-1)


def _match(boxes: torch.Tensor, gt_boxes: torch.Tensor, usable: torch.Tensor,
           crowd: torch.Tensor | None = None, with_gt_best: bool = False):
    """Best ground truth of each box, and optionally which boxes are some gt's best match and
    which overlap crowd gt.

    boxes: [N, 4], gt_boxes: [G, 4] with G >= 1, usable: [G] bool, the gt a box may match
    (:func:`_usable`; the rest keep their rows, so that nothing here waits for the GPU to
    say how many there are), crowd: [G] bool or None.
    Returns (best IoU [N], -1 where no gt is usable; best gt index [N] int64 into gt_boxes (the
    first of ties); is_gt_best [N] bool or None; near_crowd [N] bool or None):
    ``is_gt_best`` (with ``with_gt_best``) marks the boxes that have some usable gt's highest
    IoU over all boxes (ties included), when that IoU is > 0; ``near_crowd`` (with ``crowd``)
    the boxes with IoU >= CROWD_IOU with some crowd gt.  The IoU matrix is computed in blocks
    of :data:`IOU_BLOCK_ELEMENTS`; in one block when it fits, else ``is_gt_best`` takes a
    second pass, since it needs every gt's best IoU first."""
    rows = max(1, IOU_BLOCK_ELEMENTS // gt_boxes.shape[0])
    if boxes.shape[0] <= rows:
        iou, near_crowd = _masked_block(boxes, gt_boxes, usable, crowd)
        best_iou, best_gt = iou.max(dim=1)
        if not with_gt_best:
            return best_iou, best_gt, None, near_crowd
        gt_best = iou.amax(dim=0) if boxes.shape[0] else boxes.new_zeros(gt_boxes.shape[0])
        return best_iou, best_gt, _has_gt_best(iou, gt_best), near_crowd
    best_iou, best_gt, near_crowd = [], [], []
    gt_best = torch.full((gt_boxes.shape[0],), -1.0, dtype=boxes.dtype, device=boxes.device)
    for start in range(0, boxes.shape[0], rows):
        iou, near = _masked_block(boxes[start:start + rows], gt_boxes, usable, crowd)
        value, index = iou.max(dim=1)
        best_iou.append(value)
        best_gt.append(index)
        near_crowd.append(near)
        gt_best = torch.maximum(gt_best, iou.amax(dim=0))
    is_best = None
    if with_gt_best:
        is_best = torch.cat([_has_gt_best(_masked_block(boxes[start:start + rows], gt_boxes, usable, None)[0],
                                          gt_best)
                             for start in range(0, boxes.shape[0], rows)])
    return (torch.cat(best_iou), torch.cat(best_gt), is_best,
            torch.cat(near_crowd) if crowd is not None else None)


def _match_batch(boxes: torch.Tensor, gt_boxes: torch.Tensor, usable: torch.Tensor, crowd: torch.Tensor):
    """:func:`_match` (best IoU, best gt, near crowd) of a batch: boxes [N, C, 4] each image's
    with its gt_boxes [N, G, 4], usable and crowd [N, G] bool (padding rows: not usable, not
    crowd).  Returns best IoU [N, C] (-1 where no gt is usable), best gt index [N, C] into each
    image's G, near_crowd [N, C] bool.  The [N, C, G] IoUs are computed at once when they fit
    :data:`IOU_BLOCK_ELEMENTS`, else image by image (:func:`_match`, in blocks of rows)."""
    n, c, g = boxes.shape[0], boxes.shape[1], gt_boxes.shape[1]
    if n * c * g <= IOU_BLOCK_ELEMENTS:
        iou, near_crowd = _masked_block(boxes, gt_boxes, usable, crowd)
        best_iou, best_gt = iou.max(dim=-1)
        return best_iou, best_gt, near_crowd
    per_image = [_match(boxes[i], gt_boxes[i], usable[i], crowd[i]) for i in range(n)]
    return tuple(torch.stack([image[k] for image in per_image]) for k in (0, 1, 3))


def build_rpn_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_crowd: torch.Tensor,
                      num_samples: int = 256, positive_ratio: float = 0.5,
                      positive_iou: float = 0.7, negative_iou: float = 0.3,
                      std=(1.0, 1.0, 1.0, 1.0),
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Label and sample anchors for the RPN losses (Matterport's ``build_rpn_targets``).

    anchors:  [A, (x1, y1, x2, y2)] molded-image pixels.
    gt_boxes: [G, (x1, y1, x2, y2)] molded-image pixels (G may be 0).
    gt_crowd: [G] bool, True for crowd annotations (never matched; anchors overlapping one with
              IoU >= 0.001 are not used as negatives).
    num_samples: anchors sampled per image (``rpn_train_anchors_per_image``).
    positive_ratio: at most ``int(num_samples * positive_ratio)`` positives; negatives fill the rest.
    positive_iou / negative_iou: an anchor is positive at IoU >= positive_iou with a non-crowd gt,
              negative below negative_iou with all of them.  Each gt's best anchor(s) (all anchors
              tied at its highest IoU, if that IoU is > 0) are positive too, so every object is
              seen even when no anchor reaches positive_iou.
    std:      (sx, sy, sw, sh), x-first (``boxes.std_xy(config.rpn_bbox_std_dev)``).

    Returns
      labels: [A] int64, 1 positive, 0 negative, -1 ignored (neither, or not sampled).
      deltas: [A, (dx, dy, log dw, log dh)] float, ``box_deltas(anchor, matched gt) / std`` for the
              sampled positives, zeros elsewhere.
    With no (non-crowd, non-empty) gt, every sampled anchor is negative.
    """
    out = build_rpn_targets_batch(anchors, [gt_boxes], [gt_crowd], num_samples, positive_ratio,
                                  positive_iou, negative_iou, std, generator)
    return out.labels[0], out.deltas[0]


def _anchor_labels(best_iou: torch.Tensor, is_best: torch.Tensor, near_crowd: torch.Tensor,
                   positive_iou: float, negative_iou: float) -> torch.Tensor:
    """The rules of :func:`build_rpn_targets` on matched anchors ([..., A] each): 1 where the
    anchor is some gt's best or reaches ``positive_iou``, else 0 below ``negative_iou`` away
    from crowd, else -1.  [..., A] int64."""
    labels = torch.full(best_iou.shape, -1, dtype=torch.int64, device=best_iou.device)
    labels.masked_fill_((best_iou < negative_iou) & ~near_crowd, 0)
    return labels.masked_fill_(is_best | (best_iou >= positive_iou), 1)


def _rpn_labels(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_crowd: torch.Tensor,
                positive_iou: float, negative_iou: float):
    """One image's anchor labels before sampling (the rules of :func:`build_rpn_targets`), with
    no wait for the GPU: no bool-mask selection of the crowd or usable gt, nor of the labels.

    Returns (labels [A] int64: 1 positive, 0 negative, -1 neither; best gt index [A] int64 into
    gt_boxes; gt_boxes [G, 4] on the anchors' device and dtype)."""
    device = anchors.device
    gt_crowd = to_device(gt_crowd, device).bool()
    gt_boxes = to_device(gt_boxes, device).to(anchors.dtype)
    if gt_boxes.shape[0] == 0:
        labels = torch.zeros(anchors.shape[0], dtype=torch.int64, device=device)
        return labels, torch.zeros_like(labels), gt_boxes
    # Each gt's best anchor(s), ties included (Matterport), but not at IoU 0: an object no anchor
    # touches would otherwise make every anchor positive.  Without usable gt every best IoU is
    # -1: all anchors but those near crowd are negative.
    best_iou, best_gt, is_best, near_crowd = _match(anchors, gt_boxes, _usable(gt_boxes, gt_crowd), gt_crowd,
                                                    with_gt_best=True)
    return _anchor_labels(best_iou, is_best, near_crowd, positive_iou, negative_iou), best_gt, gt_boxes


def _padded_gt(all_gt: torch.Tensor, all_crowd: torch.Tensor, counts: list[int]):
    """A batch's ground truth, ``all_gt`` [sum G_i, 4] and ``all_crowd`` [sum G_i] bool image by
    image (``counts``: the G_i), padded to G = max G_i with rows that are neither usable nor
    crowd.  Returns (usable [sum G_i] bool (:func:`_usable`), boxes [N, G, 4], usable [N, G],
    crowd [N, G])."""
    width = max(counts)
    usable = _usable(all_gt, all_crowd)
    neither = torch.zeros(width, dtype=torch.bool, device=all_gt.device)

    def pad(t: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return _padded([[part] for part in t.split(counts)], width, fill)
    return usable, pad(all_gt, all_gt.new_zeros(width, 4)), pad(usable, neither), pad(all_crowd, neither)


def _rpn_labels_batch(anchors: torch.Tensor, gt_boxes: list[torch.Tensor], gt_crowd: list[torch.Tensor],
                      positive_iou: float, negative_iou: float):
    """:func:`_rpn_labels` of N images that share ``anchors`` [A, 4]: the images whose IoU
    matrices fit :data:`IOU_BLOCK_ELEMENTS` together ([k, A, max G] with each image's gt padded
    by unusable rows) are labelled in one pass, one set of kernels for the k images; the rest
    image by image.  The same labels and best gt as one call per image.

    Returns (labels [N, A] int64, best gt index [N, A] int64 into each image's gt, the images'
    gt boxes on the anchors' device and dtype)."""
    device, dtype, num_anchors = anchors.device, anchors.dtype, anchors.shape[0]
    gts = [to_device(g, device).to(dtype) for g in gt_boxes]
    width = max((g.shape[0] for g in gts), default=0)
    together = IOU_BLOCK_ELEMENTS // (num_anchors * width) if width else 0
    if len(gts) == 1 or together < 2:
        per_image = [_rpn_labels(anchors, g, c, positive_iou, negative_iou) for g, c in zip(gts, gt_crowd)]
        return (torch.stack([lab for lab, _, _ in per_image]), torch.stack([best for _, best, _ in per_image]),
                [g for _, _, g in per_image])
    _, boxes, usable, crowd = _padded_gt(torch.cat(gts), torch.cat([to_device(c, device).bool() for c in gt_crowd]),
                                         [g.shape[0] for g in gts])
    labels, best = [], []
    for start in range(0, len(gts), together):
        part = slice(start, start + together)
        iou, near_crowd = _masked_block(anchors, boxes[part], usable[part], crowd[part])
        best_iou, best_gt = iou.max(dim=-1)
        is_best = _has_gt_best(iou, iou.amax(dim=-2, keepdim=True))
        labels.append(_anchor_labels(best_iou, is_best, near_crowd, positive_iou, negative_iou))
        best.append(best_gt)
    return torch.cat(labels), torch.cat(best), gts


def build_rpn_targets_batch(anchors: torch.Tensor, gt_boxes: list[torch.Tensor], gt_crowd: list[torch.Tensor],
                            num_samples: int = 256, positive_ratio: float = 0.5,
                            positive_iou: float = 0.7, negative_iou: float = 0.3,
                            std=(1.0, 1.0, 1.0, 1.0),
                            generator: torch.Generator | None = None) -> "RpnTargets":
    """:func:`build_rpn_targets` for N images that share ``anchors`` [A, 4]: ``gt_boxes`` and
    ``gt_crowd`` hold one [G_i, 4] and one [G_i] per image.  The same labels and deltas as N
    calls of it in turn with the same ``generator`` (each image's positives, then its negatives,
    drawn in image order), built with three waits for the GPU in all (the per-image positive and
    negative counts, and one ``nonzero`` each over the batch; two for one image) where N calls
    wait twice each, and one ``index_fill_`` and one delta computation for the batch.

    Returns :class:`RpnTargets`: labels [N, A] int64, deltas [N, A, 4], and the indices the
    losses read (so that they need not find them in the labels, a wait each).
    """
    device, num_anchors = anchors.device, anchors.shape[0]
    labels, best_gt, gts = _rpn_labels_batch(anchors, gt_boxes, gt_crowd, positive_iou, negative_iou)
    flat = labels.view(-1)
    keep_pos, keep_neg, _ = balanced_sample(labels == 1, labels == 0, num_samples, positive_ratio, generator)
    flat.fill_(-1).index_fill_(0, keep_pos, 1).index_fill_(0, keep_neg, 0)

    deltas = torch.zeros(len(gts), num_anchors, 4, dtype=anchors.dtype, device=device)
    if keep_pos.numel():
        # each image's gt follow the previous images' in one [sum G_i, 4]
        offsets = to_device(torch.tensor([0] + [g.shape[0] for g in gts[:-1]]).cumsum(0), device)
        image = keep_pos // num_anchors
        matched = torch.cat(gts)[offsets[image] + best_gt.view(-1)[keep_pos]]
        deltas.view(-1, 4)[keep_pos] = box_deltas(anchors[keep_pos % num_anchors], matched, std)
    # in ascending order, as a bool-mask selection of the labels would pick them
    positive = torch.sort(keep_pos).values
    return RpnTargets(labels, deltas, positive, torch.sort(torch.cat([keep_pos, keep_neg])).values)


class RpnTargets(NamedTuple):
    """:func:`build_rpn_targets_batch`'s anchor targets of N images of A anchors each.

    labels:   [N, A] int64, 1 positive, 0 negative, -1 ignored.
    deltas:   [N, A, 4] the positives' regression targets (divided by the std), zeros elsewhere.
    positive: [P] int64 flat indices (image * A + anchor) of the positives, ascending.
    sampled:  [S] int64 flat indices of the positives and negatives, ascending.
    """
    labels: torch.Tensor
    deltas: torch.Tensor
    positive: torch.Tensor
    sampled: torch.Tensor


def build_detection_targets(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                            gt_masks: torch.Tensor, gt_crowd: torch.Tensor, num_samples: int,
                            positive_ratio: float, positive_iou: float = 0.5,
                            negative_iou: float = 0.5, std=(1.0, 1.0, 1.0, 1.0),
                            mask_shape=(28, 28), generator: torch.Generator | None = None,
                            mini_masks: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ROIs for the box and mask heads and build their targets (Matterport's
    ``detection_targets_graph``): :func:`sample_detection_targets` (arguments and the first four
    results as there) without the count of positives."""
    return sample_detection_targets(proposals, gt_boxes, gt_labels, gt_masks, gt_crowd, num_samples,
                                    positive_ratio, positive_iou, negative_iou, std, mask_shape, generator,
                                    mini_masks)[:4]


def sample_detection_targets(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                             gt_masks: torch.Tensor, gt_crowd: torch.Tensor, num_samples: int,
                             positive_ratio: float, positive_iou: float = 0.5,
                             negative_iou: float = 0.5, std=(1.0, 1.0, 1.0, 1.0),
                             mask_shape=(28, 28), generator: torch.Generator | None = None,
                             mini_masks: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sample ROIs for the box and mask heads and build their targets (Matterport's
    ``detection_targets_graph``).

    proposals: [P, (x1, y1, x2, y2)] molded-image pixels (detached; the RPN's output).
    gt_boxes:  [G, (x1, y1, x2, y2)] molded-image pixels (G may be 0).
    gt_labels: [G] int64 class ids 1..num_classes-1.
    gt_masks:  [G, H, W] bool full masks in the molded-image frame, or with ``mini_masks``
               [G, h, w] bool mini masks, each spanning its gt box (:func:`minimize_masks`).
    gt_crowd:  [G] bool; crowd gt is never a positive's match, and proposals overlapping it
               (IoU >= 0.001) are not negatives.
    num_samples: ROIs per image (``train_rois_per_image``).
    positive_ratio: at most ``int(num_samples * positive_ratio)`` positives (``roi_positive_ratio``);
               negatives fill up to ``num_samples`` (torchvision's sampler).  Matterport instead
               keeps the ratio exact and zero-pads, which leaves an image without positives
               with no ROIs at all; filling lets such images train as negatives.
    positive_iou / negative_iou: positive at IoU >= positive_iou with a non-crowd gt, negative
               below negative_iou with all of them.
    std:       (sx, sy, sw, sh), x-first (``boxes.std_xy(config.bbox_std_dev)``).
    mask_shape: (h, w) of the mask targets.

    The non-crowd gt boxes are added to the proposals before sampling (as torchvision does;
    Matterport relies on the RPN alone): early in training the RPN proposes nothing near the
    objects, and the gt boxes give the heads perfect positives from the first step.

    Returns, R <= num_samples, positives first:
      rois:   [R, (x1, y1, x2, y2)] molded-image pixels.
      labels: [R] int64, the matched gt's class for positives, 0 for negatives.
      deltas: [R, (dx, dy, log dw, log dh)], ``box_deltas(roi, gt) / std`` for positives, 0 else.
      masks:  [R, *mask_shape] float in {0, 1}: the matched gt mask cropped to the roi and
              resized (torchvision ``roi_align`` with ``aligned=True``, whose half-pixel shift
              fits our pixel-corner boxes), thresholded at 0.5 like Matterport; zeros for
              negatives.
      num_positive: int, how many of the first rows are positives: known on the host, so the
              caller picks them by slicing, without waiting for the GPU to count labels > 0.
    This is :func:`sample_detection_targets_batch` for one image.
    """
    out = sample_detection_targets_batch([proposals], [gt_boxes], [gt_labels], [gt_masks], [gt_crowd],
                                         num_samples, positive_ratio, positive_iou, negative_iou, std,
                                         mask_shape, generator, mini_masks)
    num_pos = out.counts[0][1]
    masks = out.rois.new_zeros(out.rois.shape[0], *mask_shape)
    masks[:num_pos] = out.positive_masks
    return out.rois, out.labels, out.deltas, masks, num_pos


class DetectionTargets(NamedTuple):
    """The heads' sampled ROIs and targets for a batch (:func:`sample_detection_targets_batch`):
    image i's R_i rows follow image i-1's, its P_i positives first.

    rois:   [sum R_i, (x1, y1, x2, y2)] molded-image pixels.
    labels: [sum R_i] int64, the matched gt's class for positives, 0 for negatives.
    deltas: [sum R_i, (dx, dy, log dw, log dh)], ``box_deltas(roi, gt) / std`` for positives, 0 else.
    positive_masks:  [sum P_i, *mask_shape] float in {0, 1}, the positives' mask targets in row
            order (the negatives' would be zeros, and no loss reads them).
    positive_labels: [sum P_i] int64, the positives' labels in row order.
    positive_rows: [sum P_i] int64, the positives' rows, ascending.
    counts: per image (R_i, P_i), on the host.
    """
    rois: torch.Tensor
    labels: torch.Tensor
    deltas: torch.Tensor
    positive_masks: torch.Tensor
    positive_labels: torch.Tensor
    positive_rows: torch.Tensor
    counts: list[tuple[int, int]]

    @classmethod
    def cat(cls, parts: list["DetectionTargets"]) -> "DetectionTargets":
        """The targets of consecutive groups of images as one batch's (rows and counts in
        order, each group's positive rows moved past the rows before it)."""
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + len(part.rois))
        return cls(*[torch.cat(field) for field in list(zip(*parts))[:5]],
                   positive_rows=torch.cat([part.positive_rows + start for part, start in zip(parts, starts)]),
                   counts=[count for part in parts for count in part.counts])


def _padded(pieces: list[list[torch.Tensor]], length: int, fill: torch.Tensor) -> torch.Tensor:
    """One tensor [N, length, *rest] of N rows each the concatenation of ``pieces[i]`` (tensors
    [k, *rest]) padded with rows of ``fill`` [length, *rest] (which it slices): one ``cat`` for
    the batch, not a copy per piece."""
    parts = []
    for row in pieces:
        parts.extend(row)
        parts.append(fill[:length - sum(p.shape[0] for p in row)])
    return torch.cat(parts).view(len(pieces), length, *fill.shape[1:])


def sample_detection_targets_batch(proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor],
                                   gt_labels: list[torch.Tensor], gt_masks: list[torch.Tensor],
                                   gt_crowd: list[torch.Tensor], num_samples: int, positive_ratio: float,
                                   positive_iou: float = 0.5, negative_iou: float = 0.5,
                                   std=(1.0, 1.0, 1.0, 1.0), mask_shape=(28, 28),
                                   generator: torch.Generator | None = None,
                                   mini_masks: bool = False) -> DetectionTargets:
    """:func:`sample_detection_targets` for a batch of N images, each with its own
    ``proposals`` [P_i, 4] and ground truth (``gt_boxes`` [G_i, 4], ``gt_labels`` [G_i],
    ``gt_masks`` [G_i, H, W] or mini masks [G_i, h, w], all images' of one shape, ``gt_crowd``
    [G_i]); other arguments as there.

    The same ROIs and targets as N calls of it in turn with the same ``generator`` (each
    image's positives, then its negatives, drawn in image order), built with three waits for
    the GPU in all (the per-image positive and negative counts, and one ``nonzero`` each over
    the batch; two for one image) where N calls wait twice each, and with one IoU matrix
    ([N, max C_i, max G_i], C_i = P_i + G_i candidates, padded) and one of each target's
    kernels for the batch, not one per image.  Returns :class:`DetectionTargets`.
    """
    n = len(proposals)
    device, dtype = proposals[0].device, proposals[0].dtype
    gt_boxes = [to_device(g, device).to(dtype) for g in gt_boxes]
    num_gt = [g.shape[0] for g in gt_boxes]
    num_props = [p.shape[0] for p in proposals]
    # every gt box joins its image's candidates and keeps its row, the unusable ones (crowd,
    # empty) marked invalid: no bool-mask selection, so the host does not wait for the GPU here
    all_gt = torch.cat(gt_boxes)  # [sum G_i, 4], image by image
    all_crowd = torch.cat([to_device(c, device).bool() for c in gt_crowd])
    gt_start = [sum(num_gt[:i]) for i in range(n)]
    all_usable, gt_padded, usable_padded, crowd_padded = _padded_gt(all_gt, all_crowd, num_gt)
    length = max(p + g for p, g in zip(num_props, num_gt))
    candidates = _padded([[p.detach(), g] for p, g in zip(proposals, all_gt.split(num_gt))], length,
                         all_gt.new_zeros(length, 4))
    true, false = (torch.full((length,), v, dtype=torch.bool, device=device) for v in (True, False))
    valid = _padded([[true[:p], u] for p, u in zip(num_props, all_usable.split(num_gt))], length, false)
    if max(num_gt) == 0:
        positive = torch.zeros_like(valid)
        negative = valid
        best_gt = torch.zeros(valid.shape, dtype=torch.int64, device=device)
    else:
        best_iou, best_gt, near_crowd = _match_batch(candidates, gt_padded, usable_padded, crowd_padded)
        positive = (best_iou >= positive_iou) & valid
        negative = (best_iou < negative_iou) & ~near_crowd & ~positive & valid

    keep_pos, keep_neg, sizes = balanced_sample(positive, negative, num_samples, positive_ratio, generator)
    # image by image, its positives then its negatives
    pos_rows, rows, order, pos_start, neg_start = [], 0, [], 0, keep_pos.numel()
    for num_pos, num_neg in sizes:
        order += [torch.arange(pos_start, pos_start + num_pos), torch.arange(neg_start, neg_start + num_neg)]
        pos_rows.append(torch.arange(rows, rows + num_pos))
        pos_start, neg_start, rows = pos_start + num_pos, neg_start + num_neg, rows + num_pos + num_neg
    keep = torch.cat([keep_pos, keep_neg])[to_device(torch.cat(order), device)]
    rois = candidates.view(-1, 4)[keep]

    labels = torch.zeros(rows, dtype=torch.int64, device=device)
    deltas = torch.zeros(rows, 4, dtype=dtype, device=device)
    if keep_pos.numel():
        pos_rows = to_device(torch.cat(pos_rows), device)
        pos_rois = candidates.view(-1, 4)[keep_pos]
        # into the batch's gt: image i's gt start at gt_start[i]
        starts = to_device(torch.tensor(gt_start), device)
        matched = (best_gt + starts[:, None]).view(-1)[keep_pos]
        positive_labels = torch.cat([to_device(lab, device) for lab in gt_labels])[matched]
        labels.index_put_((pos_rows,), positive_labels)
        deltas.index_put_((pos_rows,), box_deltas(pos_rois, all_gt[matched], std))
        all_masks = torch.cat([to_device(m, device) for m in gt_masks])
        positive_masks = crop_mask_targets(all_masks, matched, pos_rois, mask_shape, all_gt if mini_masks else None)
    else:
        positive_labels = pos_rows = labels[:0]
        positive_masks = torch.zeros(0, *mask_shape, dtype=dtype, device=device)
    return DetectionTargets(rois, labels, deltas, positive_masks, positive_labels, pos_rows,
                            [(num_pos + num_neg, num_pos) for num_pos, num_neg in sizes])


def crop_mask_targets(gt_masks: torch.Tensor, gt_index: torch.Tensor, rois: torch.Tensor,
                      mask_shape=(28, 28), gt_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each roi's gt mask and resize it to ``mask_shape``.

    gt_masks: [G, H, W] bool, molded-image frame; or, with ``gt_boxes``, [G, h, w] mini masks.
    gt_index: [R] int64, which gt mask each roi takes.
    rois:     [R, (x1, y1, x2, y2)] molded-image pixels.
    gt_boxes: [G, (x1, y1, x2, y2)] molded-image pixels, the box each mini mask spans: the roi
              is then moved into its mini mask's pixels (Matterport's detection_targets_graph
              with USE_MINI_MASK), so the same roi_align samples the same place of the object.
    Returns [R, *mask_shape] float in {0, 1} (bilinear average >= 0.5).
    """
    if gt_boxes is not None:
        box = gt_boxes.to(rois.dtype)[gt_index]
        size = device_constant((gt_masks.shape[2], gt_masks.shape[1]) * 2, rois.device, rois.dtype)
        origin = box[:, :2].repeat(1, 2)  # (x1, y1, x1, y1), no index list to copy to the GPU
        extent = (box[:, 2:] - box[:, :2]).clamp(min=1e-6).repeat(1, 2)
        rois = (rois - origin) / extent * size
    boxes = torch.cat([gt_index[:, None].to(rois.dtype), rois], dim=1)
    crops = roi_align(gt_masks[:, None].to(rois.dtype), boxes, tuple(mask_shape),
                      spatial_scale=1.0, sampling_ratio=2, aligned=True)[:, 0]
    return (crops >= 0.5).to(rois.dtype)


def minimize_masks(masks: torch.Tensor, boxes: torch.Tensor, shape=(56, 56)) -> torch.Tensor:
    """Matterport's ``minimize_mask``: each mask's box area resized to ``shape``.

    masks: [N, H, W] bool; boxes: [N, (x1, y1, x2, y2)] pixels of the same frame (x2, y2
    exclusive; their tight boxes, ``boxes.masks_to_boxes``).  Returns [N, *shape] bool: bilinear
    resampling (pixel centres, as ``F.interpolate(align_corners=False)``) thresholded at 0.5.
    An instance is resized on its own, so memory stays at one box at a time.
    """
    out = torch.zeros(len(masks), *shape, dtype=torch.bool, device=masks.device)
    coords = boxes.round().long().tolist()
    for i, (x1, y1, x2, y2) in enumerate(coords):
        crop = masks[i, max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
        if crop.numel():
            out[i] = F.interpolate(crop[None, None].float(), size=tuple(shape), mode="bilinear",
                                   align_corners=False)[0, 0] >= 0.5
    return out


def keep_largest(areas: torch.Tensor, limit: int, where: str = "an image") -> torch.Tensor:
    """Indices of the ``limit`` largest instances (by ``areas`` [N]), in their original order;
    logs how many were dropped.  All of them when N <= limit."""
    if areas.numel() <= limit:
        return torch.arange(areas.numel())
    keep = torch.sort(torch.topk(areas.float(), limit, sorted=False).indices).values
    log.warning("%s has %d instances: kept the %d largest, dropped %d (max_gt_instances)",
                where, areas.numel(), limit, areas.numel() - limit)
    return keep


def random_rois(image_shape, count: int, gt_boxes: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ROIs for the heads without the RPN (``use_rpn_rois=False``; Matterport's
    ``generate_random_rois``): 90% of ``count`` spread over the gt boxes, each drawn with corners
    uniform in the box grown by its own size on every side (clipped to the image), the rest
    uniform over the image.  Each side is at least one pixel.

    image_shape: (H, W) molded image; gt_boxes: [G, (x1, y1, x2, y2)] molded-image pixels.
    Returns [count, (x1, y1, x2, y2)] float32 molded-image pixels.
    """
    h, w = image_shape
    gt_boxes = gt_boxes.detach().float().cpu()
    per_box = int(0.9 * count / len(gt_boxes)) if len(gt_boxes) else 0
    size = gt_boxes[:, 2:] - gt_boxes[:, :2]
    lo = torch.maximum(gt_boxes[:, :2] - size, torch.zeros(2)).repeat_interleave(per_box, dim=0)
    hi = torch.minimum(gt_boxes[:, 2:] + size, torch.tensor([w, h], dtype=torch.float32)).repeat_interleave(
        per_box, dim=0)
    rest = count - len(lo)
    lo = torch.cat([lo, torch.zeros(rest, 2)])
    hi = torch.cat([hi, torch.tensor([[w, h]], dtype=torch.float32).expand(rest, 2)])
    corners = lo[:, None, :] + torch.rand(count, 2, 2, generator=generator) * (hi - lo)[:, None, :]
    first, second = corners.min(dim=1).values.floor(), corners.max(dim=1).values.floor()
    second = torch.maximum(second, first + 1)
    return torch.cat([first, second], dim=1)
