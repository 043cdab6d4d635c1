"""Import weights from a Keras ``.h5`` file written by Matterport's ``model.save_weights``.

Layout of such a file: one group per Keras layer (root attribute ``layer_names``), whose
attribute ``weight_names`` lists datasets ``<layer>/<param>:0`` in order; the nested RPN model
is one group ``rpn_model`` holding ``rpn_conv_shared/...``, ``rpn_class_raw/...``,
``rpn_bbox_pred/...``.  Full-model saves nest all of this under ``model_weights``.

Layout conversions: Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw); Dense (in, out) ->
(out, in); Conv2DTranspose (kh, kw, out, in) -> (in, out, kh, kw) without a spatial flip.  Box
deltas are (dy, dx, dh, dw) in Matterport and (dx, dy, dw, dh) here, so the output channels of
``rpn_bbox_pred`` and ``mrcnn_bbox_fc`` are reordered.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import WeightsError
from ..utils import import_extra
from .matching import load_state_exact

_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_CONV = {"kernel": "weight", "bias": "bias"}


def keras_to_torch_name(layer: str) -> str | None:
    """Our module name for a Matterport Keras layer name, or None for a layer we do not have."""
    if layer == "conv1":
        return "backbone.conv1"
    if layer == "bn_conv1":
        return "backbone.bn1"
    m = re.fullmatch(r"(res|bn)(\d)([a-z])_branch(2a|2b|2c|1)", layer)
    if m:
        kind, stage, block, branch = m.groups()
        prefix = f"backbone.layer{int(stage) - 1}.{ord(block) - ord('a')}"
        if branch == "1":
            return f"{prefix}.downsample.{0 if kind == 'res' else 1}"
        i = {"2a": 1, "2b": 2, "2c": 3}[branch]
        return f"{prefix}.{'conv' if kind == 'res' else 'bn'}{i}"
    m = re.fullmatch(r"fpn_c(\d)p\d", layer)
    if m:
        return f"fpn.lateral.{int(m.group(1)) - 2}"
    m = re.fullmatch(r"fpn_p([2-5])", layer)
    if m:
        return f"fpn.output.{int(m.group(1)) - 2}"
    fixed = {"rpn_conv_shared": "rpn.conv", "rpn_class_raw": "rpn.objectness", "rpn_bbox_pred": "rpn.deltas",
             "mrcnn_class_conv1": "box_head.conv1", "mrcnn_class_bn1": "box_head.bn1",
             "mrcnn_class_conv2": "box_head.conv2", "mrcnn_class_bn2": "box_head.bn2",
             "mrcnn_class_logits": "box_head.class_logits", "mrcnn_bbox_fc": "box_head.bbox",
             "mrcnn_mask_deconv": "mask_head.deconv", "mrcnn_mask": "mask_head.logits"}
    if layer in fixed:
        return fixed[layer]
    m = re.fullmatch(r"mrcnn_mask_(conv|bn)([1-4])", layer)
    if m:
        return f"mask_head.{'convs' if m.group(1) == 'conv' else 'norms'}.{int(m.group(2)) - 1}"
    return None


def _swap_delta_order(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder groups of 4 along ``dim`` from (dy, dx, dh, dw) to (dx, dy, dw, dh)."""
    n = t.shape[dim]
    idx = torch.arange(n).reshape(-1, 4)[:, [1, 0, 3, 2]].reshape(-1)
    return t.index_select(dim, idx)


def convert_tensor(layer: str, param: str, value: np.ndarray) -> tuple[str, torch.Tensor]:
    """(our parameter name, tensor) for one Keras weight."""
    t = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
    is_bn = layer.startswith("bn") or "_bn" in layer
    suffix = (_BN if is_bn else _CONV).get(param)
    if suffix is None:
        raise WeightsError(f"layer {layer}: unknown weight {param!r}")
    if param == "kernel":
        if t.dim() == 4:
            t = t.permute(3, 2, 0, 1)  # conv: (kh, kw, in, out) -> (out, in, kh, kw); deconv: -> (in, out, kh, kw)
        elif t.dim() == 2:
            t = t.t()
    if layer in ("rpn_bbox_pred", "mrcnn_bbox_fc"):
        t = _swap_delta_order(t, 0)
    return f"{keras_to_torch_name(layer)}.{suffix}", t.contiguous()


def read_matterport_h5(path) -> dict[str, torch.Tensor]:
    """All weights of a Matterport ``.h5`` as a state dict with our names.  Layers this model
    does not have (none in a standard file) are ignored.  Needs h5py (the ``matterport`` extra)."""
    path = Path(path)
    h5py = import_extra("h5py", "matterport", f"{path}: reading Matterport .h5 weights")
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 weights file ({e})") from None
    state = {}
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = [n.decode() if isinstance(n, bytes) else n for n in root.attrs.get("layer_names", list(root))]
        for lname in layer_names:
            if lname not in root:
                continue
            group = root[lname]
            for wname in group.attrs.get("weight_names", []):
                wname = wname.decode() if isinstance(wname, bytes) else wname
                parts = wname.split("/")
                layer, param = parts[-2], parts[-1].split(":")[0]
                if keras_to_torch_name(layer) is None:
                    continue
                name, tensor = convert_tensor(layer, param, group[wname][()])
                state[name] = tensor
    if not state:
        raise WeightsError(f"{path}: no Matterport Mask R-CNN layers found in the file")
    return state


def infer_config(state: dict[str, torch.Tensor], config: Config | None) -> Config:
    """Check the config against the file's shapes; with no config, infer backbone depth and
    num_classes from the file and take Matterport's other defaults."""
    n_classes = state["box_head.class_logits.weight"].shape[0] if "box_head.class_logits.weight" in state else None
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("backbone.layer3.")), default=-1)
    backbone = {6: "resnet50", 23: "resnet101"}.get(depth)
    if config is None:
        kwargs = {}
        if n_classes:
            kwargs["num_classes"] = int(n_classes)
        if backbone:
            kwargs["backbone"] = backbone
        return Config(**kwargs)
    return config


def load_matterport(cls, h5_path, config: Config | None = None, class_names=None):
    state = read_matterport_h5(h5_path)
    config = infer_config(state, config)
    model = cls(config, class_names)
    load_state_exact(model, state, str(h5_path))
    return model.eval()
