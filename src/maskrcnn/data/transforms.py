"""Training augmentation with ``torchvision.transforms.v2``: image, boxes and masks move together.

``build_transforms(train=True)`` returns a callable ``(image, target) -> (image, target)`` for
:class:`~maskrcnn.data.dataset.TorchDataset`:

* image: ``[3, H, W]`` uint8 RGB;
* target: ``boxes`` [N, (x1, y1, x2, y2)] float32 pixels, ``labels`` [N] int64, ``masks``
  [N, H, W] bool, ``iscrowd`` [N] bool, ``image_id``.

The geometric transforms (horizontal flip, scale jitter) act on the image, on the boxes as
``tv_tensors.BoundingBoxes`` and on the masks as ``tv_tensors.Mask``; the photometric one
(colour jitter) on the image only.  Afterwards each box is recomputed as the tight box of its
mask (so boxes stay exactly consistent with masks), and instances whose mask became empty (moved
out of the picture) are dropped along with their label and crowd flag.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..boxes import masks_to_boxes


class InstanceTransform:
    """Apply a v2 transform to ``(image, target)``, then re-derive boxes from masks and drop
    instances with empty masks.  The output has the same types as the input of
    :class:`~maskrcnn.data.dataset.TorchDataset` (plain tensors, not tv_tensors)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: torch.Tensor, target: dict):
        height, width = image.shape[-2:]
        wrapped = dict(target)
        wrapped["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        # uint8 rather than bool: every v2 kernel resamples uint8 masks.
        wrapped["masks"] = tv_tensors.Mask(target["masks"].to(torch.uint8))
        image_out, out = self.transform(tv_tensors.Image(image), wrapped)
        return image_out.as_subclass(torch.Tensor), drop_empty_instances(out)

    def __repr__(self) -> str:
        return f"InstanceTransform({self.transform!r})"


def drop_empty_instances(target: dict) -> dict:
    """Target with masks as [N, H, W] bool, boxes the tight boxes of the masks, and the
    instances whose mask has no pixel removed (from boxes, labels, masks and iscrowd)."""
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    keep = masks.flatten(1).any(dim=1)
    out = dict(target)
    out["masks"] = masks[keep]
    out["boxes"] = masks_to_boxes(out["masks"]).to(torch.float32)
    for key in ("labels", "iscrowd"):
        out[key] = target[key].as_subclass(torch.Tensor)[keep]
    return out


def build_transforms(train: bool, hflip_prob: float = 0.5, scale_range: tuple = (0.8, 1.25),
                     brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                     hue: float = 0.02):
    """Augmentation for training (``train=True``) or None for evaluation (the model resizes and
    normalises by itself, so evaluation needs no transform).

    hflip_prob:  probability of a horizontal flip.
    scale_range: zoom factor range of the scale jitter, drawn uniformly; the picture is scaled
                 about its centre within the same canvas, so > 1 crops the borders away and
                 < 1 pads with black (objects become larger / smaller relative to the image).
    brightness, contrast, saturation, hue: ``v2.ColorJitter`` strengths (0 disables each).
    """
    if not train:
        return None
    steps = []
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=0.0, scale=tuple(scale_range)))
    if any((brightness, contrast, saturation, hue)):
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
    return InstanceTransform(v2.Compose(steps))
