"""ONNX export of a :class:`maskrcnn.MaskRCNN`, and the same ``detect()`` on ONNX Runtime.

    maskrcnn export --weights run1/model --format onnx --out model.onnx
    model = maskrcnn.load("model.onnx")            # an OnnxMaskRCNN; a folder gives a MaskRCNN
    dets = model.detect([image])                   # the same Detections as the eager model

The graph (:class:`.graph.DetectionGraph`) holds the whole network of one molded image:
backbone, FPN, RPN, anchors, proposals, ROI pooling (torchvision's roi_align or Matterport's
crop_and_resize), the heads and the DetectionLayer.  Its inputs and outputs:

    image      [1, 3, H, W] float32, molded (resized, normalized, padded); H and W dynamic
    window     [4] float32 (x1, y1, x2, y2) pixels of the image's content inside ``image``
    boxes      [D, 4] float32 in the model's box frame (normalized for crop_and_resize models)
    class_ids  [D] int64;  scores [D] float32;  mask_probs [D, 2m, 2m] float32 (class masks)

Molding before and unmolding after (boxes to original pixels, full-size masks) run in Python,
the same functions as the eager model's.  The model's config, class names and category ids
travel in the file's ``metadata_props``; the graph's thresholds are the config's at export time.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..config import Config
from ..errors import MaskRCNNError, WeightsError

#: ONNX opset of exported files (17 is the oldest with everything the graph uses).
OPSET = 18
OPTIMIZE = True
INPUTS = ("image", "window")
OUTPUTS = ("boxes", "class_ids", "scores", "mask_probs")
META_CONFIG, META_CLASSES, META_CATEGORIES = "maskrcnn.config", "maskrcnn.class_names", "maskrcnn.category_ids"
#: ONNX Runtime fusions left off: folding a BatchNorm (or its Mul/Add) into the conv before it
#: is what the eager model does only where it folds (the exported graph holds those convs folded
#: already); elsewhere (Matterport's caffe ResNet and heads) the fused rounding moves near-tied
#: detections: on the parity fixture's image 3 one of 100 detections changes with them on.
UNFUSED = ("ConvBNFusion", "ConvMulFusion", "ConvAddFusion")
INSTALL_HINT = "ONNX export and ONNX Runtime need the onnx extra: pip install 'maskrcnn[onnx]'"


def require_onnx(*modules: str) -> None:
    """Raise MaskRCNNError naming the extra to install when one of ``modules`` is missing."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MaskRCNNError(f"{', '.join(missing)} not installed: {INSTALL_HINT}")


def example_shape(config: Config) -> tuple[int, int]:
    """A molded (H, W) to trace with: the largest square the config molds to."""
    if config.image_resize_mode == "torchvision":
        d = config.image_size_divisor
        side = -(-config.image_min_dim // d) * d
    elif config.image_resize_mode == "square":
        side = config.image_max_dim
    else:
        side = -(-config.image_min_dim // 64) * 64
    return side, side


def dynamic_sizes(config: Config) -> dict:
    """The exported image's dynamic dims.  Molding pads to a multiple of 64 (Matterport's square
    and pad64) or of ``image_size_divisor`` (torchvision); saying so lets the exporter reason
    about the pyramid's sizes exactly and quickly.  Other modes: any size."""
    if config.image_resize_mode in ("square", "pad64"):
        step = 64
    elif config.image_resize_mode == "torchvision":
        step = config.image_size_divisor
    else:
        return {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    return {2: step * torch.export.Dim("height_steps", min=1), 3: step * torch.export.Dim("width_steps", min=1)}


def _translations() -> dict:
    """aten ops the exporter has no ONNX function for, mapped to onnxscript's: a stable sort is
    ONNX TopK, whose ties keep the lower index first."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort
    return {torch.ops.aten.sort.stable: aten_sort}


def export_onnx(model, path, opset: int = OPSET) -> Path:
    """Write ``model`` (a MaskRCNN, any preset and class count) as an ONNX file at ``path``
    with dynamic image height and width.  Returns the path."""
    require_onnx("onnx", "onnxscript")
    import onnx

    from .graph import DetectionGraph

    if opset < 17:
        raise MaskRCNNError(f"opset {opset}: the exported graph needs opset 17 or newer")
    path = Path(path)
    was_training = model.training
    model = model.eval().cpu()
    graph = DetectionGraph(model).eval()
    h, w = example_shape(model.config)
    image = torch.zeros(1, 3, h, w)
    window = torch.tensor([0.0, 0.0, float(w), float(h)])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (image, window), dynamo=True, opset_version=opset,
                                        input_names=list(INPUTS), output_names=list(OUTPUTS),
                                        dynamic_shapes=(dynamic_sizes(model.config), None),
                                        custom_translation_table=_translations(), verbose=False,
                                        optimize=OPTIMIZE)
    finally:
        model.train(was_training)
    proto = program.model_proto
    meta = {META_CONFIG: json.dumps(model.config.to_dict()),
            META_CLASSES: json.dumps(model.class_names),
            META_CATEGORIES: json.dumps(getattr(model, "category_ids", None))}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = __doc__.split("\n\n")[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)
    return path


class OnnxMaskRCNN:
    """An exported model run by ONNX Runtime, with :class:`MaskRCNN`'s ``detect``.

    config, class_names, category_ids: read from the file's metadata.
    threads: ONNX Runtime's intra-op threads (default: torch's thread count).
    """

    def __init__(self, path, threads: int | None = None, providers=None):
        require_onnx("onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"],
                                                disabled_optimizers=list(UNFUSED))
        except Exception as e:
            raise WeightsError(f"{self.path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
        self.runtime = f"ONNX Runtime ({self.session.get_providers()[0].replace('ExecutionProvider', '')})"
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_CONFIG not in meta:
            raise WeightsError(f"{self.path}: no {META_CONFIG} in the metadata (not written by maskrcnn export)")
        self.config = Config.from_dict(json.loads(meta[META_CONFIG]))
        self.class_names = json.loads(meta.get(META_CLASSES, "null"))
        self.category_ids = json.loads(meta.get(META_CATEGORIES, "null"))

    @classmethod
    def load(cls, path, threads: int | None = None) -> "OnnxMaskRCNN":
        return cls(path, threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run_graph(self, image: torch.Tensor, window) -> dict:
        """The graph on one molded image [1, 3, H, W] with its window (y1, x1, y2, x2) pixels
        (``ImageMeta.window``).  Returns run_inference's dict (boxes, class_ids, scores, mask_probs)."""
        y1, x1, y2, x2 = window
        feeds = {"image": image.float().contiguous().numpy(),
                 "window": torch.tensor([x1, y1, x2, y2], dtype=torch.float32).numpy()}
        out = self.session.run(list(OUTPUTS), feeds)
        return {k: torch.from_numpy(v) for k, v in zip(OUTPUTS, out)}

    def detect(self, images, verbose: int = 0, batch_size: int | None = None) -> list:
        """:meth:`MaskRCNN.detect` on ONNX Runtime: one image per run (``batch_size`` is
        accepted and unused), each molded alone as the eager model with ``batch_size=1``."""
        from ..model.detection import unmold
        from ..model.preprocess import mold_images

        if hasattr(images, "ndim") and images.ndim == 3:
            images = [images]
        cfg = self.config
        results = []
        for image in images:
            batch, metas = mold_images([image], cfg, "cpu")
            raw = self.run_graph(batch, metas[0].window)
            results.append(unmold(raw, metas[0], tuple(batch.shape[-2:]), cfg.box_frame, cfg.mask_paste,
                                  cfg.mask_threshold))
        return results


def load(path, map_location="cpu", config: Config | None = None):
    """The model at ``path``: an :class:`OnnxMaskRCNN` for a ``.onnx`` file, else
    :meth:`MaskRCNN.load` (a folder written by ``save``, or its ``.safetensors``)."""
    if Path(path).suffix.lower() == ".onnx":
        if config is not None:
            raise MaskRCNNError(f"{path}: an exported model's config is fixed at export; "
                                "export again with the config you want")
        return OnnxMaskRCNN.load(path)
    from ..model.maskrcnn import MaskRCNN
    return MaskRCNN.load(path, map_location, config)
