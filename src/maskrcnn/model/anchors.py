"""Anchor boxes over the feature pyramid.

Order (both styles): pyramid level P2..P6, then feature-map cell row-major (y, then x), then
the ratios in config order, fastest.  Every cell's anchors are centred on ``cell * stride``.

* ``"matterport"``: ratio = width / height, heights = scale / sqrt(ratio), widths =
  scale * sqrt(ratio), float corners.
* ``"torchvision"``: ratio = height / width, and the centred base anchor's corners are rounded
  before shifting (``AnchorGenerator``).
"""
from __future__ import annotations


import torch


def level_anchors(scale: float, ratios, stride, feature_shape: tuple[int, int],
                  anchor_stride: int = 1, style: str = "matterport", device=None) -> torch.Tensor:
    """Anchors of one pyramid level.

    stride: the level's stride, an int or (stride_y, stride_x).
    Returns [H * W * len(ratios), (x1, y1, x2, y2)] float64 in pixels of the molded image (the
    caller converts to its frame, then to float32, as Matterport normalizes in float64).
    """
    ratios = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    if style == "matterport":
        heights = scale / torch.sqrt(ratios)
        widths = scale * torch.sqrt(ratios)
        base = torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=1)
    else:
        h_ratios = torch.sqrt(ratios.float())
        w_ratios = 1 / h_ratios
        ws = w_ratios * scale
        hs = h_ratios * scale
        base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round().double()
    h, w = feature_shape
    stride_y, stride_x = (stride, stride) if isinstance(stride, (int, float)) else stride
    ys = torch.arange(0, h, anchor_stride, dtype=torch.float64) * stride_y
    xs = torch.arange(0, w, anchor_stride, dtype=torch.float64) * stride_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + base.reshape(1, -1, 4)).reshape(-1, 4).to(device=device)


def pyramid_anchors(scales, ratios, strides, feature_shapes, anchor_stride: int = 1,
                    style: str = "matterport", device=None) -> torch.Tensor:
    """Anchors of all levels, concatenated: [sum_l H_l * W_l * len(ratios), (x1, y1, x2, y2)]
    in molded-image pixels.  ``feature_shapes`` are the (H, W) of P2..P6."""
    return torch.cat([level_anchors(s, ratios, st, fs, anchor_stride, style, device)
                      for s, st, fs in zip(scales, strides, feature_shapes)])


def torchvision_strides(image_shape: tuple[int, int], feature_shapes) -> list[tuple[int, int]]:
    """torchvision's per-level strides, ``image_size // feature_size`` on each axis: on a padded
    size that is not a multiple of 64, P6's stride is not 64 (480 // 8 = 60)."""
    return [(image_shape[0] // h, image_shape[1] // w) for h, w in feature_shapes]
