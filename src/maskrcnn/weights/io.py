"""Our own weights format: a folder with ``model.safetensors`` (tensors), ``config.yaml`` (the
:class:`Config`) and ``meta.json`` (``class_names`` and the dataset's ``category_ids``).
safetensors holds no code, so loading an untrusted file cannot run anything."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..errors import WeightsError
from ..utils import atomic_write_bytes
from .matching import load_state_exact

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def save_model(model, path) -> None:
    """Write ``path/model.safetensors``, ``path/config.yaml`` and ``path/meta.json``, each
    atomically; the weights go last-but-one so a reader never pairs new weights with an old
    config of a different shape."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model.config.save(path / CONFIG_FILE)
    # bytes written by Python: a full disk is an OSError (one error line), where save_file
    # raises safetensors' own error type
    atomic_write_bytes(path / WEIGHTS_FILE, save(state, metadata={"format": "maskrcnn"}))
    meta = {"class_names": model.class_names, "category_ids": getattr(model, "category_ids", None)}
    atomic_write_bytes(path / META_FILE, json.dumps(meta).encode())


def read_weights(path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint read with
    ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a readable weights file ({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def load_model(cls, path, map_location="cpu", config: Config | None = None):
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.exists():
        raise WeightsError(f"{path}: no {WEIGHTS_FILE} here (expected a folder written by MaskRCNN.save)")
    if config is None:
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.exists():
            raise WeightsError(f"{path}: no {CONFIG_FILE} beside the weights; pass config=")
        try:
            config = Config.load(cfg_path)
        except ConfigError as e:
            raise WeightsError(str(e)) from None
    class_names = category_ids = None
    meta = folder / META_FILE
    if meta.exists():
        try:
            values = json.loads(meta.read_text())
            class_names, category_ids = values.get("class_names"), values.get("category_ids")
        except (json.JSONDecodeError, AttributeError) as e:
            raise WeightsError(f"{meta}: not valid JSON ({e})") from None
        if category_ids is not None and (not isinstance(category_ids, list) or len(category_ids) != config.num_classes):
            raise WeightsError(f"{meta}: category_ids must list one id per class ({config.num_classes})")
    model = cls(config, class_names, category_ids)
    load_state_exact(model, read_weights(weights), str(weights))
    return model.to(map_location).eval()
