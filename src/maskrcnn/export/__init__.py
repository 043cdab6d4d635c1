"""Export to ONNX and inference on ONNX Runtime (the ``onnx`` extra)."""
from .onnx import OnnxMaskRCNN, export_onnx, load

__all__ = ["OnnxMaskRCNN", "export_onnx", "load"]
