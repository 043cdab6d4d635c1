"""Mask R-CNN, wired stage by stage.

    images -> mold -> ResNet -> FPN [P2..P6] -> RPN -> ProposalLayer -> PyramidROIAlign
           -> BoxHead -> DetectionLayer -> PyramidROIAlign -> MaskHead -> full-size masks

``MaskRCNN.forward(images, targets)`` returns the training losses; ``MaskRCNN.detect(images)``
returns one :class:`maskrcnn.Detections` per image.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from .. import boxes as box_ops
from ..config import Config
from ..structures import Detections
from .anchors import pyramid_anchors, torchvision_strides
from .backbone import FPN, ResNet
from .detection import detect_boxes, paste_masks_matterport, paste_masks_torchvision
from .heads import BoxHead, MaskHead
from .preprocess import ImageMeta, mold_images
from .proposals import propose_global, propose_per_level
from .roi_align import pyramid_roi_align
from .rpn import RPNHead, foreground_scores


#: Matterport's ``layers=`` regimes, as regular expressions over our module names.
LAYER_REGIMES = {
    "heads": r"(fpn|rpn|box_head|mask_head)\..*",
    "3+": r"(backbone\.layer[234]|fpn|rpn|box_head|mask_head)\..*",
    "4+": r"(backbone\.layer[34]|fpn|rpn|box_head|mask_head)\..*",
    "5+": r"(backbone\.layer4|fpn|rpn|box_head|mask_head)\..*",
    "all": r".*",
}


class MaskRCNN(nn.Module):
    """Mask R-CNN with a ResNet-FPN backbone.

    config: a :class:`maskrcnn.Config`; ``num_classes`` counts the background.
    class_names: optional names, index = class id (0 = "BG").
    category_ids: optional dataset category id of each class id (index 0, the background, 0),
        e.g. COCO's 1..90 with gaps: what ``detect`` and ``evaluate`` write in results files.
    mode, model_dir: Matterport's constructor keywords: mode "training" or "inference" (both
        can train and detect here; it only sets train/eval mode), model_dir the folder
        :meth:`fit` writes its run folder into (default "logs").
    """

    def __init__(self, config: Config | None = None, class_names: list[str] | None = None,
                 category_ids: list | None = None, *, mode: str | None = None, model_dir=None):
        super().__init__()
        config = config or Config()
        self.config = config
        self.class_names = list(class_names) if class_names else None
        self.category_ids = list(category_ids) if category_ids else None
        # Matterport's MaskRCNN(mode, config, model_dir): where fit() puts its run folder
        # (log_dir, set by the first fit) and how many epochs it has trained.
        self.model_dir, self.log_dir, self.epoch = model_dir, None, 0
        c = config.top_down_pyramid_size
        self.backbone = ResNet(config.backbone, config.backbone_style, config.train_bn)
        self.fpn = FPN(self.backbone.out_channels, c)
        self.rpn = RPNHead(c, config.rpn_conv_channels, len(config.rpn_anchor_ratios), config.rpn_objectness)
        self.box_head = BoxHead(c, config.pool_size, config.num_classes, config.fpn_classif_fc_layers_size,
                                config.box_head, config.train_bn, config.head_bn_eps)
        self.mask_head = MaskHead(c, config.num_classes, config.mask_head_channels, config.mask_head_bn, config.train_bn,
                                  config.head_bn_eps)
        self._anchor_cache: dict = {}
        if mode not in (None, "training", "inference"):
            raise ValueError(f"mode={mode!r}: expected 'training' or 'inference'")
        self.train(mode != "inference")

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def anchors(self, image_shape: tuple[int, int], device) -> tuple[torch.Tensor, list[int]]:
        """Anchors for a molded batch of ``image_shape`` (H, W), in the model's box frame.
        Returns ([A, (x1, y1, x2, y2)] float32, anchors per level)."""
        key = (tuple(image_shape), str(device))
        if key not in self._anchor_cache:
            cfg = self.config
            shapes = [(-(-image_shape[0] // s), -(-image_shape[1] // s)) for s in cfg.backbone_strides]
            strides = (torchvision_strides(image_shape, shapes) if cfg.anchor_style == "torchvision"
                       else cfg.backbone_strides)
            px = pyramid_anchors(cfg.rpn_anchor_scales, cfg.rpn_anchor_ratios, strides,
                                 shapes, cfg.rpn_anchor_stride, cfg.anchor_style)
            if cfg.box_frame == "normalized":
                px = box_ops.normalize_boxes(px, *image_shape)
            sizes = [len(range(0, h, cfg.rpn_anchor_stride)) * len(range(0, w, cfg.rpn_anchor_stride))
                     * len(cfg.rpn_anchor_ratios) for h, w in shapes]
            self._anchor_cache = {key: (px.float().to(device), sizes)}
        return self._anchor_cache[key]

    def frame_window(self, meta: ImageMeta, image_shape: tuple[int, int], device) -> torch.Tensor:
        """The image's real content (x1, y1, x2, y2) in the model's box frame."""
        y1, x1, y2, x2 = meta.window
        w = torch.tensor([x1, y1, x2, y2], dtype=torch.float32, device=device)
        if self.config.box_frame == "normalized":
            w = box_ops.normalize_boxes(w, *image_shape)
        return w

    def proposal_window(self, meta: ImageMeta, image_shape, device) -> torch.Tensor:
        """Where proposals are clipped: the whole molded image (normalized frame, as Matterport)
        or the image's content (pixel frame, as torchvision)."""
        if self.config.box_frame == "normalized":
            return torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
        return self.frame_window(meta, image_shape, device)

    # ------------------------------------------------------------------ stages
    def features(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] molded images -> [P2, P3, P4, P5, P6]."""
        return self.fpn(self.backbone(batch))

    def propose(self, rpn_logits, rpn_deltas, anchors, level_sizes, windows, count: int):
        """ProposalLayer over a batch: list of (boxes [P_i, 4] in frame, scores [P_i])."""
        cfg = self.config
        std = box_ops.std_xy(cfg.rpn_bbox_std_dev)
        out = []
        for i in range(rpn_deltas.shape[0]):
            if cfg.proposal_selection == "global":
                scores = foreground_scores(rpn_logits[i:i + 1])[0]
                out.append(propose_global(scores, rpn_deltas[i], anchors, windows[i], cfg.pre_nms_limit, count,
                                          cfg.rpn_nms_threshold, std, cfg.bbox_decode_clip, cfg.rpn_min_size))
            else:
                logits = rpn_logits[i] if rpn_logits.dim() == 2 else rpn_logits[i, :, 1] - rpn_logits[i, :, 0]
                out.append(propose_per_level(logits, rpn_deltas[i], anchors, windows[i], level_sizes,
                                             cfg.pre_nms_limit, count, cfg.rpn_nms_threshold, std,
                                             cfg.bbox_decode_clip, cfg.rpn_min_size))
        return out

    def roi_features(self, features, rois: list[torch.Tensor], size: int, image_shape) -> torch.Tensor:
        """PyramidROIAlign over P2..P5 of a batch molded to ``image_shape`` (H, W):
        [sum R_i, C, size, size]."""
        cfg = self.config
        return pyramid_roi_align(features[:4], rois, size, image_shape, cfg.backbone_strides[:4],
                                 cfg.roi_pooling, cfg.roi_sampling_ratio)

    def classify(self, features, rois: list[torch.Tensor], image_shape):
        """Box head on each image's ROIs: (logits [sum R_i, C], deltas [sum R_i, C, 4])."""
        return self.box_head(self.roi_features(features, rois, self.config.pool_size, image_shape))

    def mask_logits(self, features, boxes: list[torch.Tensor], image_shape) -> torch.Tensor:
        """Mask head on boxes: [sum D_i, num_classes, 2*mask_pool, 2*mask_pool] logits."""
        return self.mask_head(self.roi_features(features, boxes, self.config.mask_pool_size, image_shape))

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def detect(self, images, verbose: int = 0, batch_size: int | None = None) -> list[Detections]:
        """Detect instances in RGB images.

        images: a list of [H, W, 3] uint8 numpy arrays or [3, H, W] uint8 tensors, any sizes.
        verbose: 1 prints each image's shape and value range, as Matterport's ``detect``.
        batch_size: images per forward pass (default ``config.batch_size``).
        Returns one :class:`Detections` per image (boxes in original-image pixels, CPU tensors);
        ``r["rois"]``, ``r["masks"]``... read it as Matterport's dict (``Detections.to_matterport``).
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
            images = [images]
        if verbose:
            from ..structures import log_array
            print(f"Processing {len(images)} images")
            for image in images:
                log_array("image", image)
        was_training = self.training
        self.eval()
        try:
            step = batch_size or self.config.batch_size
            results = []
            for start in range(0, len(images), step):
                results.extend(self._detect_batch(images[start:start + step]))
            return results
        finally:
            self.train(was_training)

    def _detect_batch(self, images) -> list[Detections]:
        cfg = self.config
        device = self.device
        batch, metas = mold_images(images, cfg, device)
        raw = self.run_inference(batch, metas)
        return [self.unmold(det, meta, tuple(batch.shape[-2:])) for det, meta in zip(raw, metas)]

    def run_inference(self, batch: torch.Tensor, metas: list[ImageMeta]) -> list[dict]:
        """The network on a molded batch.  Returns per image a dict with, in the model's box
        frame of the molded image: ``rpn_rois`` [P, 4], ``boxes`` [D, 4], ``class_ids`` [D],
        ``scores`` [D], ``mask_probs`` [D, 2m, 2m] (the detected class's mask)."""
        cfg = self.config
        image_shape = tuple(batch.shape[-2:])
        features = self.features(batch)
        rpn_logits, rpn_deltas = self.rpn(features)
        anchors, level_sizes = self.anchors(image_shape, batch.device)
        windows = [self.proposal_window(m, image_shape, batch.device) for m in metas]
        proposals = self.propose(rpn_logits, rpn_deltas, anchors, level_sizes, windows,
                                 cfg.post_nms_rois_inference)
        rois = [p[0] for p in proposals]
        class_logits, box_deltas = self.classify(features, rois, image_shape)
        out = []
        start = 0
        std = box_ops.std_xy(cfg.bbox_std_dev)
        for i, r in enumerate(rois):
            n = r.shape[0]
            window = self.frame_window(metas[i], image_shape, batch.device)
            boxes, class_ids, scores = detect_boxes(
                r, class_logits[start:start + n], box_deltas[start:start + n], window, std,
                cfg.detection_mode, cfg.detection_min_confidence, cfg.detection_nms_threshold,
                cfg.detection_max_instances, cfg.detection_min_size, cfg.bbox_decode_clip)
            out.append(dict(rpn_rois=r, boxes=boxes, class_ids=class_ids, scores=scores))
            start += n
        logits = self.mask_logits(features, [o["boxes"] for o in out], image_shape)
        start = 0
        for o in out:
            n = o["boxes"].shape[0]
            sel = logits[start:start + n][torch.arange(n, device=logits.device), o["class_ids"]]
            o["mask_probs"] = torch.sigmoid(sel)
            start += n
        return out

    def unmold(self, det: dict, meta: ImageMeta, image_shape) -> Detections:
        """Map one image's detections from the frame of the molded batch (``image_shape``
        (H, W)) to its original pixels."""
        cfg = self.config
        h, w = meta.original_shape
        y1, x1, y2, x2 = meta.window
        boxes = det["boxes"].float().cpu()
        if cfg.box_frame == "normalized":
            # Matterport's unmold_detections: shift and scale by the normalized window, then
            # denorm_boxes on the original shape (round half to even), drop empty boxes.
            win = box_ops.normalize_boxes(torch.tensor([x1, y1, x2, y2], dtype=torch.float64),
                                          *image_shape).float()
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
            keep = torch.ones(boxes.shape[0], dtype=torch.bool)
        masks = det["mask_probs"].float().cpu()[keep]
        boxes, labels, scores = boxes[keep], det["class_ids"].cpu()[keep], det["scores"].float().cpu()[keep]
        if cfg.mask_paste == "matterport":
            ib = boxes.round().long()
            ib[:, 0::2] = ib[:, 0::2].clamp(0, w)
            ib[:, 1::2] = ib[:, 1::2].clamp(0, h)
            full = paste_masks_matterport(masks, ib, (h, w), cfg.mask_threshold)
        else:
            full = paste_masks_torchvision(masks, boxes, (h, w), cfg.mask_threshold)
        return Detections(boxes.float(), labels.long(), scores, full)

    # ------------------------------------------------------------------ training
    def forward(self, images, targets=None):
        """Training: ``images`` (list of [3, H, W] uint8 tensors) and ``targets`` (list of dicts
        with ``masks`` [N, H, W], ``labels`` [N], optional ``boxes`` [N, 4] and ``iscrowd``) ->
        dict of the five weighted losses.  In eval mode returns :meth:`detect`'s output."""
        if not self.training or targets is None:
            return self.detect(images)
        from .training import training_losses
        return training_losses(self, images, targets)

    def fit(self, dataset_train, dataset_val, learning_rate: float, epochs: int, layers: str = "all",
            augmentation=None, model_dir=None, **kwargs) -> dict:
        """Matterport's ``model.train``: train up to epoch ``epochs`` (counted from the first
        fit) on prepared :class:`maskrcnn.Dataset` objects, ``config.steps_per_epoch`` steps an
        epoch and ``config.validation_steps`` validation batches after each, into
        ``self.log_dir``.  ``augmentation``: a ``torchvision.transforms.v2`` transform or a
        callable (image, target) -> (image, target).  See :mod:`maskrcnn.engine.fit`."""
        from ..engine.fit import fit
        return fit(self, dataset_train, dataset_val, learning_rate, epochs, layers, augmentation, model_dir, **kwargs)

    def set_trainable(self, layers: str = "all") -> list[str]:
        """Freeze every parameter except those of a Matterport regime ("heads", "3+", "4+",
        "5+", "all") or whose name matches a regular expression.  Frozen BatchNorm stays frozen
        whatever the regime (``train_bn``).  Returns the names of the trainable parameters."""
        pattern = re.compile(LAYER_REGIMES.get(layers, layers))
        names = []
        for name, p in self.named_parameters():
            p.requires_grad_(bool(pattern.fullmatch(name)))
            if p.requires_grad:
                names.append(name)
        return names

    # ------------------------------------------------------------------ weights
    def save(self, path) -> None:
        """Write ``path/model.safetensors`` and ``path/config.yaml`` (+ class names), each
        atomically.  ``path`` is a folder."""
        from ..weights.io import save_model
        save_model(self, path)

    @classmethod
    def load(cls, path, map_location="cpu", config: Config | None = None) -> "MaskRCNN":
        """Read a model written by :meth:`save` (a folder, or its ``.safetensors`` file)."""
        from ..weights.io import load_model
        return load_model(cls, path, map_location, config)

    @classmethod
    def from_matterport(cls, h5_path, config: Config | None = None, class_names=None) -> "MaskRCNN":
        """Load a Keras ``.h5`` written by Matterport's ``model.save_weights``.  ``config``
        holds the values the weights were trained with (Matterport preset)."""
        from ..weights.matterport import load_matterport
        return load_matterport(cls, h5_path, config, class_names)

    @classmethod
    def from_torchvision(cls, path_or_state_dict, config: Config | None = None, class_names=None) -> "MaskRCNN":
        """Load a torchvision ``maskrcnn_resnet50_fpn`` (v1) state dict, any class count; picks
        the torchvision preset.  ``path_or_state_dict``: a file, a state dict, or the string
        "coco" for torchvision's COCO weights (downloaded)."""
        from ..weights.torchvision import load_torchvision
        return load_torchvision(cls, path_or_state_dict, config, class_names)
