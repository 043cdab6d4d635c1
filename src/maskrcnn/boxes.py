"""Box math: delta coding, clipping, frame conversion, IoU.  Pure functions on tensors.

Boxes are ``[..., (x1, y1, x2, y2)]`` everywhere in the package (torchvision's order).  Deltas are
``[..., (dx, dy, log dw, log dh)]``, the offset of the centre in units of the box size and the
log of the size ratio, divided by a std-dev (Matterport's ``*_STD_DEV``) before a head predicts them.

Two frames are used between the stages of the model (see ``Config.box_frame``):

* **pixel**: corners in pixels of the molded (resized, padded) image, x2/y2 exclusive.
* **normalized**: Matterport's ``norm_boxes`` convention,
  ``(x1, y1, x2 - 1, y2 - 1) / (W - 1, H - 1, W - 1, H - 1)``, so (x2, y2) lies inside the box.
"""
from __future__ import annotations

import torch
import torchvision
from torchvision.ops import box_iou  # noqa: F401  (re-exported: IoU is torchvision's)

from .device import device_constant


def std_xy(std_dev) -> tuple:
    """Matterport's std-dev order (dy, dx, dh, dw) to ours (dx, dy, dw, dh)."""
    sy, sx, sh, sw = std_dev
    return (sx, sy, sw, sh)


def centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., (x1, y1, x2, y2)] -> (centre [..., (x, y)], size [..., (width, height)]).  x and y
    go through each operation together: one kernel where one per coordinate would be two (box
    math runs a few times a training step and an inference, and on a GPU its kernels are launch
    time, not arithmetic)."""
    size = boxes[..., 2:] - boxes[..., :2]
    return boxes[..., :2] + 0.5 * size, size


def apply_box_deltas(boxes: torch.Tensor, deltas: torch.Tensor, std=(1.0, 1.0, 1.0, 1.0),
                     clip_log_size: float | None = None) -> torch.Tensor:
    """Refine boxes by deltas.

    boxes:  [..., (x1, y1, x2, y2)] in any frame.
    deltas: [..., (dx, dy, log dw, log dh)] as predicted, i.e. before multiplying by ``std``.
    std:    (sx, sy, sw, sh), multiplied into the deltas (Matterport's RPN_BBOX_STD_DEV in
            x-first order; torchvision's BoxCoder weights ``w`` correspond to ``1 / w``).
    clip_log_size: upper clamp on log dw, log dh (torchvision: log(1000/16)); None = no clamp.
    Returns [..., (x1, y1, x2, y2)] in the same frame.
    """
    std = device_constant(std, deltas.device, deltas.dtype)
    deltas = deltas * std
    centre, size = centres_and_sizes(boxes)
    log_size = deltas[..., 2:]
    if clip_log_size is not None:
        log_size = log_size.clamp(max=clip_log_size)
    centre = centre + deltas[..., :2] * size
    size = size * torch.exp(log_size)
    low = centre - 0.5 * size
    return torch.cat([low, low + size], dim=-1)


def box_deltas(boxes: torch.Tensor, targets: torch.Tensor, std=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The deltas that :func:`apply_box_deltas` needs to turn ``boxes`` into ``targets``.

    boxes, targets: [..., (x1, y1, x2, y2)] in the same frame, positive sizes.
    Returns [..., (dx, dy, log dw, log dh)] divided by ``std`` (sx, sy, sw, sh).
    """
    centre, size = centres_and_sizes(boxes)
    target_centre, target_size = centres_and_sizes(targets)
    deltas = torch.cat([(target_centre - centre) / size, torch.log(target_size / size)], dim=-1)
    return deltas / device_constant(std, deltas.device, deltas.dtype)


def clip_boxes(boxes: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Clip boxes to a window.

    boxes:  [..., (x1, y1, x2, y2)].
    window: [(x1, y1, x2, y2)] or broadcastable to boxes, in the same frame.
    """
    # (x1, y1, x1, y1) and (x2, y2, x2, y2): each corner's bounds, by slicing (indexing with a
    # list copies the list to the GPU from ordinary host memory: a wait for the GPU)
    low = torch.cat([window[..., :2], window[..., :2]], dim=-1)
    high = torch.cat([window[..., 2:], window[..., 2:]], dim=-1)
    return torch.minimum(torch.maximum(boxes, low), high)  # 4 kernels, not 8 and a stack


def _frame_scale(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """[(W - 1, H - 1, W - 1, H - 1)] in ``boxes``' dtype; built from 0-d tensors so that an
    exporter keeps symbolic sizes symbolic."""
    w, h = boxes.new_full((), width - 1), boxes.new_full((), height - 1)
    return torch.stack([w, h, w, h])


def normalize_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel corners (x2, y2 exclusive) of a ``height`` x ``width`` image -> normalized frame."""
    shift = device_constant((0, 0, 1, 1), boxes.device, boxes.dtype)
    return (boxes - shift) / _frame_scale(boxes, height, width)


def denormalize_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalized frame -> pixel corners of a ``height`` x ``width`` image (not rounded)."""
    shift = device_constant((0, 0, 1, 1), boxes.device, boxes.dtype)
    return boxes * _frame_scale(boxes, height, width) + shift


#: Most coordinates (4 a box) for which :func:`batched_nms` on a GPU runs one NMS of boxes
#: offset by group; above it, one NMS a group.  torchvision's CUDA threshold since 0.22
#: (pytorch/vision#8925, benchmarked there); earlier releases switched at 20000, which runs a
#: training step's per-level proposal NMS (about 8700 boxes an 800x1066 image) as a loop
#: with two GPU waits a level.
GPU_OFFSET_NMS_COORDINATES = 100_000


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS within each group: ``torchvision.ops.batched_nms``'s results.  On a GPU (up to
    :data:`GPU_OFFSET_NMS_COORDINATES`) and while exporting a graph it is torchvision's
    coordinate-offset form (each group's boxes shifted past the previous group's, one NMS)
    written without a host value: torchvision's copies a 1 from the host, which makes the host
    wait for the GPU's queue once more a call, and exporting has no Python branches on the
    number of boxes.  On a CPU it is torchvision's own choice of form.

    boxes: [K, (x1, y1, x2, y2)] with non-negative coordinates; scores [K]; groups [K] int64.
    Returns indices into ``boxes``, by descending score.
    """
    if offset_form(boxes):
        return offset_nms(boxes, scores, groups, iou_threshold)
    return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)


def offset_form(boxes: torch.Tensor) -> bool:
    """Whether :func:`batched_nms` of ``boxes`` [K, 4] runs as :func:`offset_nms`: while
    exporting, and on a GPU up to :data:`GPU_OFFSET_NMS_COORDINATES`."""
    return torch.compiler.is_exporting() or (boxes.device.type != "cpu"
                                             and boxes.numel() <= GPU_OFFSET_NMS_COORDINATES)


def offset_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
               iou_threshold: float) -> torch.Tensor:
    """:func:`batched_nms` as one NMS: each group's boxes shifted by ``group * (max + 1)`` so
    that no two groups overlap (torchvision's coordinate trick).  Arguments and result as
    :func:`batched_nms`."""
    # max over the boxes and 0: never an empty reduction, the same value when there are boxes
    top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    shifted = boxes + (groups.to(boxes) * (top + 1))[:, None]
    return torchvision.ops.nms(shifted, scores, iou_threshold)


def any_along(masks: torch.Tensor, dim) -> torch.Tensor:
    """``masks.any(dim)`` of a bool tensor as the maximum of its bytes: PyTorch's CPU ``any``
    is not vectorised (8 masks of 800x1066: 4.4 ms against 0.1 ms on one core), ``amax`` of
    uint8 is.  ``dim``: an int or a tuple of ints, as ``amax`` takes; reduced dims of size 0
    give False."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if any(masks.shape[d] == 0 for d in dims):
        return masks.any(dim=dims)  # amax refuses an empty reduction
    return masks.view(torch.uint8).amax(dim=dims) > 0


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks, as Matterport's ``extract_bboxes``.

    masks: [N, H, W] bool.  Returns [N, (x1, y1, x2, y2)] float32 pixels, x2/y2 exclusive;
    an empty mask gives (0, 0, 0, 0).
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows = any_along(masks, 2)  # [N, H]
    cols = any_along(masks, 1)  # [N, W]
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.iinfo(torch.int64).max
    y1 = torch.where(rows, ar_h, big).min(dim=1).values
    y2 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x1 = torch.where(cols, ar_w, big).min(dim=1).values
    x2 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    return torch.where(rows.any(dim=1)[:, None], boxes, 0).float()  # empty: (0, 0, 0, 0)
