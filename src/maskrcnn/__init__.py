"""maskrcnn: Mask R-CNN instance segmentation on PyTorch.

    import maskrcnn
    model = maskrcnn.load("model_dir")      # or "model.onnx" (ONNX Runtime)
    dets = model.detect([image])[0]     # Detections: boxes, labels, scores, masks
"""
from .config import Config, ConfigError
from .structures import Detections

__version__ = "0.1.0"


def load(path, map_location="cpu", config=None):
    """The model at ``path``, ready for ``detect``: a :class:`MaskRCNN` from a folder written by
    ``MaskRCNN.save`` (or its ``.safetensors``), an ``OnnxMaskRCNN`` (ONNX Runtime) from an
    ``.onnx`` file written by ``maskrcnn export``."""
    from .export.onnx import load as load_any
    return load_any(path, map_location, config)


def __getattr__(name):
    # The model pulls in torchvision; import it on first use so `maskrcnn --help` stays quick.
    if name == "MaskRCNN":
        from .model.maskrcnn import MaskRCNN
        return MaskRCNN
    if name == "Dataset":
        from .data.dataset import Dataset
        return Dataset
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "Detections", "MaskRCNN", "Dataset", "load"]
