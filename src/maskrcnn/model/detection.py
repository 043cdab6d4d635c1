"""DetectionLayer (final boxes, classes, scores), and back to the original image.

``detect_boxes`` turns classifier outputs over the proposals into at most
``detection_max_instances`` detections; ``unmold`` maps them from the molded batch to the
original image, where ``paste_masks_matterport`` / ``paste_masks_torchvision`` resample the
28x28 mask of each detection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..boxes import apply_box_deltas, batched_nms, clip_boxes, normalize_boxes
from ..device import to_device
from ..structures import Detections


def stable_score_order(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``candidates`` (indices into scores) sorted by descending score; equal scores keep the
    lower index first (TF ``top_k`` over a sorted index set)."""
    candidates = candidates.sort().values
    return candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]


def detect_boxes(rois: torch.Tensor, class_logits: torch.Tensor, deltas: torch.Tensor,
                 window: torch.Tensor, std, mode: str = "argmax", min_confidence: float = 0.0,
                 nms_threshold: float = 0.3, max_instances: int = 100, min_size: float = 0.0,
                 clip_log_size=None):
    """DetectionLayer for one image.

    rois:         [R, (x1, y1, x2, y2)] proposals in the model's box frame.
    class_logits: [R, num_classes].
    deltas:       [R, num_classes, (dx, dy, log dw, log dh)] before multiplying by ``std``.
    window:       [(x1, y1, x2, y2)] the image's real content, same frame; boxes are clipped to it.
    mode:         "argmax": each ROI's best class only, kept if its score >= min_confidence
                  (skipped when min_confidence is 0, as Matterport does); "all_classes": every
                  (ROI, class) pair with score > min_confidence (torchvision).
    Returns (boxes [D, 4], class_ids [D] int64, scores [D]), sorted by descending score; per-class
    NMS at ``nms_threshold``; D <= max_instances.
    """
    probs = torch.softmax(class_logits, dim=1)
    r, num_classes = probs.shape
    if mode == "argmax":
        class_ids = probs.argmax(dim=1)
        scores = probs[torch.arange(r, device=probs.device), class_ids]
        boxes = apply_box_deltas(rois, deltas[torch.arange(r, device=probs.device), class_ids], std,
                                 clip_log_size)
        boxes = clip_boxes(boxes, window)
        keep = class_ids > 0
        if min_confidence:
            keep &= scores >= min_confidence
    else:
        boxes = apply_box_deltas(rois[:, None, :].expand(-1, num_classes, -1), deltas, std, clip_log_size)
        boxes = clip_boxes(boxes, window)[:, 1:].reshape(-1, 4)
        scores = probs[:, 1:].reshape(-1)
        class_ids = torch.arange(1, num_classes, device=probs.device).repeat(r)
        keep = scores > min_confidence
    if min_size > 0:  # torchvision's remove_small_boxes, in the same mask: one wait for the GPU, not two
        keep &= ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    idx = torch.nonzero(keep).squeeze(1)
    kept = idx[batched_nms(boxes[idx], scores[idx], class_ids[idx], nms_threshold)]
    if mode == "argmax":
        kept = stable_score_order(scores, kept)
    kept = kept[:max_instances]
    return boxes[kept], class_ids[kept], scores[kept]


def paste_masks_matterport(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
                           threshold: float = 0.5) -> torch.Tensor:
    """Matterport's ``unmold_mask`` for each detection: resize the mask to its integer box with
    bilinear sampling that reads 0 outside the mask (skimage ``order=1, mode='constant'``), keep
    values >= threshold, paste.

    masks: [N, m, m] probabilities.  boxes: [N, (x1, y1, x2, y2)] integer pixels inside the image.
    Returns [N, H, W] bool.
    """
    h, w = image_shape
    out = torch.zeros(masks.shape[0], h, w, dtype=torch.bool, device=masks.device)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        bh, bw = y2 - y1, x2 - x1
        if bh <= 0 or bw <= 0:
            continue
        # Sample j of n along an axis of length m lies at (j + 0.5) * m / n - 0.5 (half-pixel);
        # grid_sample's align_corners=False maps grid g to (g + 1) * m / 2 - 0.5, so g = (2j+1)/n - 1.
        gy = (2 * torch.arange(bh, dtype=torch.float64, device=masks.device) + 1) / bh - 1
        gx = (2 * torch.arange(bw, dtype=torch.float64, device=masks.device) + 1) / bw - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        resized = F.grid_sample(masks[i][None, None].double(), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)[0, 0]
        out[i, y1:y2, x1:x2] = resized >= threshold
    return out


#: Float entries (masks x image pixels) the batched paste computes at a time: 16M floats, 64 MB
#: per temporary (16 masks of 800x1333 at once).
PASTE_BLOCK_ELEMENTS = 1 << 24


def paste_masks_torchvision(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
                            threshold: float = 0.5, padding: int = 1, batched: bool | None = None) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` followed by ``> threshold``.

    masks: [N, m, m] probabilities, on any device (the paste runs there).  boxes: [N, (x1, y1,
    x2, y2)] float pixels of the image, best on the CPU (their corners are read by the host).
    batched: paste all masks with a few kernels (:func:`_paste_batched`) rather than one
    ``interpolate`` per mask; None chooses it on CUDA, where a loop's launches (about 15 host
    calls a mask) set the time, and the loop on a CPU, where the batched form's full-image
    arithmetic is the slower one.
    Returns [N, H, W] bool on the masks' device.
    """
    n, m = masks.shape[0], masks.shape[-1]
    h, w = image_shape
    if n == 0:
        return torch.zeros(n, h, w, dtype=torch.bool, device=masks.device)
    scale = (m + 2 * padding) / m
    padded = F.pad(masks, (padding,) * 4)
    boxes = boxes.float()
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1).to(torch.int64)
    if batched if batched is not None else masks.device.type == "cuda":
        return _paste_batched(padded, expanded.cpu(), (h, w), threshold)
    out = torch.zeros(n, h, w, dtype=torch.bool, device=masks.device)
    for i, (bx1, by1, bx2, by2) in enumerate(expanded.tolist()):
        bw, bh = max(bx2 - bx1 + 1, 1), max(by2 - by1 + 1, 1)
        resized = F.interpolate(padded[i][None, None], size=(bh, bw), mode="bilinear",
                                align_corners=False)[0, 0]
        x0, x1 = max(bx1, 0), min(bx2 + 1, w)
        y0, y1 = max(by1, 0), min(by2 + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        out[i, y0:y1, x0:x1] = resized[y0 - by1:y1 - by1, x0 - bx1:x1 - bx1] > threshold
    return out


def _axis_samples(first: torch.Tensor, last: torch.Tensor, source: int, length: int):
    """Where ``F.interpolate(mode="bilinear", align_corners=False)`` samples along one axis when
    each mask's ``source`` pixels are stretched over image pixels first..last (inclusive, [N]
    int64 on the CPU; at least one pixel wide): for every image pixel t < ``length``, the two source
    indices [N, L] int64, their weights [N, L] float32 and whether t is inside the box [N, L]
    bool.  The arithmetic is the kernel's, step by step in float32: scale = source / size,
    position = max(scale * (t - first + 0.5) - 0.5, 0), index = int(position), weight =
    position - index (and 1 - that), the second index clamped to the last source pixel."""
    t = torch.arange(length, device=first.device)
    size = (last - first + 1).clamp(min=1)
    offset = t[None, :] - first[:, None]
    position = (source / size.to(torch.float32))[:, None] * (offset.to(torch.float32) + 0.5) - 0.5
    position = position.clamp(min=0)
    low = position.to(torch.int64)
    weight_high = position - low.to(torch.float32)
    high = low + (low < source - 1).to(torch.int64)
    inside = (offset >= 0) & (t[None, :] <= last[:, None])
    return low.clamp(max=source - 1), high.clamp(max=source - 1), 1 - weight_high, weight_high, inside


def _paste_batched(padded: torch.Tensor, expanded: torch.Tensor, image_shape: tuple[int, int],
                   threshold: float) -> torch.Tensor:
    """The per-mask ``interpolate`` paste of :func:`paste_masks_torchvision` for all masks at
    once: each padded mask [N, S, S] resampled along x into every image column, then along y
    into every row (the kernel's separable order: rows first, each pair of taps weighted and
    summed), thresholded, and kept inside its expanded box [N, (x1, y1, x2, y2)] int64 (CPU).
    The sample positions and weights are worked out on the host, where the boxes are, and sent
    in three pinned copies, so the masks' device runs about 14 kernels a block of masks, not a
    few per mask.  Blocks bound the float temporaries to PASTE_BLOCK_ELEMENTS.
    Returns [N, H, W] bool."""
    h, w = image_shape
    n, source = padded.shape[0], padded.shape[-1]
    device = padded.device
    out = torch.empty(n, h, w, dtype=torch.bool, device=device)
    step = max(1, PASTE_BLOCK_ELEMENTS // (h * max(w, source)))
    for start in range(0, n, step):
        block, box = padded[start:start + step], expanded[start:start + step]
        k = block.shape[0]
        x_low, x_high, x_w0, x_w1, x_in = _axis_samples(box[:, 0], box[:, 2], source, w)
        y_low, y_high, y_w0, y_w1, y_in = _axis_samples(box[:, 1], box[:, 3], source, h)
        index = to_device(torch.cat([x_low, x_high, y_low, y_high], dim=1), device)
        weight = to_device(torch.cat([x_w0, x_w1, y_w0, y_w1], dim=1), device)
        inside = to_device(torch.cat([x_in, y_in], dim=1), device)
        x_low, x_high, y_low, y_high = index.split([w, w, h, h], dim=1)
        x_w0, x_w1, y_w0, y_w1 = weight.split([w, w, h, h], dim=1)
        x_in, y_in = inside.split([w, h], dim=1)
        rows = (x_w0[:, None, :] * block.gather(2, x_low[:, None, :].expand(k, source, w))
                + x_w1[:, None, :] * block.gather(2, x_high[:, None, :].expand(k, source, w)))  # [k, S, W]
        value = (y_w0[:, :, None] * rows.gather(1, y_low[:, :, None].expand(k, h, w))
                 + y_w1[:, :, None] * rows.gather(1, y_high[:, :, None].expand(k, h, w)))  # [k, H, W]
        out[start:start + step] = (value > threshold) & y_in[:, :, None] & x_in[:, None, :]
    return out


def unmold(det: dict, meta, image_shape, box_frame: str, mask_paste: str, mask_threshold: float) -> Detections:
    """One image's detections, from the frame of the molded batch to its original pixels.

    det: ``boxes`` [D, (x1, y1, x2, y2)] in the model's box frame (``box_frame``: "normalized"
    over the molded batch of ``image_shape`` (H, W), or its "pixel"s), ``class_ids`` [D],
    ``scores`` [D], ``mask_probs`` [D, m, m] (each detection's class mask).
    meta: the image's :class:`~maskrcnn.model.preprocess.ImageMeta`.
    mask_paste: "matterport" or "torchvision" (:func:`paste_masks_matterport`,
    :func:`paste_masks_torchvision`); masks are kept where the probability passes ``mask_threshold``.
    Returns :class:`Detections` on the CPU: boxes float32 original pixels, masks [D', h, w] bool.
    """
    h, w = meta.original_shape
    y1, x1, y2, x2 = meta.window
    # boxes, class ids and scores come to the host in one copy (one wait for the GPU, not three)
    host = torch.cat([det["boxes"].float(), det["class_ids"][:, None].float(), det["scores"].float()[:, None]],
                     dim=1).cpu()
    boxes, class_ids, scores = host[:, :4], host[:, 4].long(), host[:, 5]
    if box_frame == "normalized":
        # Matterport's unmold_detections: shift and scale by the normalized window, then
        # denorm_boxes on the original shape (round half to even), drop empty boxes.
        win = normalize_boxes(torch.tensor([x1, y1, x2, y2], dtype=torch.float64), *image_shape).float()
        shift = win[[0, 1, 0, 1]]
        scale = torch.stack([win[2] - win[0], win[3] - win[1]])[[0, 1, 0, 1]]
        boxes = ((boxes - shift) / scale).double()
        boxes = torch.round(boxes * torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=torch.float64)
                            + torch.tensor([0, 0, 1, 1], dtype=torch.float64))
        keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0
    else:
        # original / resized size per axis, divided in float32 as torchvision's postprocess
        ratio = torch.tensor([float(w), float(h)]) / torch.tensor([float(x2 - x1), float(y2 - y1)])
        boxes = (boxes - torch.tensor([x1, y1, x1, y1], dtype=torch.float32)) * ratio[[0, 1, 0, 1]]
        keep = None  # every box: no selection on the host nor on the GPU
    if keep is not None:
        boxes, class_ids, scores = boxes[keep], class_ids[keep], scores[keep]
    probs = det["mask_probs"].float()
    if mask_paste == "matterport":
        ib = boxes.round().long()
        ib[:, 0::2] = ib[:, 0::2].clamp(0, w)
        ib[:, 1::2] = ib[:, 1::2].clamp(0, h)
        full = paste_masks_matterport(probs.cpu() if keep is None else probs.cpu()[keep], ib, (h, w), mask_threshold)
    else:
        # pasted where the masks are, as torchvision does: on a GPU the small resizes are
        # kernels, not host work (100 masks into 800x1333 take 47 ms on 2 CPU cores)
        full = paste_masks_torchvision(probs if keep is None else probs[keep.to(probs.device)], boxes, (h, w),
                                       mask_threshold).cpu()
    return Detections(boxes.float(), class_ids, scores, full)
