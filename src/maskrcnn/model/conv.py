"""3x3 convolutions by Winograd's minimal filtering on a CPU at inference (NNPACK).

A 3x3 convolution computed directly costs 9 multiply-adds per input channel, output channel and
pixel; Winograd's F(6x6, 3x3) transform (Lavin & Gray 2016), which NNPACK implements and PyTorch
ships in its CPU builds, computes 6x6 output tiles from 8x8 input tiles with 64 instead of
324 products per channel pair.  On the 3x3 256->256 convolutions of the FPN, the RPN and the mask
head, the largest share of Mask R-CNN's arithmetic, it runs 2-2.5x faster than oneDNN's direct
convolution at P2/P3 sizes (2 threads; ``benchmarks/bench_ablation.py`` measures it end to end).

The transforms round differently from a direct sum.  Against float64, one such convolution on a
P2-sized map is off by up to 1.4e-5 of the output's largest magnitude (rms 4.5e-6), where
oneDNN's direct float32 sums are off by 2.4e-6 (rms 9e-7); NNPACK's batched mode (the mask
head's crops) is off by 3e-7.  Through the network that leaves the detections the same (boxes
within 1e-3 px, scores within 1e-5 on the benchmark's images and the parity tests' fixtures).
``Config.cpu_inference_conv = "direct"`` turns it off.

It is used only where it is faster and safe: a CPU, float32, autograd off, outside export, a 3x3
stride-1 padding-1 convolution without groups, at least :data:`MIN_CHANNELS` channels in and out,
at least :data:`MIN_PIXELS` output pixels (:data:`MIN_BATCHED_PIXELS` over a batch), and NNPACK
present.  NNPACK reads and writes NCHW: :func:`convolve` returns NCHW there
(the callers keep those maps NCHW) and leaves other convolutions' layouts as they were.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

#: Fewest output pixels (H x W) of one image for which Winograd is used: below it the transforms
#: save little or nothing (256->256, 2 threads: 50x67 ran in 0.54x oneDNN's time, 25x34 in 0.93x).
MIN_PIXELS = 2500
#: The same for a batch of N > 1 (NNPACK's batched algorithm; N x H x W): 20 mask crops of 14x14
#: ran 1.17x oneDNN's time, 50 crops 0.81x, 100 crops 0.58x.
MIN_BATCHED_PIXELS = 6000
#: Fewest input and output channels: thin convolutions run slower (2 threads: 32 channels at
#: 256x256 2.0x oneDNN's time, 64 at 64x64 1.8x; 128 at 100x134 0.56x).
MIN_CHANNELS = 128

_state = threading.local()


@lru_cache(maxsize=1)
def nnpack_available() -> bool:
    """Whether this PyTorch build has NNPACK and the CPU runs it (the call also initialises it,
    which ``torch._nnpack_spatial_convolution`` needs)."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def winograd(enabled: bool = True):
    """Allow Winograd convolutions (where :func:`applies`) inside the block, in this thread."""
    previous = getattr(_state, "enabled", False)
    _state.enabled = enabled and nnpack_available()
    try:
        yield
    finally:
        _state.enabled = previous


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv(x)`` runs as a Winograd convolution here (see the module docstring)."""
    return (getattr(_state, "enabled", False) and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_exporting()
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and x.dim() == 4
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
            and x.shape[0] * x.shape[2] * x.shape[3] >= (MIN_PIXELS if x.shape[0] == 1 else MIN_BATCHED_PIXELS))


def convolve(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (or the convolution with ``weight``/``bias`` in place of the module's, e.g. a
    folded BatchNorm's), by Winograd when :func:`applies`, else by ``F.conv2d``.

    x: [N, Cin, H, W].  Returns [N, Cout, H, W]: NCHW when Winograd ran, else in x's layout.
    """
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None and weight is conv.weight else bias
    if applies(x, conv):
        return torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias,
                                                 list(conv.padding), list(conv.stride))
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution; on NCHW input on a CPU without autograd as one matrix
    product per image ([Cout, Cin] @ [Cin, H*W]), which keeps NCHW and skips oneDNN's reorder of
    the whole map into its blocked layout.  x: [N, Cin, H, W] -> [N, Cout, H, W]."""
    if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_exporting() or x.dim() != 4
            or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1):
        return conv(x)
    n, c, h, w = x.shape
    out = torch.matmul(conv.weight.view(conv.out_channels, c), x.view(n, c, h * w))
    if conv.bias is not None:
        out += conv.bias[:, None]
    return out.view(n, conv.out_channels, h, w)
