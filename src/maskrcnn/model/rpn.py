"""Region Proposal Network head: a shared 3x3 conv, then per-anchor objectness and box deltas.

The same head runs on every pyramid level (P2..P6); its outputs are concatenated in anchor order
(level, cell row-major, anchor in cell).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import conv1x1, convolve


class RPNHead(nn.Module):
    """Objectness and deltas for ``anchors_per_location`` anchors per feature-map cell.

    objectness: "softmax" predicts 2 logits (bg, fg) per anchor (Matterport), "sigmoid" one
    logit (torchvision); kept as ``kind``, which tells the proposal layer and the loss how to
    read the logits.
    """

    def __init__(self, in_channels: int, conv_channels: int, anchors_per_location: int,
                 objectness: str = "softmax"):
        super().__init__()
        if objectness not in ("softmax", "sigmoid"):
            raise ValueError(f"objectness={objectness!r}: expected 'softmax' or 'sigmoid'")
        self.kind = objectness
        self.num_logits = 2 if objectness == "softmax" else 1
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)
        self.objectness = nn.Conv2d(conv_channels, anchors_per_location * self.num_logits, 1)
        self.deltas = nn.Conv2d(conv_channels, anchors_per_location * 4, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: list of [N, C, H_l, W_l].

        Returns
            logits: [N, anchors, 2] (softmax head, (bg, fg)) or [N, anchors] (sigmoid head)
            deltas: [N, anchors, (dx, dy, log dw, log dh)] before multiplying by the std-dev.
        """
        logits, deltas = [], []
        for x in features:
            n = x.shape[0]
            shared = F.relu_(convolve(self.conv, x))
            logits.append(conv1x1(self.objectness, shared).permute(0, 2, 3, 1).reshape(n, -1, self.num_logits))
            deltas.append(conv1x1(self.deltas, shared).permute(0, 2, 3, 1).reshape(n, -1, 4))
        logits = torch.cat(logits, dim=1)
        if self.num_logits == 1:
            logits = logits.squeeze(2)
        return logits, torch.cat(deltas, dim=1)


    def foreground_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """This head's logits ([..., anchors, 2] softmax or [..., anchors] sigmoid) -> the
        foreground probability per anchor, [..., anchors]."""
        if self.kind == "softmax":
            return torch.softmax(logits, dim=-1)[..., 1]
        return torch.sigmoid(logits)

    def foreground_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """This head's logits -> the log-odds of foreground per anchor, [..., anchors]: the one
        logit of a sigmoid head, fg - bg of a softmax head (the same order of anchors as
        :meth:`foreground_probability`)."""
        if self.kind == "softmax":
            return logits[..., 1] - logits[..., 0]
        return logits
