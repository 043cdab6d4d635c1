"""Import a torchvision ``maskrcnn_resnet50_fpn`` (v1) state dict.

torchvision's module names map almost one to one onto ours (our ResNet keeps torchvision's
names); only the FPN, RPN and head prefixes differ.  Both the current names
(``inner_blocks.0.0``, ``rpn.head.conv.0.0``, ``mask_head.0.0``) and the pre-0.13 ones
(``inner_blocks.0``, ``rpn.head.conv``, ``mask_head.mask_fcn1``) are accepted.  Deltas are
(dx, dy, dw, dh) in both, so no channel is reordered.
"""
from __future__ import annotations

import re
import torch

from ..config import Config
from ..errors import WeightsError
from .io import read_weights
from .matching import load_state_exact

_RULES = [
    (r"backbone\.body\.(.*)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d)(?:\.0)?\.(weight|bias)", r"fpn.lateral.\1.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d)(?:\.0)?\.(weight|bias)", r"fpn.output.\1.\2"),
    (r"rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)", r"rpn.conv.\1"),
    (r"rpn\.head\.cls_logits\.(weight|bias)", r"rpn.objectness.\1"),
    (r"rpn\.head\.bbox_pred\.(weight|bias)", r"rpn.deltas.\1"),
    (r"roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)", r"box_head.\1.\2"),
    (r"roi_heads\.box_predictor\.cls_score\.(weight|bias)", r"box_head.class_logits.\1"),
    (r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", r"box_head.bbox.\1"),
    (r"roi_heads\.mask_head\.(\d)\.0\.(weight|bias)", r"mask_head.convs.\1.\2"),
    (r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)", r"mask_head.deconv.\1"),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", r"mask_head.logits.\1"),
]


def torchvision_to_ours(name: str) -> str | None:
    """Our parameter name for a torchvision Mask R-CNN state-dict key (None: not ours)."""
    if name.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)", name)
    if m:
        return f"mask_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"
    for pattern, repl in _RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def convert_state_dict(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        ours = torchvision_to_ours(k)
        if ours is not None:
            out[ours] = v.detach().float()
    if "box_head.class_logits.weight" not in out:
        raise WeightsError("not a torchvision Mask R-CNN state dict (no roi_heads.box_predictor.cls_score)")
    return out


def read_torchvision(path_or_state_dict):
    """A torchvision state dict from a file (read with weights_only=True), a dict, or "coco":
    torchvision's COCO weights (box AP 37.9, mask AP 34.6), downloaded through
    ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` into torch's hub cache.  Returns (state dict, class
    names or None)."""
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict, None
    if str(path_or_state_dict) == "coco":
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
        w = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
        return w.get_state_dict(progress=True), coco_class_names()
    return read_weights(path_or_state_dict), None


def coco_class_names() -> list[str]:
    """torchvision's COCO class list, index = COCO category id (91 entries: "BG", then
    "person" = 1 ... "toothbrush" = 90, with "N/A" at the ids COCO leaves unused)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
    return ["BG"] + list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def load_torchvision(cls, path_or_state_dict, config: Config | None = None, class_names=None):
    state, names = read_torchvision(path_or_state_dict)
    source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
    try:
        ours = convert_state_dict(state)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    num_classes = int(ours["box_head.class_logits.weight"].shape[0])
    if config is None:
        config = Config.preset("torchvision", num_classes=num_classes)
    # torchvision's class id is the COCO category id itself: the table is the identity.
    category_ids = list(range(num_classes)) if names is not None and len(names) == num_classes else None
    model = cls(config, class_names or names, category_ids)
    load_state_exact(model, ours, source)
    return model.eval()
