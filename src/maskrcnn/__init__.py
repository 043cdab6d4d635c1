"""maskrcnn: Mask R-CNN instance segmentation on PyTorch.

    import maskrcnn
    model = maskrcnn.MaskRCNN.load("model_dir")
    dets = model.detect([image])[0]     # Detections: boxes, labels, scores, masks
"""
from .config import Config, ConfigError
from .structures import Detections

__version__ = "0.1.0"


def __getattr__(name):
    # The model pulls in torchvision; import it on first use so `maskrcnn --help` stays quick.
    if name == "MaskRCNN":
        from .model.maskrcnn import MaskRCNN
        return MaskRCNN
    if name == "Dataset":
        from .data.dataset import Dataset
        return Dataset
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "Detections", "MaskRCNN", "Dataset"]
