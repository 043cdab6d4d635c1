"""A tiny but complete Mask R-CNN for testing the training machinery quickly on the CPU.

One stride-8 feature map, two anchor sizes, an RPN, proposals by score + NMS, ROI align and
class / box / mask heads, trained with the package's own ``build_rpn_targets``,
``build_detection_targets`` and the five losses: the same contract as ``maskrcnn.MaskRCNN``
(``model(images, targets) -> dict of the five losses``), a few thousand parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import nms, roi_align

from maskrcnn.boxes import apply_box_deltas, clip_boxes
from maskrcnn.model import losses as L
from maskrcnn.model.targets import build_detection_targets, build_rpn_targets

STRIDE = 8
SIZES = (16, 32)


def grid_anchors(height: int, width: int) -> torch.Tensor:
    """[(H/8)*(W/8)*2, 4] square anchors centred on each feature cell, (x1, y1, x2, y2) pixels."""
    ys, xs = torch.meshgrid(torch.arange(height // STRIDE), torch.arange(width // STRIDE), indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() * STRIDE + STRIDE / 2
    half = torch.tensor(SIZES, dtype=torch.float32).reshape(1, -1, 1) / 2
    return torch.cat([centres - half, centres + half], -1).reshape(-1, 4)


class TinyMaskRCNN(nn.Module):
    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        k = len(SIZES)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.rpn_conv = nn.Conv2d(width, width, 3, 1, 1)
        self.rpn_logits = nn.Conv2d(width, 2 * k, 1)
        self.rpn_deltas = nn.Conv2d(width, 4 * k, 1)
        self.box_fc = nn.Sequential(nn.Flatten(), nn.Linear(width * 49, 64), nn.ReLU())
        self.class_logits = nn.Linear(64, num_classes)
        self.box_deltas = nn.Linear(64, 4 * num_classes)
        self.mask_head = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
                                       nn.ConvTranspose2d(width, width, 2, 2), nn.ReLU(),
                                       nn.Conv2d(width, num_classes, 1))

    def set_trainable(self, layers: str) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(layers != "heads")

    def forward(self, images: list, targets: list) -> dict:
        x = torch.stack(images).float() / 255.0 - 0.5
        feats = self.backbone(x)
        h = torch.relu(self.rpn_conv(feats))
        n = x.shape[0]
        logits = self.rpn_logits(h).permute(0, 2, 3, 1).reshape(n, -1, 2)
        deltas = self.rpn_deltas(h).permute(0, 2, 3, 1).reshape(n, -1, 4)
        anchors = grid_anchors(x.shape[2], x.shape[3]).to(x.device)
        window = x.new_tensor([0, 0, x.shape[3], x.shape[2]])
        totals = dict.fromkeys(("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss",
                                "mrcnn_bbox_loss", "mrcnn_mask_loss"), 0.0)
        for i, t in enumerate(targets):
            labels, target_deltas = build_rpn_targets(anchors, t["boxes"], t["iscrowd"], 64)
            totals["rpn_class_loss"] += L.rpn_class_loss(logits[i], labels, "softmax")
            totals["rpn_bbox_loss"] += L.rpn_bbox_loss(deltas[i], target_deltas, labels)
            with torch.no_grad():
                boxes = clip_boxes(apply_box_deltas(anchors, deltas[i]), window)
                scores = torch.softmax(logits[i], -1)[:, 1]
                keep = nms(boxes, scores, 0.7)[:32]
            rois, roi_labels, roi_deltas, roi_masks = build_detection_targets(
                boxes[keep], t["boxes"], t["labels"], t["masks"], t["iscrowd"], 32, 0.33)
            indexed = torch.cat([rois.new_full((len(rois), 1), i), rois], 1)
            pooled = roi_align(feats, indexed, 7, 1 / STRIDE, 2, aligned=True)
            hidden = self.box_fc(pooled)
            totals["mrcnn_class_loss"] += L.mrcnn_class_loss(self.class_logits(hidden), roi_labels)
            totals["mrcnn_bbox_loss"] += L.mrcnn_bbox_loss(
                self.box_deltas(hidden).reshape(-1, self.num_classes, 4), roi_deltas, roi_labels)
            mask_logits = self.mask_head(roi_align(feats, indexed, 14, 1 / STRIDE, 2, aligned=True))
            totals["mrcnn_mask_loss"] += L.mrcnn_mask_loss(mask_logits, roi_masks, roi_labels)
        return {k: v / n for k, v in totals.items()}
