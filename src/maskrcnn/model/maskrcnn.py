"""Mask R-CNN, wired stage by stage.

    images -> mold -> ResNet -> FPN [P2..P6] -> RPN -> ProposalLayer -> PyramidROIAlign
           -> BoxHead -> DetectionLayer -> PyramidROIAlign -> MaskHead -> full-size masks

``MaskRCNN.forward(images, targets)`` returns the training losses; ``MaskRCNN.detect(images)``
returns one :class:`maskrcnn.Detections` per image.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .. import boxes as box_ops
from ..config import LAYER_REGIMES, Config
from ..device import device_constant
from ..structures import Detections
from . import conv
from .anchors import pyramid_anchors, torchvision_strides
from .backbone import FPN, ResNet
from .detection import detect_boxes, unmold
from .heads import BoxHead, MaskHead
from .preprocess import ImageMeta, mold_images
from .proposals import propose_global, propose_per_level
from .roi_align import pooling_layout, pyramid_roi_align
from .rpn import RPNHead


class FirstStage(NamedTuple):
    """What :meth:`MaskRCNN.first_stage` computes for a molded batch of N images.

    features:   [P2, P3, P4, P5, P6], each [N, C, H_l, W_l].
    rpn_logits: [N, A, 2] (softmax head) or [N, A] (sigmoid head), ``RPNHead.kind``.
    rpn_deltas: [N, A, (dx, dy, log dw, log dh)] before multiplying by the std-dev.
    anchors:    [A, (x1, y1, x2, y2)] in the model's box frame.
    proposals:  per image [P_i, (x1, y1, x2, y2)] in the model's box frame, no gradient
                (None when not asked for).
    """

    features: list
    rpn_logits: torch.Tensor
    rpn_deltas: torch.Tensor
    anchors: torch.Tensor
    proposals: list | None


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
            shapes = [(-(-image_shape[0] // s), -(-image_shape[1] // s)) for s in self.config.backbone_strides]
            px, sizes = self.anchors_for_shapes(image_shape, shapes)
            self._anchor_cache = {key: (px.to(device), sizes)}
        return self._anchor_cache[key]

    def anchors_for_shapes(self, image_shape, shapes) -> tuple[torch.Tensor, list]:
        """Anchors over feature maps of ``shapes`` [(H_l, W_l)] (P2..P6) of a batch molded to
        ``image_shape`` (H, W), uncached; sizes may be symbolic (an exporter reads them from the
        maps).  Returns ([A, (x1, y1, x2, y2)] float32 in the model's box frame, anchors per level)."""
        cfg = self.config
        strides = (torchvision_strides(image_shape, shapes) if cfg.anchor_style == "torchvision"
                   else cfg.backbone_strides)
        px = pyramid_anchors(cfg.rpn_anchor_scales, cfg.rpn_anchor_ratios, strides, shapes,
                             cfg.rpn_anchor_stride, cfg.anchor_style)
        if cfg.box_frame == "normalized":
            px = box_ops.normalize_boxes(px, *image_shape)
        step = cfg.rpn_anchor_stride
        sizes = [((h + step - 1) // step) * ((w + step - 1) // step) * len(cfg.rpn_anchor_ratios) for h, w in shapes]
        return px.float(), sizes

    def frame_window(self, meta: ImageMeta, image_shape: tuple[int, int], device) -> torch.Tensor:
        """The image's real content (x1, y1, x2, y2) in the model's box frame."""
        y1, x1, y2, x2 = meta.window
        w = device_constant((x1, y1, x2, y2), device)
        if self.config.box_frame == "normalized":
            w = box_ops.normalize_boxes(w, *image_shape)
        return w

    def proposal_window(self, meta: ImageMeta, image_shape, device) -> torch.Tensor:
        """Where proposals are clipped: the whole molded image (normalized frame, as Matterport)
        or the image's content (pixel frame, as torchvision)."""
        if self.config.box_frame == "normalized":
            return device_constant((0.0, 0.0, 1.0, 1.0), device)
        return self.frame_window(meta, image_shape, device)

    # ------------------------------------------------------------------ stages
    def winograd(self):
        """The context in which the FPN, RPN and mask head run: Winograd 3x3 convolutions allowed
        unless ``config.cpu_inference_conv`` is "direct" (they apply only on a CPU without
        autograd; see .conv)."""
        return conv.winograd(self.config.cpu_inference_conv == "winograd")

    def inference_path(self) -> str:
        """How :meth:`detect` runs here, in words, e.g. "PyTorch eager (cpu, 2 threads, Winograd
        3x3 convolutions)": the fastest path this package has that gives the same detections."""
        device = self.device
        if device.type != "cpu":
            return f"PyTorch eager ({device})"
        fast = self.config.cpu_inference_conv == "winograd" and conv.nnpack_available()
        convs = "Winograd 3x3 convolutions" if fast else "direct convolutions"
        return f"PyTorch eager (cpu, {torch.get_num_threads()} threads, {convs})"

    def features(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] molded images -> [P2, P3, P4, P5, P6] (NCHW or channels-last: the CPU's
        Winograd convolutions leave NCHW maps)."""
        c = self.backbone(batch)
        with self.winograd():
            return self.fpn(c)

    def propose(self, rpn_logits, rpn_deltas, anchors, level_sizes, windows, count: int,
                pre_nms_limit: int | None = None):
        """ProposalLayer over a batch: list of (boxes [P_i, 4] in frame, scores [P_i]), keeping
        ``pre_nms_limit`` anchors (default ``config.pre_nms_limit``) before NMS and ``count`` after."""
        cfg = self.config
        limit = pre_nms_limit or cfg.pre_nms_limit
        std = box_ops.std_xy(cfg.rpn_bbox_std_dev)
        windows = torch.stack(list(windows))
        if cfg.proposal_selection == "global":
            return propose_global(self.rpn.foreground_probability(rpn_logits), rpn_deltas, anchors, windows,
                                  limit, count, cfg.rpn_nms_threshold, std, cfg.bbox_decode_clip, cfg.rpn_min_size)
        return propose_per_level(self.rpn.foreground_logit(rpn_logits), rpn_deltas, anchors, windows, level_sizes,
                                 limit, count, cfg.rpn_nms_threshold, std, cfg.bbox_decode_clip, cfg.rpn_min_size)

    def first_stage(self, batch: torch.Tensor, metas: list[ImageMeta], proposal_count: int | None,
                    pre_nms_limit: int | None = None) -> FirstStage:
        """Backbone, FPN, RPN, anchors and (unless ``proposal_count`` is None) the ProposalLayer
        on a molded batch [N, 3, H, W]: the part of the network training and inference share.
        ``pre_nms_limit``: anchors kept before NMS (default ``config.pre_nms_limit``)."""
        image_shape = tuple(batch.shape[-2:])
        features = self.features(batch)
        with self.winograd():
            rpn_logits, rpn_deltas = self.rpn(features)
        anchors, level_sizes = self.anchors(image_shape, batch.device)
        proposals = None
        if proposal_count is not None:
            windows = [self.proposal_window(m, image_shape, batch.device) for m in metas]
            with torch.no_grad():
                proposals = [boxes for boxes, _ in self.propose(rpn_logits.detach(), rpn_deltas.detach(), anchors,
                                                                level_sizes, windows, proposal_count,
                                                                pre_nms_limit)]
        return FirstStage(features, rpn_logits, rpn_deltas, anchors, proposals)

    def roi_features(self, features, rois: list[torch.Tensor], size: int, image_shape) -> torch.Tensor:
        """PyramidROIAlign over P2..P5 of a batch molded to ``image_shape`` (H, W):
        [sum R_i, C, size, size]."""
        cfg = self.config
        return pyramid_roi_align(features[:4], rois, size, image_shape, cfg.backbone_strides[:4],
                                 cfg.roi_pooling, cfg.roi_sampling_ratio)

    def classify(self, features, rois: list[torch.Tensor], image_shape):
        """Box head on each image's ROIs: (logits [sum R_i, C], deltas [sum R_i, C, 4])."""
        return self.box_head(self.roi_features(features, rois, self.config.pool_size, image_shape))

    def mask_logits(self, features, boxes: list[torch.Tensor], image_shape,
                    class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mask head on boxes: [sum D_i, num_classes, 2*mask_pool, 2*mask_pool] logits, or with
        ``class_ids`` [sum D_i] each box's class only, [sum D_i, 2*mask_pool, 2*mask_pool]."""
        crops = self.roi_features(features, boxes, self.config.mask_pool_size, image_shape)
        with self.winograd():
            return self.mask_head(crops, class_ids)

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
        return [unmold(det, meta, tuple(batch.shape[-2:]), cfg.box_frame, cfg.mask_paste, cfg.mask_threshold)
                for det, meta in zip(raw, metas)]

    def run_inference(self, batch: torch.Tensor, metas: list[ImageMeta]) -> list[dict]:
        """The network on a molded batch.  Returns per image a dict with, in the model's box
        frame of the molded image: ``rpn_rois`` [P, 4], ``boxes`` [D, 4], ``class_ids`` [D],
        ``scores`` [D], ``mask_probs`` [D, 2m, 2m] (the detected class's mask)."""
        cfg = self.config
        image_shape = tuple(batch.shape[-2:])
        stage = self.first_stage(batch, metas, cfg.post_nms_rois_inference)
        rois = stage.proposals
        features = pooling_layout(stage.features[:4])
        class_logits, box_deltas = self.classify(features, rois, image_shape)
        sizes = [r.shape[0] for r in rois]
        std = box_ops.std_xy(cfg.bbox_std_dev)
        out = []
        for r, logits, deltas, meta in zip(rois, class_logits.split(sizes), box_deltas.split(sizes), metas):
            window = self.frame_window(meta, image_shape, batch.device)
            boxes, class_ids, scores = detect_boxes(
                r, logits, deltas, window, std, cfg.detection_mode, cfg.detection_min_confidence,
                cfg.detection_nms_threshold, cfg.detection_max_instances, cfg.detection_min_size,
                cfg.bbox_decode_clip)
            out.append(dict(rpn_rois=r, boxes=boxes, class_ids=class_ids, scores=scores))
        mask_logits = self.mask_logits(features, [o["boxes"] for o in out], image_shape,
                                       torch.cat([o["class_ids"] for o in out]))
        for o, logits in zip(out, mask_logits.split([o["boxes"].shape[0] for o in out])):
            o["mask_probs"] = torch.sigmoid(logits)
        return out

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
