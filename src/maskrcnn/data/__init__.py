"""Datasets: Matterport's Dataset API, COCO / labelme / VIA / mask-image readers, transforms, data checks.

    from maskrcnn.data import open_dataset, TorchDataset, build_transforms, collate
    ds = open_dataset(coco="train.json", images="train/")
    loader = DataLoader(TorchDataset(ds, build_transforms(train=True)), collate_fn=collate)
"""
from .checks import DataReport, check_dataset
from .coco import CocoDataset, read_coco
from .dataset import Dataset, Problem, TorchDataset, collate
from .formats import open_dataset
from .images import IntensityScaling, read_image
from .labelme import LabelmeDataset, read_labelme
from .masks import LabelImageDataset, MaskDirsDataset, read_labels, read_mask_dirs
from .transforms import build_transforms
from .via import ViaDataset, read_via

__all__ = ["Dataset", "TorchDataset", "collate", "Problem", "open_dataset", "read_image",
           "IntensityScaling", "CocoDataset", "read_coco", "LabelmeDataset", "read_labelme", "ViaDataset",
           "read_via", "LabelImageDataset", "read_labels", "MaskDirsDataset", "read_mask_dirs",
           "build_transforms", "check_dataset", "DataReport"]
