"""ResNet backbone (C2..C5) and the Feature Pyramid Network (P2..P6).

Two numerics, one code path (``style``):

* ``"caffe"`` (Matterport): every conv has a bias; BN eps 1e-3; the stride of a downsampling
  bottleneck sits on its first 1x1 conv and on the shortcut; the stem's 3x3/2 max pool uses TF
  ``'same'`` padding (0 before, 1 after on even sizes).
* ``"pytorch"`` (torchvision): no conv biases; BN eps 1e-5; the stride sits on the 3x3 conv; the
  max pool pads 1 on every side.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) so weights
map by name.  Tensors are [N, C, H, W]; the ResNet runs them in channels-last memory order
where that is faster (a CPU's oneDNN; a GPU under autocast: :func:`prefers_channels_last`), and each conv is folded with the
BatchNorm after it when that norm does not learn (:mod:`.fuse`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .conv import convolve
from .fuse import conv_norm

BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def norm_layer(channels: int, eps: float, trainable: bool) -> nn.Module:
    """BatchNorm that learns (``trainable``) or runs on its stored statistics only."""
    return nn.BatchNorm2d(channels, eps=eps) if trainable else FrozenBatchNorm2d(channels, eps=eps)


def projection_shortcut(cin: int, cout: int, stride: int, bias: bool, eps: float, train_bn: bool):
    """1x1 conv (stride ``stride``) + BN where a block changes shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), norm_layer(cout, eps, train_bn))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34).  [N, Cin, H, W] -> [N, C, H/stride, W/stride]."""
    expansion = 1

    def __init__(self, cin, width, stride, style, train_bn):
        super().__init__()
        bias, eps = style == "caffe", 1e-3 if style == "caffe" else 1e-5
        self.fold_bn = style != "caffe"
        cout = width
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=bias)
        self.bn1 = norm_layer(width, eps, train_bn)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=bias)
        self.bn2 = norm_layer(cout, eps, train_bn)
        self.downsample = projection_shortcut(cin, cout, stride, bias, eps, train_bn)

    def forward(self, x):
        out = conv_norm(self.conv1, self.bn1, x, True, self.fold_bn)
        out = conv_norm(self.conv2, self.bn2, out, False, self.fold_bn)
        shortcut = x if self.downsample is None else conv_norm(*self.downsample, x, False, self.fold_bn)
        return F.relu_(out.add_(shortcut))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a projection shortcut when the shape changes.
    [N, Cin, H, W] -> [N, 4*width, H/stride, W/stride]."""
    expansion = 4

    def __init__(self, cin, width, stride, style, train_bn):
        super().__init__()
        caffe = style == "caffe"
        bias, eps = caffe, 1e-3 if caffe else 1e-5
        self.fold_bn = not caffe
        cout = width * self.expansion
        s1, s3 = (stride, 1) if caffe else (1, stride)
        self.conv1 = nn.Conv2d(cin, width, 1, s1, bias=bias)
        self.bn1 = norm_layer(width, eps, train_bn)
        self.conv2 = nn.Conv2d(width, width, 3, s3, 1, bias=bias)
        self.bn2 = norm_layer(width, eps, train_bn)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=bias)
        self.bn3 = norm_layer(cout, eps, train_bn)
        self.downsample = projection_shortcut(cin, cout, stride, bias, eps, train_bn)

    def forward(self, x):
        out = conv_norm(self.conv1, self.bn1, x, True, self.fold_bn)
        out = conv_norm(self.conv2, self.bn2, out, True, self.fold_bn)
        out = conv_norm(self.conv3, self.bn3, out, False, self.fold_bn)
        shortcut = x if self.downsample is None else conv_norm(*self.downsample, x, False, self.fold_bn)
        return F.relu_(out.add_(shortcut))


def prefers_channels_last(x: torch.Tensor) -> bool:
    """Whether convolutions of ``x`` run faster in channels-last order on its device: always on
    a CPU (oneDNN); on a GPU only under autocast, where the tensor-core kernels are NHWC.  In
    float32 cuDNN serves NHWC with slow direct kernels: measured on an H200, a training step at
    batch 8 of 800x1066 took 1.21 s in NHWC and 0.32 s in NCHW (torchvision, NCHW: 0.28 s)."""
    if x.device.type == "cpu":
        return True
    return torch.is_autocast_enabled(x.device.type)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 body.  [N, 3, H, W] -> [C2, C3, C4, C5] at strides 4, 8, 16, 32.

    channels_last: run (and return) the features in channels-last memory order; the values are
    the same, only the layout differs.  None (the default) chooses per call with
    :func:`prefers_channels_last`; True / False force a layout (the benchmarks compare them).
    """

    channels_last: bool | None = None

    def __init__(self, architecture: str = "resnet101", style: str = "caffe", train_bn: bool = False):
        super().__init__()
        kind, counts = BLOCKS[architecture]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.style = style
        caffe = style == "caffe"
        self.fold_bn = not caffe  # see .fuse for why the Matterport style keeps conv then BN
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=caffe)
        self.bn1 = norm_layer(64, 1e-3 if caffe else 1e-5, train_bn)
        cin = 64
        self.out_channels = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), counts)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, stride if j == 0 else 1, style, train_bn))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(cin)

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        """3x3 max pool, stride 2, with TF 'same' padding (caffe) or symmetric padding 1."""
        if self.style == "caffe":
            h, w = x.shape[-2:]
            pad_h = max((math.ceil(h / 2) - 1) * 2 + 3 - h, 0)
            pad_w = max((math.ceil(w / 2) - 1) * 2 + 3 - w, 0)
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2),
                      value=float("-inf"))
            return F.max_pool2d(x, 3, 2)
        return F.max_pool2d(x, 3, 2, 1)

    def forward(self, x):
        channels_last = prefers_channels_last(x) if self.channels_last is None else self.channels_last
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem_pool(conv_norm(self.conv1, self.bn1, x, True, self.fold_bn))
        if channels_last:  # the caffe stem's F.pad returns NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class FPN(nn.Module):
    """Feature Pyramid Network: [C2..C5] -> [P2, P3, P4, P5, P6], each ``channels`` deep.

    P_k = conv3x3(lateral1x1(C_k) + upsample2x(P_{k+1} before its 3x3)); P6 = P5[..., ::2, ::2]
    (max pool of size 1, stride 2), used by the RPN only.
    """

    def __init__(self, in_channels: list[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = self.lateral[-1](features[-1])
        outs = [convolve(self.output[-1], inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, convolve(self.output[i], inner))
        outs.append(F.max_pool2d(outs[-1], 1, 2))
        return outs
