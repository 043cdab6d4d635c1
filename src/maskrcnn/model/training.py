"""The training forward pass: mold images and targets, run the network, build targets, and
return the five losses.

    images, targets -> mold -> features -> RPN -> rpn targets + losses
                    -> proposals (no grad) -> detection targets -> box head -> class/bbox losses
                    -> mask head on the positive ROIs -> mask loss

The proposals use the training limits (``pre_nms_limit_training``, ``post_nms_rois_training``).
On CUDA the mask head's batch is padded to a multiple of ``mask_batch_bucket`` so that
cudnn.benchmark autotunes a few shapes, not one per step; the padding has no loss or gradient.

Targets are built in molded-image pixels (``targets.py``), whatever the model's box frame.

Molding has a per-image part, :func:`prepare_training_item` (Matterport's resize of the image and
of its masks, mini masks, the random crop: the step's dearest CPU work), which the trainer runs in
its DataLoader workers, and a batched part, :func:`mold_training_batch` (normalise, pad, stack on
the device), which runs in the step.  ``model(images, targets)`` takes raw items too and then does
both in the step; the numbers are the same either way.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import boxes as box_ops
from ..config import MASK_BATCH_BUCKET_CUDA
from ..device import device_constant
from ..errors import DataError
from . import losses as L
from .preprocess import (ImageMeta, as_chw_uint8, as_hwc_uint8, mold_images, mold_resized_images,
                         resize_bilinear_uint8, resize_matterport, torchvision_scale, torchvision_size)
from .targets import (DetectionTargets, build_rpn_targets_batch, keep_largest, minimize_masks, random_rois,
                      sample_detection_targets_batch)


def to_pixels(model, boxes: torch.Tensor, image_shape) -> torch.Tensor:
    """Boxes in the model's frame -> molded-image pixels."""
    return box_ops.denormalize_boxes(boxes, *image_shape) if model.config.box_frame == "normalized" else boxes


def to_frame(model, boxes: torch.Tensor, image_shape) -> torch.Tensor:
    """Molded-image pixels -> the model's box frame."""
    return box_ops.normalize_boxes(boxes, *image_shape) if model.config.box_frame == "normalized" else boxes


def mold_target(target: dict, meta: ImageMeta, image_shape, device, max_instances: int | None = None,
                mini_mask_shape=None) -> dict:
    """Move one image's ground truth into the molded batch frame: :func:`scale_target`, then
    :func:`place_target` in the batch's ``image_shape`` (H, W).

    target: ``masks`` [N, h, w] (bool/uint8, original image) or ``mini_masks`` [N, mh, mw]
    (:func:`~maskrcnn.model.targets.minimize_masks`, with ``boxes``), ``labels`` [N], optional
    ``boxes`` [N, (x1, y1, x2, y2)] original pixels and ``iscrowd`` [N].
    max_instances: keep only this many, the largest (``max_gt_instances``).
    mini_mask_shape: minimize full masks to this (h, w) before molding (``use_mini_mask``).
    Returns masks [N, H, W] bool (or mini masks [N, mh, mw], ``mini`` True), boxes [N, 4]
    molded pixels, labels [N] int64, crowd [N] bool.
    """
    return place_target(scale_target(target, meta, device, max_instances, mini_mask_shape), image_shape)


def scale_target(target: dict, meta: ImageMeta, device=None, max_instances: int | None = None,
                 mini_mask_shape=None) -> dict:
    """The per-image, batch-independent part of :func:`mold_target` (arguments as there;
    ``device`` None leaves tensors where they are): the ``max_instances`` largest instances,
    their masks minimized (``mini_mask_shape``) or resized by nearest neighbour to the image's
    window in the molded image, the boxes scaled and shifted into molded pixels.

    Returns masks [N, y2 - y1, x2 - x1] bool (the window's size; or mini masks [N, mh, mw],
    ``mini`` True), boxes [N, (x1, y1, x2, y2)] float32 molded pixels (of an empty mask
    (0, 0, 0, 0), as :func:`~maskrcnn.boxes.masks_to_boxes` gives it), labels [N] int64, crowd
    [N] bool, and ``meta``.
    """
    mini = "mini_masks" in target
    masks = torch.as_tensor(target["mini_masks"] if mini else target["masks"], device=device)
    h, w = meta.original_shape
    if masks.dim() != 3 or (not mini and tuple(masks.shape[1:]) != (h, w)):
        raise DataError(f"target masks of shape {tuple(masks.shape)} do not fit the {h}x{w} image")
    labels = torch.as_tensor(target["labels"], device=device).long().reshape(-1)
    n = labels.shape[0]
    if masks.shape[0] != n:
        raise DataError(f"{masks.shape[0]} masks but {n} labels in a target")
    if mini and target.get("boxes") is None:
        raise DataError("a target with mini_masks needs the boxes they span")
    if "iscrowd" in target:
        crowd = torch.as_tensor(target["iscrowd"], device=device).bool().reshape(-1)
    else:  # made where the masks are: a CPU tensor copied to a GPU makes the host wait (seen on an H200)
        crowd = torch.zeros(n, dtype=torch.bool, device=masks.device)
    if (max_instances and n > max_instances) or (mini_mask_shape is not None and not mini):
        target = select_instances(target, masks, labels, crowd, max_instances, mini_mask_shape, mini)
        return scale_target(target, meta, device)
    y1, x1, y2, x2 = meta.window
    scaled = dict(labels=labels, crowd=crowd, mini=mini, image_meta=meta)
    if mini:
        return dict(scaled, masks=masks.bool(), boxes=scale_boxes(target["boxes"], meta, masks.device))
    if n == 0:
        resized = torch.zeros(0, y2 - y1, x2 - x1, dtype=torch.bool, device=masks.device)
    elif (y2 - y1, x2 - x1) != (h, w):
        resized = F.interpolate(masks[None].float(), size=(y2 - y1, x2 - x1), mode="nearest")[0] > 0.5
    else:
        resized = masks.bool()
    if target.get("boxes") is not None and n:
        boxes = scale_boxes(target["boxes"], meta, masks.device)
    else:
        boxes = box_ops.masks_to_boxes(resized)  # an empty mask's (0, 0, 0, 0) stays: not shifted
        shift = device_constant((x1, y1, x1, y1), boxes.device)
        boxes = torch.where(resized.flatten(1).any(dim=1)[:, None], boxes + shift, boxes)
    return dict(scaled, masks=resized, boxes=boxes)


def scale_boxes(boxes, meta: ImageMeta, device) -> torch.Tensor:
    """[N, (x1, y1, x2, y2)] original-image pixels -> float32 pixels of the molded image
    (scaled to the window of ``meta``, shifted by its corner)."""
    y1, x1, y2, x2 = meta.window
    h, w = meta.original_shape
    sx, sy = (x2 - x1) / w, (y2 - y1) / h
    boxes = torch.as_tensor(boxes, device=device, dtype=torch.float32).reshape(-1, 4)
    return boxes * device_constant((sx, sy, sx, sy), boxes.device) + device_constant((x1, y1, x1, y1), boxes.device)


def place_target(scaled: dict, image_shape) -> dict:
    """A :func:`scale_target` dict in a batch molded to ``image_shape`` (H, W): full masks
    [N, H, W] bool, zero outside the image's window (mini masks as they are).  Returns masks,
    boxes, labels, crowd and mini as :func:`mold_target`."""
    out = {k: scaled[k] for k in ("boxes", "labels", "crowd", "mini")}
    if scaled["mini"]:
        return dict(out, masks=scaled["masks"])
    y1, x1, y2, x2 = scaled["image_meta"].window
    masks = scaled["masks"]
    full = torch.zeros(masks.shape[0], *image_shape, dtype=torch.bool, device=masks.device)
    full[:, y1:y2, x1:x2] = masks
    return dict(out, masks=full)


def select_instances(target: dict, masks, labels, crowd, max_instances, mini_mask_shape, mini: bool) -> dict:
    """``target`` (original frame) limited to the ``max_instances`` largest instances, its full
    masks minimized to ``mini_mask_shape`` when given; returns a target :func:`mold_target` takes."""
    boxes = target.get("boxes")
    boxes = box_ops.masks_to_boxes(masks.bool()) if boxes is None else torch.as_tensor(boxes).reshape(-1, 4).float()
    boxes = boxes.to(masks.device)
    if max_instances and len(labels) > max_instances:
        if mini:
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * masks.flatten(1).float().mean(1)
        else:
            areas = masks.flatten(1).sum(1)
        keep = keep_largest(areas.cpu(), max_instances, f"image {target.get('image_id', '?')}").to(masks.device)
        masks, labels, crowd, boxes = masks[keep], labels[keep], crowd[keep], boxes[keep]
    out = {"labels": labels, "iscrowd": crowd, "boxes": boxes}
    if mini:
        out["mini_masks"] = masks
    elif mini_mask_shape is not None:
        out["mini_masks"] = minimize_masks(masks.bool(), boxes, mini_mask_shape)  # on their device
    else:
        out["masks"] = masks
    return out


def random_crop(image, target: dict, min_dim: int, min_scale: float = 0):
    """Matterport's "crop" resize mode for training: scale the image so its short side is at
    least ``min_dim`` (and by at least ``min_scale``), then take a random ``min_dim`` x ``min_dim``
    square (position from torch's global generator, so a seeded run repeats it).  The target's
    masks are scaled by nearest neighbour and cut the same way (reading only the rows and
    columns inside the square), its boxes recomputed, and instances left without a pixel dropped.

    image: [H, W, 3] uint8 numpy or [3, H, W] uint8 tensor; target as :func:`mold_target`
    with full ``masks``.  Returns ([min_dim, min_dim, 3] uint8 numpy, target).
    """
    image = as_hwc_uint8(image)
    h, w = image.shape[:2]
    scale = max(1, min_dim / min(h, w))
    if min_scale and scale < min_scale:
        scale = min_scale
    if scale != 1:
        image = resize_bilinear_uint8(image, round(h * scale), round(w * scale))
    big_h, big_w = image.shape[:2]
    y = int(torch.randint(0, big_h - min_dim + 1, ()))
    x = int(torch.randint(0, big_w - min_dim + 1, ()))
    rows = torch.div(torch.arange(y, y + min_dim) * h, big_h, rounding_mode="floor").clamp(max=h - 1)
    cols = torch.div(torch.arange(x, x + min_dim) * w, big_w, rounding_mode="floor").clamp(max=w - 1)
    masks = torch.as_tensor(target["masks"]).bool()
    masks = masks[:, rows.to(masks.device)][:, :, cols.to(masks.device)]
    keep = masks.flatten(1).any(dim=1)
    out = {k: v for k, v in target.items() if k not in ("masks", "boxes")}
    out["masks"] = masks[keep]
    out["labels"] = torch.as_tensor(target["labels"]).reshape(-1)[keep.cpu()]
    if "iscrowd" in target:
        out["iscrowd"] = torch.as_tensor(target["iscrowd"]).reshape(-1)[keep.cpu()]
    return np.ascontiguousarray(image[y:y + min_dim, x:x + min_dim]), out


def prepare_training_item(image, target: dict, config, device=None) -> tuple[torch.Tensor, dict]:
    """The per-image part of a training step's preparation, done where the item is loaded (a
    DataLoader worker; :meth:`maskrcnn.engine.trainer.SeededItems`), so that the step only
    normalises, pads and stacks (:func:`mold_training_batch`).  Matterport's data generator
    (``load_image_gt``) resizes there too.

    image: [3, H, W] uint8 tensor or [H, W, 3] uint8 numpy; target as :func:`mold_target`;
    config: the model's ``Config``; device: where the target's tensors go (None: where they are).
    "crop" mode first takes :func:`random_crop` (its position drawn from torch's global
    generator: under ``SeededItems`` the item's own (seed, epoch, position) stream).
    Returns (image, target):

    * image: Matterport modes: resized and padded as :func:`~.preprocess.resize_matterport`,
      [3, H', W'] uint8 contiguous, on the CPU.  Torchvision mode: the image unchanged (its
      normalise-then-resize runs on the step's device, ``mold_torchvision``).
    * target: :func:`scale_target`'s dict (masks at the window's size or mini masks, boxes in
      molded pixels, ``image_meta`` the :class:`~.preprocess.ImageMeta`), which marks it prepared.
    """
    mini_shape = config.mini_mask_shape if config.use_mini_mask else None
    if config.image_resize_mode == "crop":
        image, target = random_crop(image, target, config.image_min_dim, config.image_min_scale)
    if config.image_resize_mode == "torchvision":
        image = as_chw_uint8(image)
        h, w = image.shape[-2:]
        scale = torchvision_scale(h, w, config.image_min_dim, config.image_max_dim)
        meta = ImageMeta((int(h), int(w)), (0, 0, *torchvision_size(h, w, scale)), scale)
    else:
        arr = as_hwc_uint8(image)
        resized, window, scale = resize_matterport(arr, config.image_resize_mode, config.image_min_dim,
                                                   config.image_max_dim, config.image_min_scale)
        image = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
        meta = ImageMeta(tuple(int(v) for v in arr.shape[:2]), tuple(int(v) for v in window), scale)
    return image, scale_target(target, meta, device, config.max_gt_instances, mini_shape)


def is_prepared(target: dict) -> bool:
    """True for a target :func:`prepare_training_item` made."""
    return "image_meta" in target


def mold_training_batch(model, images, targets) -> tuple[torch.Tensor, list[ImageMeta], list[dict]]:
    """The batched part of a training step's preparation: items that are not prepared yet are
    prepared here (:func:`prepare_training_item`, as on a direct ``model(images, targets)``
    call), then the images are normalised and padded into one batch on the model's device and
    each target's masks placed in the batch's frame (:func:`place_target`).

    images: list of [3, H, W] uint8 tensors (or [H, W, 3] uint8 numpy), raw or prepared.
    targets: list of dicts as in :func:`mold_target`, or prepared.
    Returns (batch [N, 3, H, W] float32, one ImageMeta per image, targets as :func:`mold_target`).
    """
    cfg = model.config
    device = model.device
    images, targets = zip(*[(im, t) if is_prepared(t) else prepare_training_item(im, t, cfg, device)
                            for im, t in zip(images, targets)])
    metas = [t["image_meta"] for t in targets]
    if cfg.image_resize_mode == "torchvision":
        batch, molded = mold_images(images, cfg, device)
        if [m.window for m in molded] != [m.window for m in metas]:
            raise DataError(f"prepared targets for windows {[m.window for m in metas]} do not fit the images "
                            f"molded to {[m.window for m in molded]}")
    else:
        batch = mold_resized_images(images, cfg, device)
    image_shape = tuple(batch.shape[-2:])
    return batch, metas, [place_target(t, image_shape) for t in targets]


def training_losses(model, images, targets) -> dict[str, torch.Tensor]:
    """The five losses of one batch, each multiplied by ``config.loss_weights``.

    images: list of [3, H, W] uint8 tensors (or [H, W, 3] uint8 numpy), raw or prepared by
    :func:`prepare_training_item`; targets: list of dicts as in :func:`mold_target`, or prepared.
    """
    batch, metas, gts = mold_training_batch(model, images, targets)
    return batch_losses(model, batch, metas, gts)


def batch_losses(model, batch: torch.Tensor, metas: list[ImageMeta], gts: list[dict]) -> dict[str, torch.Tensor]:
    """:func:`training_losses` of a molded batch ([N, 3, H, W], its metas and targets as
    :func:`mold_training_batch` returns them)."""
    cfg = model.config
    device = model.device
    image_shape = tuple(batch.shape[-2:])
    # torchvision keeps 2000 anchors a level before NMS in training and 1000 at inference: with
    # 1000 in training the cut at 2000 proposals fell elsewhere and the heads' positives differed
    # from torchvision's on the same weights (2 images of 800x1066 with 8 ellipses: 14 and 27
    # against 8 and 9; equal with 2000).  Hence pre_nms_limit_training.
    stage = model.first_stage(batch, metas, cfg.post_nms_rois_training if cfg.use_rpn_rois else None,
                              cfg.pre_nms_limit_training)
    losses = rpn_losses(model, stage, gts, image_shape)
    if cfg.use_rpn_rois:
        proposals = [to_pixels(model, p, image_shape) for p in stage.proposals]
    else:
        proposals = [random_rois(image_shape, cfg.post_nms_rois_training, g["boxes"][~g["crowd"]]).to(device)
                     for g in gts]
    losses.update(head_losses(model, stage.features, proposals, gts, image_shape))
    return {k: v * cfg.loss_weights[k] for k, v in losses.items()}


def rpn_losses(model, stage, gts: list[dict], image_shape) -> dict[str, torch.Tensor]:
    """``rpn_class_loss`` and ``rpn_bbox_loss`` (unweighted) of a batch: the anchors of
    ``stage`` (:meth:`MaskRCNN.first_stage`) labelled and sampled against each image's
    ground truth (``gts``, :func:`mold_target`'s dicts) in molded pixels."""
    cfg = model.config
    anchors_px = to_pixels(model, stage.anchors, image_shape)
    targets = build_rpn_targets_batch(
        anchors_px, [g["boxes"] for g in gts], [g["crowd"] for g in gts], cfg.rpn_train_anchors_per_image,
        cfg.rpn_positive_ratio, cfg.rpn_positive_iou, cfg.rpn_negative_iou, box_ops.std_xy(cfg.rpn_bbox_std_dev))
    return {"rpn_class_loss": L.rpn_class_loss(stage.rpn_logits, targets.labels, model.rpn.kind, targets.sampled),
            "rpn_bbox_loss": L.rpn_bbox_loss(stage.rpn_deltas, targets.deltas, targets.labels, targets.positive)}


def head_losses(model, features, proposals: list[torch.Tensor], gts: list[dict], image_shape) -> dict[str, torch.Tensor]:
    """``mrcnn_class_loss``, ``mrcnn_bbox_loss`` and ``mrcnn_mask_loss`` (unweighted) of a batch:
    ROIs sampled from each image's ``proposals`` ([P_i, 4] molded pixels) with their targets,
    the box head on all of them, the mask head on the positive ones (their batch padded with
    :func:`pad_to_bucket`, the padding's logits dropped before the loss)."""
    cfg = model.config

    def sample(props, images):
        return sample_detection_targets_batch(
            props, [g["boxes"] for g in images], [g["labels"] for g in images], [g["masks"] for g in images],
            [g["crowd"] for g in images], cfg.train_rois_per_image, cfg.roi_positive_ratio, cfg.roi_positive_iou,
            cfg.roi_negative_iou, box_ops.std_xy(cfg.bbox_std_dev), cfg.mask_shape, mini_masks=images[0]["mini"])
    if len({(bool(g["mini"]), tuple(g["masks"].shape[1:])) for g in gts}) == 1:
        targets = sample(proposals, gts)
    else:  # a target's own mini masks among full ones (or of another shape): image by image
        targets = DetectionTargets.cat([sample([p], [g]) for p, g in zip(proposals, gts)])
    rois = to_frame(model, targets.rois, image_shape).split([size for size, _ in targets.counts])
    class_logits, box_deltas = model.classify(features, list(rois), image_shape)
    losses = {"mrcnn_class_loss": L.mrcnn_class_loss(class_logits, targets.labels),
              "mrcnn_bbox_loss": L.mrcnn_bbox_loss(box_deltas, targets.deltas, targets.labels,
                                                   targets.positive_rows)}

    # each image's positives are its first ROIs: sliced, not picked by labels > 0 (a GPU wait each)
    pos_rois = [r[:n] for r, (_, n) in zip(rois, targets.counts)]
    pos_labels, pos_masks = targets.positive_labels, targets.positive_masks
    if pos_labels.numel():
        bucket = mask_batch_bucket(cfg.mask_batch_bucket, class_logits.device, model.mask_head)
        mask_logits = model.mask_logits(features, pad_to_bucket(pos_rois, bucket), image_shape)
        mask_logits = mask_logits[:pos_labels.numel()]  # the padding's rows: no loss, no gradient
        # every row is a positive: no need to find them
        every = torch.arange(pos_labels.numel(), device=pos_labels.device)
        losses["mrcnn_mask_loss"] = L.mrcnn_mask_loss(mask_logits, pos_masks, pos_labels, every)
    else:
        losses["mrcnn_mask_loss"] = (class_logits.sum() + sum(p.sum() for p in model.mask_head.parameters())) * 0.0
    return losses


def mask_batch_bucket(setting: int | None, device: torch.device, mask_head: torch.nn.Module) -> int:
    """The multiple the mask head's ROI batch is padded to: ``setting`` (``mask_batch_bucket``),
    or when None ``MASK_BATCH_BUCKET_CUDA`` on CUDA and 1 (no padding) elsewhere.  Always 1 when
    the head has BatchNorm computing batch statistics, which padded rows would shift."""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in mask_head.modules()):
        return 1
    if setting is None:
        return MASK_BATCH_BUCKET_CUDA if torch.device(device).type == "cuda" else 1
    return setting


def pad_to_bucket(rois: list[torch.Tensor], bucket: int) -> list[torch.Tensor]:
    """Per-image ROIs [R_i, 4] (any frame) with copies of the batch's first ROI appended to the
    last image's, so that sum R_i is a multiple of ``bucket``; the real ROIs keep their rows
    (the first sum R_i of the pooled batch).  Unchanged when already a multiple or empty."""
    total = sum(r.shape[0] for r in rois)
    extra = -total % bucket
    if total == 0 or extra == 0:
        return rois
    first = next(r[:1] for r in rois if r.shape[0])
    return [*rois[:-1], torch.cat([rois[-1], first.expand(extra, -1)])]
