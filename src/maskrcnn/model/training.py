"""The training forward pass: mold images and targets, run the network, build targets, and
return the five losses.

    images, targets -> mold -> features -> RPN -> rpn targets + losses
                    -> proposals (no grad) -> detection targets -> box head -> class/bbox losses
                    -> mask head on the positive ROIs -> mask loss

Targets are built in molded-image pixels (``targets.py``), whatever the model's box frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import boxes as box_ops
from ..errors import DataError
from . import losses as L
from .preprocess import ImageMeta, mold_images
from .targets import build_detection_targets, build_rpn_targets


def to_pixels(model, boxes: torch.Tensor, image_shape) -> torch.Tensor:
    """Boxes in the model's frame -> molded-image pixels."""
    return box_ops.denormalize_boxes(boxes, *image_shape) if model.config.box_frame == "normalized" else boxes


def to_frame(model, boxes: torch.Tensor, image_shape) -> torch.Tensor:
    """Molded-image pixels -> the model's box frame."""
    return box_ops.normalize_boxes(boxes, *image_shape) if model.config.box_frame == "normalized" else boxes


def mold_target(target: dict, meta: ImageMeta, image_shape, device) -> dict:
    """Move one image's ground truth into the molded batch frame.

    target: ``masks`` [N, h, w] (bool/uint8, original image), ``labels`` [N], optional ``boxes``
    [N, (x1, y1, x2, y2)] original pixels and ``iscrowd`` [N].
    Returns masks [N, H, W] bool, boxes [N, 4] molded pixels, labels [N] int64, crowd [N] bool.
    """
    masks = torch.as_tensor(target["masks"], device=device)
    h, w = meta.original_shape
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w):
        raise DataError(f"target masks of shape {tuple(masks.shape)} do not fit the {h}x{w} image")
    labels = torch.as_tensor(target["labels"], device=device).long().reshape(-1)
    n = labels.shape[0]
    if masks.shape[0] != n:
        raise DataError(f"{masks.shape[0]} masks but {n} labels in a target")
    crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(n)), device=device).bool().reshape(-1)
    y1, x1, y2, x2 = meta.window
    full = torch.zeros(n, *image_shape, dtype=torch.bool, device=device)
    if n:
        resized = masks.bool()
        if (y2 - y1, x2 - x1) != (h, w):
            resized = F.interpolate(masks[None].float(), size=(y2 - y1, x2 - x1), mode="nearest")[0] > 0.5
        full[:, y1:y2, x1:x2] = resized
    if target.get("boxes") is not None and n:
        sx, sy = (x2 - x1) / w, (y2 - y1) / h
        boxes = torch.as_tensor(target["boxes"], device=device, dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * boxes.new_tensor([sx, sy, sx, sy]) + boxes.new_tensor([x1, y1, x1, y1])
    else:
        boxes = box_ops.masks_to_boxes(full)
    return dict(masks=full, boxes=boxes, labels=labels, crowd=crowd)


def training_losses(model, images, targets) -> dict[str, torch.Tensor]:
    """The five losses of one batch, each multiplied by ``config.loss_weights``.

    images: list of [3, H, W] uint8 tensors (or [H, W, 3] uint8 numpy).
    targets: list of dicts as in :func:`mold_target`.
    """
    cfg = model.config
    device = model.device
    batch, metas = mold_images(images, cfg, device)
    image_shape = tuple(batch.shape[-2:])
    gts = [mold_target(t, m, image_shape, device) for t, m in zip(targets, metas)]

    features = model.features(batch)
    rpn_logits, rpn_deltas = model.rpn(features)
    anchors, level_sizes = model.anchors(image_shape, device)
    anchors_px = to_pixels(model, anchors, image_shape)

    rpn_labels, rpn_targets = zip(*[
        build_rpn_targets(anchors_px, g["boxes"], g["crowd"], cfg.rpn_train_anchors_per_image,
                          cfg.rpn_positive_ratio, cfg.rpn_positive_iou, cfg.rpn_negative_iou,
                          box_ops.std_xy(cfg.rpn_bbox_std_dev)) for g in gts])
    rpn_labels, rpn_targets = torch.stack(rpn_labels), torch.stack(rpn_targets)
    losses = {"rpn_class_loss": L.rpn_class_loss(rpn_logits, rpn_labels),
              "rpn_bbox_loss": L.rpn_bbox_loss(rpn_deltas, rpn_targets, rpn_labels)}

    with torch.no_grad():
        windows = [model.proposal_window(m, image_shape, device) for m in metas]
        proposals = model.propose(rpn_logits.detach(), rpn_deltas.detach(), anchors, level_sizes, windows,
                                  cfg.post_nms_rois_training)
    rois, labels, deltas, masks = [], [], [], []
    for (p, _), g in zip(proposals, gts):
        r, lab, d, m = build_detection_targets(
            to_pixels(model, p, image_shape), g["boxes"], g["labels"], g["masks"], g["crowd"],
            cfg.train_rois_per_image, cfg.roi_positive_ratio, cfg.roi_positive_iou, cfg.roi_negative_iou,
            box_ops.std_xy(cfg.bbox_std_dev), cfg.mask_shape)
        rois.append(to_frame(model, r, image_shape))
        labels.append(lab)
        deltas.append(d)
        masks.append(m)
    class_logits, box_deltas = model.classify(features, rois, image_shape)
    labels_all = torch.cat(labels)
    losses["mrcnn_class_loss"] = L.mrcnn_class_loss(class_logits, labels_all)
    losses["mrcnn_bbox_loss"] = L.mrcnn_bbox_loss(box_deltas, torch.cat(deltas), labels_all)

    positive = [lab > 0 for lab in labels]
    pos_rois = [r[p] for r, p in zip(rois, positive)]
    pos_labels = labels_all[labels_all > 0]
    pos_masks = torch.cat([m[p] for m, p in zip(masks, positive)])
    if pos_labels.numel():
        mask_logits = model.mask_logits(features, pos_rois, image_shape)
        losses["mrcnn_mask_loss"] = L.mrcnn_mask_loss(mask_logits, pos_masks, pos_labels)
    else:
        losses["mrcnn_mask_loss"] = (class_logits.sum() + sum(p.sum() for p in model.mask_head.parameters())) * 0.0
    return {k: v * cfg.loss_weights[k] for k, v in losses.items()}
