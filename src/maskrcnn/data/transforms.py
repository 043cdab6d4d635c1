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

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..boxes import any_along, masks_to_boxes


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
        # uint8 rather than bool: every v2 kernel resamples uint8 masks (a bool mask is viewed as
        # its bytes, not copied; the kernels return new tensors)
        masks = target["masks"]
        wrapped["masks"] = tv_tensors.Mask(masks.view(torch.uint8) if masks.dtype == torch.bool
                                           else masks.to(torch.uint8))
        image_out, out = self.transform(tv_tensors.Image(image), wrapped)
        return image_out.as_subclass(torch.Tensor), drop_empty_instances(out)

    def __repr__(self) -> str:
        return f"InstanceTransform({self.transform!r})"


class ScaleAboutCentre(v2.Transform):
    """Zoom the picture about its centre by a factor drawn uniformly from ``scale_range``,
    within the same canvas: > 1 crops the borders away, < 1 pads with black.  What
    ``v2.RandomAffine(degrees=0, scale=scale_range)`` does, as a resize (bilinear, antialiased
    for images; nearest-exact for masks, the same pixel centres) and a centre crop or pad:
    16-18 ms an 800x1066 item with 8 masks on one core, where the affine warp took 94 ms (and
    sampled the image nearest)."""

    def __init__(self, scale_range: tuple = (0.8, 1.25)):
        super().__init__()
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range={scale_range}: need 0 < low <= high")
        self.scale_range = (low, high)

    def make_params(self, flat_inputs: list) -> dict:
        from torchvision.transforms.v2._utils import query_size
        height, width = query_size(flat_inputs)
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        return {"size": [height, width],
                "scaled": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt, params: dict):
        from torchvision.transforms.v2 import functional as F
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            # nearest-exact samples the pixel centres that the image's bilinear resize samples;
            # v2's mask default (legacy "nearest") is up to half a pixel off from them
            resized = tv_tensors.wrap(F.resize_image(inpt.as_subclass(torch.Tensor), params["scaled"],
                                                     interpolation=v2.InterpolationMode.NEAREST_EXACT), like=inpt)
        else:
            resized = F.resize(inpt, params["scaled"], antialias=True)
        return F.center_crop(resized, params["size"])

    # torchvision before 0.21 calls them by these names
    _get_params = make_params
    _transform = transform


#: NTSC's RGB -> YIQ matrix (rows Y, I, Q); Y is the luma that a hue rotation keeps.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
#: The grey of an RGB pixel, as torchvision's rgb_to_grayscale weighs it.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


class LinearColorJitter(v2.Transform):
    """``v2.ColorJitter``'s brightness, contrast, saturation and hue, drawn as it draws them
    (factors uniform in [1 - x, 1 + x], hue in [-hue, hue] of a full turn, the four in a random
    order), applied as the one affine colour map they compose to: every step is affine in RGB
    (brightness a scale, contrast a blend with the image's mean grey, saturation a blend with
    each pixel's grey, hue a rotation of the chroma plane in YIQ space as NVIDIA DALI turns
    it), so the image is read and written once.  8 ms an 800x1066 image on one core, where
    ColorJitter took 28 ms (68 ms with hue, through HSV).  Unlike ColorJitter, the values are
    clipped to [0, 255] once at the end, not after each step, and hue turns as in YIQ, not HSV
    (the same direction and about the same amount for the few degrees used in training)."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        super().__init__()
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name}={value}: need >= 0")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue={hue}: need 0 <= hue <= 0.5")
        self.brightness, self.contrast, self.saturation, self.hue = (float(v) for v in
                                                                      (brightness, contrast, saturation, hue))

    def make_params(self, flat_inputs: list) -> dict:
        def factor(x):
            return float(torch.empty(()).uniform_(max(0.0, 1 - x), 1 + x)) if x else None
        return {"order": torch.randperm(4).tolist(), "brightness": factor(self.brightness),
                "contrast": factor(self.contrast), "saturation": factor(self.saturation),
                "turn": float(torch.empty(()).uniform_(-self.hue, self.hue)) if self.hue else None}

    @staticmethod
    def colour_map(params: dict, mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [3, 3], t [3]) float64 of the composed map ``x -> A x + t`` for RGB pixel values
        x of an image whose mean colour is ``mean_rgb`` [3] (contrast blends with the mean grey
        of the image as the steps before it left it)."""
        a, t = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        grey = torch.tensor(GREY_WEIGHTS, dtype=torch.float64)
        for step in params["order"]:
            if step == 0 and params["brightness"] is not None:
                a, t = a * params["brightness"], t * params["brightness"]
            elif step == 1 and params["contrast"] is not None:
                c = params["contrast"]
                mean_grey = grey @ (a @ mean_rgb + t)
                a, t = a * c, t * c + (1 - c) * mean_grey
            elif step == 2 and params["saturation"] is not None:
                s = params["saturation"]
                blend = s * torch.eye(3, dtype=torch.float64) + (1 - s) * torch.ones(3, 1, dtype=torch.float64) * grey
                a, t = blend @ a, blend @ t
            elif step == 3 and params["turn"] is not None:
                angle = -2 * math.pi * params["turn"]  # HSV's direction: red towards yellow for a positive turn
                to_yiq = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
                rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)],
                                       [0.0, math.sin(angle), math.cos(angle)]], dtype=torch.float64)
                turn = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
                a, t = turn @ a, turn @ t
        return a, t

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image) or inpt.shape[-3] != 3:  # colour needs three channels
            return inpt
        image = inpt.as_subclass(torch.Tensor)  # [..., 3, H, W]
        pixels = image.reshape(*image.shape[:-3], 3, -1).float()
        bound = 255.0 if image.dtype == torch.uint8 else 1.0
        mean_rgb = pixels.mean(dim=tuple(range(pixels.dim() - 2)) + (-1,)).double()
        a, t = self.colour_map(params, mean_rgb)
        a32, t32 = a.float(), t.float()[:, None]
        out = torch.addmm(t32, a32, pixels) if pixels.dim() == 2 else a32 @ pixels + t32
        if image.dtype == torch.uint8:
            out = out.round_().clamp_(0, bound).to(torch.uint8)
        else:
            out = out.clamp_(0, bound).to(image.dtype)
        return tv_tensors.wrap(out.reshape(image.shape), like=inpt)

    # torchvision before 0.21 calls them by these names
    _get_params = make_params
    _transform = transform


def drop_empty_instances(target: dict) -> dict:
    """Target with masks as [N, H, W] bool, boxes the tight boxes of the masks, and the
    instances whose mask has no pixel removed (from boxes, labels, masks and iscrowd)."""
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    keep = any_along(masks, (1, 2))
    every = bool(keep.all())  # the usual case: no copy of the masks to leave none out
    out = dict(target)
    out["masks"] = masks if every else masks[keep]
    out["boxes"] = masks_to_boxes(out["masks"]).to(torch.float32)
    for key in ("labels", "iscrowd"):
        value = target[key].as_subclass(torch.Tensor)
        out[key] = value if every else value[keep]
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
        steps.append(ScaleAboutCentre(scale_range))
    if any((brightness, contrast, saturation, hue)):
        steps.append(LinearColorJitter(brightness, contrast, saturation, hue))
    return InstanceTransform(v2.Compose(steps or [v2.Identity()]))  # all off: boxes still re-derived
