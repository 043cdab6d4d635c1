"""Typed results of the model, and their COCO and Matterport forms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def encode_rle(masks: torch.Tensor) -> list[dict]:
    """COCO compressed RLEs of masks [N, H, W] bool: ``{"size": [H, W], "counts": str}`` each
    (counts decoded to ASCII so the records are JSON-ready).  The one RLE encoder of the package."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    # pycocotools wants [H, W, N] uint8 in Fortran order: that is [N, W, H] in C order, which
    # torch's transpose writes in one pass (numpy's asfortranarray of the view: twice the time)
    masks = torch.as_tensor(masks).cpu().to(torch.bool)
    array = masks.transpose(1, 2).contiguous().numpy().view(np.uint8).transpose(2, 1, 0)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
        rle["size"] = [int(v) for v in rle["size"]]
    return rles


#: The keys of Matterport's ``model.detect`` result dicts.
MATTERPORT_KEYS = ("rois", "class_ids", "scores", "masks")


def log_array(text: str, array) -> None:
    """Print an array's name, shape, value range and dtype, as Matterport's ``utils.log``."""
    array = np.asarray(array.detach().cpu() if torch.is_tensor(array) else array)
    rng = f"min: {array.min():10.5f}  max: {array.max():10.5f}" if array.size else f"min: {'':10}  max: {'':10}"
    print(f"{text:25}shape: {str(array.shape):20}  {rng}  {array.dtype}")


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

    def to_coco(self, image_id, category_ids=None) -> list[dict]:
        """COCO result records, one per instance: ``image_id``, ``category_id``, ``bbox``
        [x, y, width, height] pixels, ``score`` and ``segmentation`` (compressed RLE).
        ``category_ids`` maps our class id (index) to the dataset's category id (identity if
        None); instances of a class mapped to None (no such category) are left out."""
        records = []
        for i, rle in enumerate(encode_rle(self.masks)):
            label = int(self.labels[i])
            category = category_ids[label] if category_ids is not None else label
            if category is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            records.append({"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(self.scores[i]), "segmentation": rle})
        return records

    def __getitem__(self, key: str):
        """Matterport's dict access: ``r["rois"]``, ``r["class_ids"]``, ``r["scores"]``,
        ``r["masks"]`` (see :meth:`to_matterport`)."""
        if key not in MATTERPORT_KEYS:
            raise KeyError(f"{key!r}: a detection result has {', '.join(MATTERPORT_KEYS)}")
        return self.to_matterport()[key]

    def keys(self):
        return MATTERPORT_KEYS

    def to_matterport(self) -> dict:
        """Matterport's ``model.detect`` result for this image::

            rois:      [N, (y1, x1, y2, x2)] int32 pixels (y2, x2 exclusive)
            class_ids: [N] int32
            scores:    [N] float32
            masks:     [H, W, N] bool
        """
        boxes = torch.round(self.boxes.to(torch.float64)).numpy().astype(np.int32)
        return {"rois": np.ascontiguousarray(boxes[:, [1, 0, 3, 2]]).reshape(-1, 4),
                "class_ids": self.labels.numpy().astype(np.int32),
                "scores": self.scores.numpy().astype(np.float32),
                "masks": np.ascontiguousarray(self.masks.numpy().astype(bool).transpose(1, 2, 0))}
