"""The torchvision reference that the tests and the benchmarks compare against: its Mask R-CNN
with random weights, and the check that two models give the same detections."""
from __future__ import annotations

import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

NUM_CLASSES = 91


def build_torchvision(min_size: int, max_size: int, seed: int = 0, num_classes: int = NUM_CLASSES) -> TorchvisionMaskRCNN:
    """torchvision's Mask R-CNN as ``maskrcnn_resnet50_fpn(weights="COCO_V1")`` builds it (frozen
    BN, layers 2-4 trainable), every parameter and BN statistic random."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    tv = TorchvisionMaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes,
                             min_size=min_size, max_size=max_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Parameters and frozen-BN buffers alike: kernels ~ N(0, 1/fan_in), BN scales and
        # variances in [0.5, 1), everything else (biases, means) ~ N(0, 0.1^2).
        for name, t in tv.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif name.endswith("weight") or name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        tv.rpn.head.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(5)
        tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30)
        tv.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(4.0)
    return tv.eval()


def same_detections(ref: dict, ours) -> tuple[bool, str]:
    """ours (a Detections) against ``ref``, torchvision's output dict or another Detections: every
    reference detection has a partner with the same label, boxes within 1e-2 px, scores within 1e-4; masks differ in at
    most 1e-4 of the pixels."""
    if not isinstance(ref, dict):  # a Detections: the same fields under torchvision's names
        ref = {"boxes": ref.boxes, "labels": ref.labels, "scores": ref.scores, "masks": ref.masks[:, None].float()}
    ref = {k: v.cpu() for k, v in ref.items()}
    if len(ours) != len(ref["boxes"]):
        return False, f"{len(ours)} vs {len(ref['boxes'])} detections"
    ref_masks = ref["masks"][:, 0] > 0.5
    used, mismatched = set(), 0
    for i in range(len(ref["boxes"])):
        close = ((ours.boxes - ref["boxes"][i]).abs().max(dim=1).values < 1e-2) & (ours.labels == ref["labels"][i])
        close &= (ours.scores - ref["scores"][i]).abs() < 1e-4
        j = [int(k) for k in torch.nonzero(close).flatten() if int(k) not in used]
        if not j:
            return False, f"torchvision detection {i} has no partner"
        used.add(j[0])
        mismatched += int((ours.masks[j[0]] != ref_masks[i]).sum())
    if mismatched > 1e-4 * max(ref_masks.numel(), 1):
        return False, f"{mismatched} mask pixels differ"
    return True, f"same ({len(ours)} dets, {mismatched} mask px differ)"
