"""Typed results of the model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Detections:
    """The instances found in one image, in the original image's pixel frame.

    boxes:  [N, (x1, y1, x2, y2)] float32, pixels of the original image (x2, y2 exclusive).
    labels: [N] int64 class ids, 1..num_classes-1 (0 is background and never appears).
    scores: [N] float32 confidence in [0, 1], sorted descending.
    masks:  [N, H, W] bool full-size instance masks of the original H x W image.
    All tensors are on the CPU.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls, height: int, width: int) -> "Detections":
        return cls(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                   torch.zeros(0, height, width, dtype=torch.bool))

    def to_coco(self, image_id: int, category_ids=None) -> list[dict]:
        """COCO result records: bbox as [x, y, w, h] and segmentation as compressed RLE.
        ``category_ids`` maps our class id to the dataset's category id (identity if None)."""
        from pycocotools import mask as mask_utils

        records = []
        masks = np.asfortranarray(self.masks.numpy().transpose(1, 2, 0).astype(np.uint8))
        rles = mask_utils.encode(masks) if len(self) else []
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            label = int(self.labels[i])
            rle = rles[i]
            rle["counts"] = rle["counts"].decode("ascii")
            records.append({
                "image_id": image_id,
                "category_id": category_ids[label] if category_ids is not None else label,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(self.scores[i]),
                "segmentation": rle,
            })
        return records
