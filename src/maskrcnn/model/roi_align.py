"""PyramidROIAlign: pool a fixed-size feature crop for every box from the pyramid level its size
picks.

Two poolings (``Config.roi_pooling``):

* ``"crop_and_resize"`` (Matterport): TF ``tf.image.crop_and_resize``, bilinear, one sample per
  output bin, boxes in the normalized frame.  Sample i of n along y lies at
  ``y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (n - 1)``; a sample outside ``[0, H - 1]`` is 0.
  Level = ``clip(4 + round(log2(sqrt(h * w) / (224 / sqrt(image_area)))), 2, 5)`` with normalized
  h, w (TF rounds half to even, as torch does).
* ``"roi_align"`` (torchvision): ``torchvision.ops.roi_align`` (``aligned=False``,
  ``sampling_ratio`` samples per bin side), boxes in pixels; level =
  ``clip(floor(4 + log2(sqrt(area) / 224) + 1e-6), 2, 5)``.

Speed on a CPU, in training and at inference: both poolings sum each bin's bilinear corners
from the channels-last maps the backbone hands over, as one ``embedding_bag``
(``_pool_samples``), instead of torchvision's one-threaded NCHW kernel (~10x faster for 1000
boxes on P2, ~8x with backward; equal to rounding).  On a GPU and while exporting they use the
ops above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torchvision.ops import roi_align

from ..device import device_constant

CANONICAL_SIZE = 224.0  # FPN paper eq. 1: a 224x224 box maps to level 4
CANONICAL_LEVEL = 4


def crop_and_resize(features: torch.Tensor, boxes: torch.Tensor, box_indices: torch.Tensor,
                    crop_size: tuple[int, int], bags: bool | None = None) -> torch.Tensor:
    """TF ``crop_and_resize`` (bilinear, extrapolation value 0); ``_pool_samples`` on a CPU.

    features:    [N, C, H, W].
    boxes:       [R, (x1, y1, x2, y2)] normalized: 0 is the first pixel centre, 1 the last.
    box_indices: [R] int64, the image of each box.
    bags:        pool with ``_pool_samples`` (default: :func:`fast_pooling`) or by gathering the
                 four corners of every sample (the GPU's and the exporter's way,
                 :func:`crop_and_resize_levels`).
    Returns [R, C, crop_h, crop_w].
    """
    if not (fast_pooling(features) if bags is None else bags):
        return crop_and_resize_levels([features], boxes, box_indices, None, crop_size)
    n, c, h, w = features.shape
    ch, cw = crop_size
    if guard_or_false(boxes.shape[0] == 0):
        return features.new_zeros(0, c, ch, cw)
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    in_y = _crop_positions(y1, y2, h - 1, ch)  # [R, ch]
    in_x = _crop_positions(x1, x2, w - 1, cw)  # [R, cw]
    return _pool_samples(features, box_indices, _axis_samples(in_y, h, (in_y >= 0) & (in_y <= h - 1)),
                         _axis_samples(in_x, w, (in_x >= 0) & (in_x <= w - 1)), ch, cw, 1, 1, 1.0)


def _crop_positions(lo: torch.Tensor, hi: torch.Tensor, last, count: int) -> torch.Tensor:
    """TF crop_and_resize's ``count`` sample positions along one axis, in pixels of the map
    (0 = the first pixel centre): lo, hi [R] normalized, ``last`` the map's last pixel index,
    a number or [R] (each box's own map).  Returns [R, count]."""
    column = last[:, None] if torch.is_tensor(last) else last
    if count > 1:
        steps = torch.arange(count, device=lo.device, dtype=lo.dtype)
        return lo[:, None] * column + steps[None, :] * ((hi - lo) * last / (count - 1))[:, None]
    return (0.5 * (lo + hi) * last)[:, None]


def crop_and_resize_levels(features: list[torch.Tensor], boxes: torch.Tensor, box_indices: torch.Tensor,
                           levels: torch.Tensor | None, crop_size: tuple[int, int]) -> torch.Tensor:
    """:func:`crop_and_resize` of every box from its own map, all boxes at once, by gathering
    the four corners of every sample (the GPU's and the exporter's way).

    features:    L maps [N, C, H_l, W_l] (a pyramid's levels).
    boxes:       [R, (x1, y1, x2, y2)] normalized; box_indices: [R] int64, each box's image.
    levels:      [R] int64 in [0, L), each box's map (None: one map).
    Returns [R, C, crop_h, crop_w], in float32 when the maps are bfloat16/float16 and the boxes
    float32 (the bilinear weights are the boxes' dtype).

    The maps' pixels are read as one [sum_l N * H_l * W_l, C] table and each box's samples are
    placed by its map's size and first row: the same arithmetic as one call per map, without
    splitting the boxes by level (on a GPU that split waits for the level sizes, and each
    map's call is some thirty kernels).
    """
    n, c = features[0].shape[:2]
    ch, cw = crop_size
    r = boxes.shape[0]
    if guard_or_false(r == 0):
        return features[0].new_zeros(0, c, ch, cw)
    if levels is None:  # one map: its sizes as numbers
        h, w = features[0].shape[2], features[0].shape[3]
        last_y, last_x = h - 1, w - 1
    else:  # each box's map's height, width and first row of the table, as [R] columns
        sizes = [(f.shape[2], f.shape[3]) for f in features]
        per_level = [(hh, ww, n * sum(a * b for a, b in sizes[:i])) for i, (hh, ww) in enumerate(sizes)]
        h, w, first = device_constant(per_level, boxes.device, torch.int64)[levels].unbind(1)
        last_y, last_x = ((v - 1).to(boxes.dtype) for v in (h, w))
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    in_y = _crop_positions(y1, y2, last_y, ch)  # [R, ch]
    in_x = _crop_positions(x1, x2, last_x, cw)  # [R, cw]

    def column(v, dims: int):  # a per-box value shaped to broadcast against [R, ...] (a number as is)
        return v.view(-1, *([1] * dims)) if torch.is_tensor(v) else v

    def bounded(t, last):  # clamp(t, 0, last)
        return torch.minimum(t.clamp(min=0), column(last, 1)) if torch.is_tensor(last) else t.clamp(0, last)

    valid_y = (in_y >= 0) & (in_y <= column(last_y, 1))
    valid_x = (in_x >= 0) & (in_x <= column(last_x, 1))
    top, bottom = bounded(in_y.floor(), last_y), bounded(in_y.ceil(), last_y)
    left, right = bounded(in_x.floor(), last_x), bounded(in_x.ceil(), last_x)
    y_lerp = (in_y - in_y.floor())[:, :, None, None]
    x_lerp = (in_x - in_x.floor())[:, None, :, None]
    top, bottom, left, right = (t.long() for t in (top, bottom, left, right))

    # Gathered as rows of [pixels, C] with index_select, not as feats[b, rows, cols]: that
    # indexing's backward (index_put_ with accumulate) adds the many gradients of a shared pixel
    # with atomic adds across threads on a CPU, in an order that varies from run to run, while
    # index_select's backward (index_add_) adds them in index order there; faster both ways too.
    tables = [f.permute(0, 2, 3, 1).reshape(-1, c) for f in features]  # views when channels-last
    pixels = tables[0] if len(tables) == 1 else torch.cat(tables)
    image_start = box_indices[:, None, None] * column(h * w, 2)  # the box's image's first table row
    if levels is not None:
        image_start = image_start + column(first, 2)

    def gather(rows, cols):  # [R, ch] rows, [R, cw] columns -> [R, ch, cw, C]
        index = image_start + rows[:, :, None] * column(w, 2) + cols[:, None, :]
        return pixels.index_select(0, index.reshape(-1)).view(r, ch, cw, c)

    top_left, top_right = gather(top, left), gather(top, right)
    bottom_left, bottom_right = gather(bottom, left), gather(bottom, right)
    top_row = top_left + (top_right - top_left) * x_lerp
    bottom_row = bottom_left + (bottom_right - bottom_left) * x_lerp
    out = top_row + (bottom_row - top_row) * y_lerp
    valid = (valid_y[:, :, None] & valid_x[:, None, :])[..., None]
    out = torch.where(valid, out, out.new_zeros(()))
    return out.permute(0, 3, 1, 2)


def matterport_levels(boxes: torch.Tensor, image_shape: tuple[int, int], min_level: int = 2,
                      max_level: int = 5) -> torch.Tensor:
    """Pyramid level of each box, Matterport's formula on normalized boxes.
    boxes: [R, (x1, y1, x2, y2)] normalized.  Returns [R] int64 in [min_level, max_level]."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    image_area = device_constant(float(image_shape[0] * image_shape[1]), boxes.device, boxes.dtype)
    ratio = torch.sqrt(h * w) / (CANONICAL_SIZE / torch.sqrt(image_area))
    level = torch.log(ratio) / torch.log(device_constant(2.0, boxes.device, boxes.dtype))
    # -inf (zero-area padding boxes) rounds to -inf and lands on the lowest level, as in TF.
    level = CANONICAL_LEVEL + torch.round(level).clamp(min=-100, max=100)
    return level.clamp(min_level, max_level).long()


def torchvision_levels(boxes: torch.Tensor, min_level: int = 2, max_level: int = 5) -> torch.Tensor:
    """Pyramid level of each box, torchvision's LevelMapper on pixel boxes.
    boxes: [R, (x1, y1, x2, y2)] pixels.  Returns [R] int64 in [min_level, max_level]."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_SIZE) + 1e-6)
    return level.clamp(min_level, max_level).long()


def _axis_samples(positions: torch.Tensor, size: int, inside: torch.Tensor):
    """Bilinear corners along one axis, torchvision's ``bilinear_interpolate`` rules.

    positions: [R, S] sample coordinates in feature pixels (0 = the first pixel centre).
    inside:    [R, S] bool, whether each sample counts (outside ones weigh 0).
    Returns (low, high) int64 indices and (low, high) weights, each [R, S]: a position at or
    below 0 reads pixel 0, one at or beyond ``size - 1`` reads pixel ``size - 1``.
    """
    p = positions.clamp(min=0)
    low = p.floor().clamp(max=size - 1)
    last = low >= size - 1
    p = torch.where(last, low, p)
    frac = p - low
    high = torch.where(last, low, low + 1)
    zero = frac.new_zeros(())
    return low.long(), high.long(), torch.where(inside, 1 - frac, zero), torch.where(inside, frac, zero)


def _pool_samples(feature: torch.Tensor, box_indices: torch.Tensor, ys, xs, out_h: int, out_w: int,
                  sy: int, sx: int, scale: float) -> torch.Tensor:
    """Average of bilinear samples per output bin, as one ``embedding_bag`` over the map's pixels.

    feature: [N, C, H, W] (read as a [N*H*W, C] table: a view of a channels-last map).
    ys, xs:  ``_axis_samples`` results for [R, out_h * sy] rows and [R, out_w * sx] columns, the
             samples of bin i being i*s .. i*s + s - 1.
    scale:   each sample's weight (1 / samples per bin).
    Returns [R, C, out_h, out_w] (channels-last strides), in feature's dtype.

    Each bin is a weighted sum of its sy*sx*4 corner pixels: ``embedding_bag`` gathers the
    C-long rows and sums them in one pass on every thread, ~10x faster than torchvision's
    one-threaded NCHW ``roi_align`` kernel on a CPU.
    """
    n, c, h, w = feature.shape
    r = box_indices.shape[0]
    y_low, y_high, wy_low, wy_high = ys
    x_low, x_high, wx_low, wx_high = xs
    rows = torch.stack([y_low, y_low, y_high, y_high], -1) + (box_indices * h)[:, None, None]  # [R, Sy, 4]
    cols = torch.stack([x_low, x_high, x_low, x_high], -1)  # [R, Sx, 4]
    wy = torch.stack([wy_low, wy_low, wy_high, wy_high], -1) * scale
    wx = torch.stack([wx_low, wx_high, wx_low, wx_high], -1)
    index = rows[:, :, None] * w + cols[:, None]  # [R, Sy, Sx, 4]
    weight = wy[:, :, None] * wx[:, None]

    def bins(t):  # [R, out_h*sy, out_w*sx, 4] -> [R*out_h*out_w, sy*sx*4]
        return t.view(r, out_h, sy, out_w, sx, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1, sy * sx * 4)

    table = feature.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when channels-last
    # A bf16 map (autocast) is pooled in float32 and returned in bf16, as torchvision's autocast
    # rule for roi_align does: embedding_bag wants its weights in the table's dtype, and bilinear
    # weights rounded to bf16 would move every sample.
    pooled = F.embedding_bag(bins(index), table.to(weight.dtype), mode="sum", per_sample_weights=bins(weight))
    return pooled.view(r, out_h, out_w, c).permute(0, 3, 1, 2).to(feature.dtype)


def fast_pooling(feature: torch.Tensor) -> bool:
    """Whether to pool with ``embedding_bag``: on a CPU, with or without autograd, outside export.
    With autograd its backward (rows added back by index, in order) is deterministic over
    threads and much faster than torchvision's one-threaded ``roi_align`` backward: 1024 boxes on
    a 2x256x128x128 map, forward and backward, 152 against 1226 ms; crop_and_resize's gather
    path for 400 boxes at 14x14: 127 against 865 ms."""
    return feature.device.type == "cpu" and not torch.compiler.is_exporting()


def pooling_layout(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The maps as ROI pooling reads them fastest: channels-last on a CPU (each NCHW map, e.g. a
    Winograd convolution's output, copied once for the box and the mask pooling both),
    unchanged elsewhere."""
    if not features or not fast_pooling(features[0]):
        return features
    return [f.contiguous(memory_format=torch.channels_last) for f in features]


def roi_align_cpu(feature: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                  sampling_ratio: int) -> torch.Tensor:
    """``torchvision.ops.roi_align(..., aligned=False)`` for ``sampling_ratio > 0``, computed as
    one ``embedding_bag`` over a channels-last map (equal to rounding, ~1e-6 on unit features).

    feature: [N, C, H, W]; rois: [R, (image index, x1, y1, x2, y2)] in input pixels.
    Returns [R, C, out, out] (channels-last strides).

    Sample (i, j) of bin p along y lies at ``y1 + p * bin + (i + 0.5) * bin / sampling_ratio``
    with ``y1`` and ``bin = max(y2 - y1, 1) / out`` in feature pixels, the operation order of
    torchvision's kernel; a sample below -1 or above H counts as 0.
    """
    s = sampling_ratio
    dtype = rois.dtype
    box_indices = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale).unbind(1)
    bin_w = ((x2 - x1).clamp(min=1.0) / output_size)[:, None]
    bin_h = ((y2 - y1).clamp(min=1.0) / output_size)[:, None]
    grid = torch.arange(output_size * s, device=rois.device)
    bin_of = (grid // s).to(dtype)[None]
    offset = ((grid % s).to(dtype) + 0.5)[None]
    ys = y1[:, None] + bin_of * bin_h + offset * bin_h / s  # [R, out*s]
    xs = x1[:, None] + bin_of * bin_w + offset * bin_w / s
    h, w = feature.shape[-2:]
    return _pool_samples(feature, box_indices, _axis_samples(ys, h, (ys >= -1.0) & (ys <= h)),
                         _axis_samples(xs, w, (xs >= -1.0) & (xs <= w)), output_size, output_size, s, s, 1.0 / (s * s))


def boxes_by_level(levels: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Indices of the boxes on each level, ascending: ``[nonzero(levels == l) for l < count]``.

    levels: [R] int64 in [0, count).  Returns ``count`` int64 tensors.  One stable sort and one
    read of the level sizes, where a ``nonzero`` per level makes the host wait for the GPU once
    per level (the sizes are counted by comparison: CUDA's ``bincount`` reads its input's
    extremes back first, two more waits); while exporting a graph, where sizes are unknown, the
    ``nonzero`` form.
    """
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return [torch.nonzero(levels == lvl).squeeze(1) for lvl in range(count)]
    order = torch.sort(levels, stable=True).indices
    every = torch.arange(count, device=levels.device, dtype=levels.dtype)
    return list(order.split((levels[None, :] == every[:, None]).sum(dim=1).tolist()))


def pyramid_roi_align(features: list[torch.Tensor], boxes: list[torch.Tensor], output_size: int,
                      image_shape: tuple[int, int], strides, mode: str = "crop_and_resize",
                      sampling_ratio: int = 2) -> torch.Tensor:
    """Pool every box from its pyramid level.

    features: [P2, P3, P4, P5], each [N, C, H_l, W_l].
    boxes:    N tensors [R_i, (x1, y1, x2, y2)] in the model's frame (normalized for
              crop_and_resize, pixels for roi_align) of the molded image of ``image_shape`` (H, W).
    strides:  the feature stride of each level in ``features``.
    Returns [sum R_i, C, output_size, output_size], boxes in input order (image by image).
    """
    all_boxes = torch.cat(boxes)
    index = torch.cat([torch.full_like(b[:, 0], i, dtype=torch.long) for i, b in enumerate(boxes)])
    min_level = round(math.log2(strides[0]))
    max_level = min_level + len(features) - 1
    if mode == "crop_and_resize":
        levels = matterport_levels(all_boxes, image_shape, min_level, max_level)
    else:
        levels = torchvision_levels(all_boxes, min_level, max_level)
    if mode == "crop_and_resize" and not fast_pooling(features[0]):
        # every level at once: no split of the boxes by level (a GPU wait and a set of kernels a level)
        return crop_and_resize_levels(features, all_boxes, index, levels - min_level, (output_size, output_size)
                                      ).to(features[0].dtype, memory_format=torch.contiguous_format)
    if mode != "crop_and_resize":  # torchvision's [R, (image index, x1, y1, x2, y2)], made once
        all_rois = torch.cat([index[:, None].to(all_boxes.dtype), all_boxes], dim=1)
    rows, pooled = [], []
    for i, (feature, idx) in enumerate(zip(features, boxes_by_level(levels - min_level, len(features)))):
        if guard_or_false(idx.numel() == 0):  # unknown while exporting: pool (maybe nothing)
            continue
        if mode == "crop_and_resize":
            pooled.append(crop_and_resize(feature, all_boxes[idx], index[idx], (output_size, output_size), True))
        elif fast_pooling(feature) and sampling_ratio > 0:
            pooled.append(roi_align_cpu(feature, all_rois[idx], output_size, 1.0 / strides[i], sampling_ratio))
        else:
            pooled.append(roi_align(feature, all_rois[idx], output_size, 1.0 / strides[i], sampling_ratio,
                                    aligned=False))
        rows.append(idx)
    # every box lies on exactly one level: one write of all levels' crops back into box order
    out = features[0].new_empty(all_boxes.shape[0], features[0].shape[1], output_size, output_size)
    if pooled:
        out[torch.cat(rows)] = torch.cat([p.to(out.dtype) for p in pooled])
    return out
