"""Second-stage heads on pooled ROI features: the box classifier/regressor and the mask head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import norm_layer
from .fuse import conv_norm


class BoxHead(nn.Module):
    """Classifier and per-class box regressor.

    kind "conv" (Matterport): a pool_size x pool_size valid conv (an FC layer over the crop) and
    a 1x1 conv, each followed by BN and ReLU.  kind "mlp" (torchvision TwoMLPHead): flatten, two
    fully connected layers with ReLU.

    Input [R, C, pool, pool]; returns
        logits: [R, num_classes]
        deltas: [R, num_classes, (dx, dy, log dw, log dh)] before multiplying by BBOX_STD_DEV.
    """

    def __init__(self, in_channels: int, pool_size: int, num_classes: int, fc_size: int = 1024,
                 kind: str = "conv", train_bn: bool = False, bn_eps: float = 1e-3):
        super().__init__()
        self.kind = kind
        self.num_classes = num_classes
        self.fold_bn = False  # Matterport's numerics; see .fuse.set_bn_folding
        if kind == "conv":
            self.conv1 = nn.Conv2d(in_channels, fc_size, pool_size)
            self.bn1 = norm_layer(fc_size, bn_eps, train_bn)
            self.conv2 = nn.Conv2d(fc_size, fc_size, 1)
            self.bn2 = norm_layer(fc_size, bn_eps, train_bn)
        else:
            self.fc6 = nn.Linear(in_channels * pool_size * pool_size, fc_size)
            self.fc7 = nn.Linear(fc_size, fc_size)
        self.class_logits = nn.Linear(fc_size, num_classes)
        self.bbox = nn.Linear(fc_size, num_classes * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "conv":
            x = conv_norm(self.conv1, self.bn1, x, True, self.fold_bn)
            x = conv_norm(self.conv2, self.bn2, x, True, self.fold_bn).flatten(1)
        else:
            x = F.relu_(self.fc6(x.flatten(1)))
            x = F.relu_(self.fc7(x))
        return self.class_logits(x), self.bbox(x).reshape(-1, self.num_classes, 4)


class MaskHead(nn.Module):
    """Four 3x3 conv (+ BN) + ReLU blocks, a 2x2 stride-2 transposed conv + ReLU, and a 1x1 conv
    with one mask logit map per class.

    Input [R, C, m, m]; returns logits [R, num_classes, 2m, 2m] (sigmoid gives the masks), or
    with ``class_ids`` [R] only each ROI's class: [R, 2m, 2m] (inference: 1/num_classes of the
    last layer's work, 65 ms for 100 detections of COCO's 91 classes on a CPU).

    On a CPU the transposed convolution reads channels-last maps: oneDNN runs it in half the
    time it takes on NCHW (100 crops: 79 against 153 ms; with backward 289 against 408 ms), and
    the Winograd convolutions before it hand over NCHW.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, use_bn: bool = True,
                 train_bn: bool = False, bn_eps: float = 1e-3, num_convs: int = 4):
        super().__init__()
        self.fold_bn = False  # Matterport's numerics; see .fuse.set_bn_folding
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c = in_channels
        for _ in range(num_convs):
            self.convs.append(nn.Conv2d(c, channels, 3, padding=1))
            self.norms.append(norm_layer(channels, bn_eps, train_bn) if use_bn else nn.Identity())
            c = channels
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv_norm(conv, norm, x, True, self.fold_bn)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu_(self.deconv(x))
        if class_ids is None:
            return self.logits(x)
        weight = self.logits.weight[class_ids, :, 0, 0]  # [R, C]
        return torch.einsum("rchw,rc->rhw", x, weight) + self.logits.bias[class_ids][:, None, None]
