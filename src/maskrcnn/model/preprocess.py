"""Molding: images of any size -> one normalized float batch the network takes, and back.

Resize modes (``Config.image_resize_mode``), Matterport's four and torchvision's:

* ``"square"``: scale so the short side is ``image_min_dim`` (never down) unless the long side
  would pass ``image_max_dim``, then pad centred to ``image_max_dim`` x ``image_max_dim``.
* ``"pad64"``: scale as above (without the max), pad centred up to multiples of 64.
* ``"none"``: no resize, no padding.
* ``"torchvision"``: scale = min(min_dim / short side, max_dim / long side), bilinear on the
  normalized float image (``GeneralizedRCNNTransform``); the batch is padded bottom/right to a
  multiple of ``image_size_divisor``.

Matterport's modes resize the uint8 image bilinearly, reading zeros outside it, with no
anti-aliasing, and truncate back to uint8, as ``utils.resize_image`` does with skimage (reproduced
bit for bit by :func:`resize_bilinear_uint8`), then subtract ``mean_pixel``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..device import device_constant
from ..errors import DataError


@dataclass
class ImageMeta:
    """Where an original image sits inside the molded batch.

    original_shape: (h, w) of the input image.
    window: (y1, x1, y2, x2) pixels of the real (resized) image inside the molded image.
    scale: the resize factor (Matterport's ``scale``; torchvision's ``scale_factor``).
    """

    original_shape: tuple[int, int]
    window: tuple[int, int, int, int]
    scale: float


def as_hwc_uint8(image) -> np.ndarray:
    """An RGB image as [H, W, 3] uint8 numpy, from numpy HxWx3 or a [3, H, W] tensor."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise DataError(f"image tensor of shape {tuple(image.shape)}: expected [3, H, W]")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DataError(f"image of shape {image.shape}: expected H x W x 3 RGB")
    if image.dtype != np.uint8:
        raise DataError(f"image of dtype {image.dtype}: expected uint8 RGB values 0..255")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(f"image of shape {image.shape}: it is empty")
    return np.ascontiguousarray(image[:, :, :3])


def as_chw_uint8(image) -> torch.Tensor:
    """An RGB image as a [3, H, W] uint8 tensor: such a tensor as it is (on its device), anything
    else through :func:`as_hwc_uint8` (on the CPU)."""
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
        return image
    return torch.from_numpy(as_hwc_uint8(image)).permute(2, 0, 1)


#: Output rows :func:`resize_bilinear_uint8` computes at a time.
RESIZE_ROWS = 32


def _linear_taps(n_in: int, n_out: int):
    """Sampling along one axis of length ``n_in`` resized to ``n_out``: output pixel k reads input
    position ``(k + 0.5) * n_in / n_out - 0.5`` (pixel centres), between pixels ``start`` and
    ``start + 1``.  Returns (start + 1, start + 2) as indices into the axis padded with one zero
    on each side, and the two weights, in float64 and in the order scipy computes them."""
    position = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    start = np.floor(position)
    w0 = 1.0 - (position - start)
    w1 = 1.0 - w0
    i0 = start.astype(np.int64) + 1
    return i0, i0 + 1, w0, w1


def resize_bilinear_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [H, W, C] uint8 image to [height, width, C] uint8, bit for bit what
    Matterport's ``utils.resize_image`` gets from ``skimage.transform.resize(image, (height,
    width), order=1, mode="constant", cval=0, clip=True, preserve_range=True,
    anti_aliasing=False).astype(np.uint8)``.

    That call is ``scipy.ndimage.zoom(order=1, mode="grid-constant", grid_mode=True)`` in float64:
    each output is ``((v00*wy0)*wx0 + (v01*wy0)*wx1) + (v10*wy1)*wx0 + (v11*wy1)*wx1`` with input
    pixels outside the image read as 0, summed in that order (a different order moves values by an
    ulp, and truncation to uint8 turns an ulp below an integer into one grey level).  skimage then
    clips to the input's range [min, max], widened down to 0 only when some output is exactly 0;
    so a border pixel darkened by the zeros outside comes back up to the image's minimum.

    Computed ``RESIZE_ROWS`` output rows at a time, each row flattened to W * C values, so the
    float64 temporaries stay in cache and every step is a contiguous ``take`` or an in-place
    product into buffers made once; clipping to an integer bound commutes with truncation, so
    each block is clipped above and truncated at once, and raised to the minimum at the end
    (800x1066 -> 961x1024: 63 -> 24 ms on one core).
    """
    y0, y1, wy0, wy1 = _linear_taps(image.shape[0], height)
    x0, x1, wx0, wx1 = _linear_taps(image.shape[1], width)
    channels = image.shape[2]
    padded = np.pad(image, [(1, 1), (1, 1), (0, 0)])
    flat = padded.reshape(padded.shape[0], -1)  # [H + 2, (W + 2) * C]
    # each output value's two input columns and weights, along the flattened row
    within = np.arange(channels)
    left, right = (x0[:, None] * channels + within).ravel(), (x1[:, None] * channels + within).ravel()
    w_left, w_right = np.repeat(wx0, channels), np.repeat(wx1, channels)
    rows_max = min(RESIZE_ROWS, height)
    top, bottom = np.empty((rows_max, flat.shape[1])), np.empty((rows_max, flat.shape[1]))
    part_buf, term_buf = np.empty((rows_max, width * channels)), np.empty((rows_max, width * channels))
    out = np.empty((height, width * channels), dtype=np.uint8)
    low, high = float(image.min()), float(image.max())
    has_zero = False
    for start in range(0, height, RESIZE_ROWS):
        rows = slice(start, start + RESIZE_ROWS)
        n = len(y0[rows])
        t, b, part, term = top[:n], bottom[:n], part_buf[:n], term_buf[:n]
        np.multiply(flat[y0[rows]], wy0[rows, None], out=t)
        np.multiply(flat[y1[rows]], wy1[rows, None], out=b)
        np.take(t, left, axis=1, out=part)
        part *= w_left
        np.take(t, right, axis=1, out=term)
        term *= w_right
        part += term
        np.take(b, left, axis=1, out=term)
        term *= w_left
        part += term
        np.take(b, right, axis=1, out=term)
        term *= w_right
        part += term
        if low > 0 and not has_zero:
            has_zero = bool((part == 0).any())
        np.minimum(part, high, out=part)  # outputs are >= 0: the weights and pixels are
        out[rows] = part  # truncates, as astype(np.uint8)
    if low > 0 and not has_zero:
        np.maximum(out, np.uint8(low), out=out)
    return out.reshape(height, width, channels)


def _centred_padding(size: int, multiple: int) -> tuple[int, int]:
    """Zeros (before, after) that centre ``size`` in the next multiple of ``multiple``."""
    extra = -size % multiple
    return extra // 2, extra - extra // 2


def resize_matterport(image: np.ndarray, mode: str, min_dim: int, max_dim: int, min_scale: float = 0):
    """Matterport's ``utils.resize_image`` (modes none, square, pad64; "crop" as pad64: the
    whole image at inference, scaled as crop mode scales it; training takes random squares of
    the scaled image instead, ``model.training.random_crop``).

    image: [H, W, 3] uint8.  Returns (image [H', W', 3] uint8, window (y1, x1, y2, x2), scale).
    """
    h, w = image.shape[:2]
    window = (0, 0, h, w)
    scale = 1
    if mode == "none":
        return image, window, scale
    if min_dim:
        scale = max(1, min_dim / min(h, w))
    if min_scale and scale < min_scale:
        scale = min_scale
    if max_dim and mode == "square":
        image_max = max(h, w)
        if round(image_max * scale) > max_dim:
            scale = max_dim / image_max
    if scale != 1:
        image = resize_bilinear_uint8(image, round(h * scale), round(w * scale))
    h, w = image.shape[:2]
    if mode == "square":
        top, left = (max_dim - h) // 2, (max_dim - w) // 2
        bottom, right = max_dim - h - top, max_dim - w - left
    elif mode in ("pad64", "crop"):
        top, bottom = _centred_padding(h, 64)
        left, right = _centred_padding(w, 64)
    else:
        raise ValueError(f"image_resize_mode={mode!r} cannot be used for inference")
    image = np.pad(image, [(top, bottom), (left, right), (0, 0)])
    return image, (top, left, h + top, w + left), scale


def normalize_matterport(image: np.ndarray, mean_pixel) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 ``image - mean_pixel`` (computed in float64, as the
    original's float32 - float64 array, then fed as float32)."""
    return normalize_uint8(torch.from_numpy(image).permute(2, 0, 1), mean_pixel)


def normalize_uint8(image: torch.Tensor, mean_pixel, std_pixel=None) -> torch.Tensor:
    """[3, H, W] uint8 on any device -> [3, H, W] float32 there: ``image - mean_pixel`` in float64
    rounded to float32 (Matterport's numbers), then divided by ``std_pixel`` in float32 when given.
    Each value is one correctly rounded operation, so the CPU and a GPU give the same bits."""
    mean = device_constant(tuple(mean_pixel), image.device, torch.float64)[:, None, None]
    x = (image.double() - mean).float()
    if std_pixel is not None:
        x = x / device_constant(tuple(std_pixel), image.device)[:, None, None]
    return x


def torchvision_scale(height: int, width: int, min_dim: int, max_dim: int) -> float:
    """torchvision's resize factor of a ``height`` x ``width`` image: the short side to
    ``min_dim`` unless the long side would pass ``max_dim``."""
    return min(min_dim / min(height, width), max_dim / max(height, width))


def torchvision_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (H', W') that ``F.interpolate(scale_factor=scale, recompute_scale_factor=True)`` gives
    a ``height`` x ``width`` image: each side times ``scale``, rounded down (as PyTorch does)."""
    return math.floor(float(height) * scale), math.floor(float(width) * scale)


def mold_torchvision(image: torch.Tensor, mean_pixel, std_pixel, min_dim: int, max_dim: int):
    """torchvision's normalize-then-resize.  image: [3, H, W] uint8 on any device.
    Returns ([3, H', W'] float32, window (0, 0, H', W'), scale)."""
    x = image.float() / 255
    mean = device_constant(tuple(m / 255 for m in mean_pixel), x.device)
    std = device_constant(tuple(s / 255 for s in std_pixel), x.device)
    x = (x - mean[:, None, None]) / std[:, None, None]
    scale = torchvision_scale(*x.shape[-2:], min_dim, max_dim)
    x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                      align_corners=False)[0]
    return x, (0, 0, x.shape[1], x.shape[2]), scale


def mold_images(images, config, device) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Mold a list of RGB images (numpy [H, W, 3] uint8 or tensors [3, H, W] uint8).

    Returns (batch [N, 3, H, W] float32 on ``device``, one ImageMeta per image).  Images of
    different molded sizes are padded bottom/right with zeros to a common size (a multiple of
    ``image_size_divisor`` in torchvision mode).
    """
    molded, metas = [], []
    for image in images:
        if config.image_resize_mode == "torchvision":
            t = as_chw_uint8(image).to(device)
            x, window, scale = mold_torchvision(t, config.mean_pixel, config.std_pixel or (255.0,) * 3,
                                                config.image_min_dim, config.image_max_dim)
            original = tuple(t.shape[-2:])
        else:
            arr = as_hwc_uint8(image)
            resized, window, scale = resize_matterport(arr, config.image_resize_mode, config.image_min_dim,
                                                       config.image_max_dim, config.image_min_scale)
            x = normalize_uint8(torch.from_numpy(resized).permute(2, 0, 1), config.mean_pixel,
                                config.std_pixel).to(device)
            original = arr.shape[:2]
        molded.append(x)
        metas.append(ImageMeta(tuple(int(v) for v in original), tuple(int(v) for v in window), scale))
    return pad_batch(molded, config.image_size_divisor if config.image_resize_mode == "torchvision" else 1), metas


def mold_resized_images(images, config, device) -> torch.Tensor:
    """The batch of images that :func:`resize_matterport` resized and padded one by one (in a
    DataLoader worker, ``model.training.prepare_training_item``): [3, H_i, W_i] uint8 on any
    device -> [N, 3, H, W] float32 on ``device``.  Each image moves as uint8 (a quarter of
    float32's bytes), is normalised there as :func:`mold_images` normalises, and is zero-padded
    bottom/right to the largest: the batch :func:`mold_images` makes of the unresized images."""
    return pad_batch([normalize_uint8(image.to(device, non_blocking=True), config.mean_pixel, config.std_pixel)
                      for image in images])


def pad_batch(images: list[torch.Tensor], divisor: int = 1) -> torch.Tensor:
    """Stack [3, H_i, W_i] tensors into [N, 3, H, W], zero-padded bottom/right; H and W are the
    largest sizes rounded up to a multiple of ``divisor``."""
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    h, w = int(math.ceil(h / divisor) * divisor), int(math.ceil(w / divisor) * divisor)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for i, x in enumerate(images):
        batch[i, :, : x.shape[1], : x.shape[2]].copy_(x)
    return batch
