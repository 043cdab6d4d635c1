"""The network of one molded image as a graph an exporter can trace: no Python decision
depends on a tensor's values, and every size comes from the input's shape.

    molded image [1, 3, H, W], window [(x1, y1, x2, y2)] pixels
        -> features -> RPN -> anchors (from the feature shapes) -> proposals -> box head
        -> DetectionLayer -> mask head -> (boxes, class_ids, scores, mask_probs)

The stages are the model's own modules and functions; molding before and
:func:`maskrcnn.model.detection.unmold` after run in Python, the same code as eager ``detect``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import boxes as box_ops
from ..model.detection import detect_boxes
from ..model.fuse import fold


def conv_norm_pairs(module: nn.Module):
    """(owner, conv name, norm name) of each conv + norm pair that ``module`` runs through
    :func:`maskrcnn.model.fuse.conv_norm` (``conv1``/``bn1``..., ``downsample``, ``convs``/``norms``)."""
    for i in range(1, 4):
        if hasattr(module, f"conv{i}") and hasattr(module, f"bn{i}"):
            yield module, f"conv{i}", f"bn{i}"
    if isinstance(getattr(module, "downsample", None), nn.Sequential):
        yield module.downsample, "0", "1"
    if hasattr(module, "convs") and hasattr(module, "norms"):
        for i in range(len(module.convs)):
            yield module.convs, str(i), module.norms, str(i)


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose folded conv + BatchNorm pairs (``fold_bn`` modules, see
    :mod:`maskrcnn.model.fuse`) are one conv with the folded weight and bias and an Identity
    norm: the weights the eager model computes and caches, stored so that an exporter sees plain
    convolutions."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if not getattr(module, "fold_bn", False):
            continue
        for pair in conv_norm_pairs(module):
            conv_owner, conv_name = pair[0], pair[1]
            norm_owner, norm_name = (pair[0], pair[2]) if len(pair) == 3 else (pair[2], pair[3])
            conv, norm = conv_owner._modules[conv_name], norm_owner._modules[norm_name]
            if isinstance(norm, nn.Identity):
                continue
            weight, bias = fold(conv, norm)
            conv.weight = nn.Parameter(weight, requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            norm_owner._modules[norm_name] = nn.Identity()
    return model


class DetectionGraph(nn.Module):
    """``MaskRCNN.run_inference`` for one image, with the window as a tensor input.

    forward(image [1, 3, H, W] float32 molded, window [4] float32 (x1, y1, x2, y2) pixels of the
    image's content in the molded image) -> boxes [D, 4] in the model's box frame (normalized
    for crop_and_resize models, molded pixels otherwise), class_ids [D] int64, scores [D]
    float32, mask_probs [D, 2m, 2m] float32 (each detection's class mask).
    """

    def __init__(self, model):
        super().__init__()
        self.model = folded_copy(model)

    def forward(self, image: torch.Tensor, window: torch.Tensor):
        model, cfg = self.model, self.model.config
        image_shape = tuple(image.shape[-2:])
        features = model.features(image)
        rpn_logits, rpn_deltas = model.rpn(features)
        anchors, level_sizes = model.anchors_for_shapes(image_shape, [tuple(f.shape[-2:]) for f in features])
        frame_window = window
        proposal_window = window
        if cfg.box_frame == "normalized":
            frame_window = box_ops.normalize_boxes(window, *image_shape)
            proposal_window = torch.tensor([0.0, 0.0, 1.0, 1.0])
        rois = model.propose(rpn_logits, rpn_deltas, anchors, level_sizes, [proposal_window],
                             cfg.post_nms_rois_inference)[0][0]
        class_logits, box_deltas = model.classify(features, [rois], image_shape)
        boxes, class_ids, scores = detect_boxes(
            rois, class_logits, box_deltas, frame_window, box_ops.std_xy(cfg.bbox_std_dev),
            cfg.detection_mode, cfg.detection_min_confidence, cfg.detection_nms_threshold,
            cfg.detection_max_instances, cfg.detection_min_size, cfg.bbox_decode_clip)
        logits = model.mask_logits(features, [boxes], image_shape)
        mask_probs = torch.sigmoid(logits[torch.arange(boxes.shape[0]), class_ids])
        return boxes, class_ids, scores, mask_probs
