"""Training checkpoints that survive a kill at any moment, and loading pretrained weights.

A checkpoint ``ckpt-<step>.pt`` in the run folder holds the model, optimizer and scheduler
state dicts, the RNG states (python, numpy, torch, cuda) and the step.  It is written to a
hidden temporary file in the same folder, fsynced, then renamed over its final name, so a run
killed mid-save leaves at worst a stray ``.ckpt-*.tmp`` that is never mistaken for a checkpoint.
Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is read).

A full disk or an unwritable folder during a save raises MaskRCNNError naming the file; the
temporary file is removed and the earlier checkpoints stay as they were.

For testing kills during a save, the environment variable ``MASKRCNN_SLEEP_IN_SAVE`` (seconds)
pauses a save between writing the temporary file and renaming it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import MaskRCNNError, WeightsError
from ..utils import atomic_write_bytes, atomic_write_with
from ..weights.matching import load_state_partial

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
SLEEP_IN_SAVE_ENV = "MASKRCNN_SLEEP_IN_SAVE"


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """[(step, path)] of the finished checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


# ---- RNG states as tensors and plain values -----------------------------------------------
def rng_state() -> dict:
    """The python, numpy, torch (and cuda) generator states, in weights_only-loadable types."""
    py_version, py_keys, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": (py_version, torch.tensor(py_keys, dtype=torch.int64), py_gauss),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py_version, py_keys, py_gauss = state["python"]
    random.setstate((py_version, tuple(int(k) for k in py_keys.tolist()), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load -----------------------------------------------------------------------
def save_checkpoint(folder, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    extra: dict | None = None, keep: int = 3) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, then delete all but the newest ``keep`` checkpoints.

    ``extra``: more plain values to store (e.g. the config as a dict).  Returns the path."""
    state = {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    path = checkpoint_path(folder, step)

    def write(tmp):
        # through a Python file object: a full disk is then an OSError (ENOSPC), where
        # torch.save(state, name) reports a bare RuntimeError from its zip writer
        with open(tmp, "wb") as f:
            torch.save(state, f)
        pause = float(os.environ.get(SLEEP_IN_SAVE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)

    atomic_write_with(path, write)
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(path) -> dict:
    """Load one checkpoint file (weights_only, to the CPU).  Raises WeightsError if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disk error: all mean "not usable"
        raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise WeightsError(f"{path}: not a training checkpoint (no model/step)")
    return state


def latest_checkpoint(folder) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads, as (path, state); corrupt or partial files
    are skipped with a warning.  None if there is none."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except WeightsError as e:
            log.warning("skipping %s", e)
    return None


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the ``.ckpt-*.tmp`` files left by saves that were killed; returns them."""
    folder = Path(folder)
    stale = list(folder.glob(".ckpt-*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def restore(state: dict, model: torch.nn.Module, optimizer=None, scheduler=None) -> int:
    """Put a checkpoint's states back into the model, optimizer, scheduler and RNGs.
    Returns the step it was saved at."""
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


# ---- model folders ---------------------------------------------------------------------------
def save_model_folder(model: torch.nn.Module, folder, files: dict | None = None) -> Path:
    """Write ``model`` (``model.save``'s layout, or ``model.safetensors`` for another module)
    and ``files`` ({name: JSON value}) into ``folder``, replacing it as a whole: everything is
    written into a hidden sibling ``.<name>.new`` first, then swapped in by renames, so a
    reader (or a kill) never finds a half-written model; :func:`recover_model_folder` mends
    the one moment between the two renames.  Raises MaskRCNNError on a full disk or an
    unwritable folder (the earlier ``folder`` stays)."""
    folder = Path(folder)
    new, old = folder.parent / f".{folder.name}.new", folder.parent / f".{folder.name}.old"
    try:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        if hasattr(model, "save"):
            model.save(new)
        else:
            from safetensors.torch import save
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            atomic_write_bytes(new / "model.safetensors", save(state))
        for name, value in (files or {}).items():
            atomic_write_bytes(new / name, (json.dumps(value, indent=1) + "\n").encode())
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(new, folder)
    except OSError as e:
        shutil.rmtree(new, ignore_errors=True)
        raise MaskRCNNError(f"{folder}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_model_folder(folder) -> None:
    """Finish or undo a :func:`save_model_folder` that was killed: the previous model comes back
    if the new one was not yet in place; a half-written ``.new`` is removed."""
    folder = Path(folder)
    new, old = folder.parent / f".{folder.name}.new", folder.parent / f".{folder.name}.old"
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)
    for stale in (new, old):
        shutil.rmtree(stale, ignore_errors=True)


# ---- fine-tuning -----------------------------------------------------------------------------
#: ``--weights`` names for torchvision's published weights (fetched through torch's hub cache).
PRETRAINED_NAMES = ("coco", "imagenet")
#: torchvision's ImageNet weights per backbone (``torchvision.models`` enum, member).
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                    "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}
#: torchvision's init of the FPN (``kaiming_uniform_(a=1)``) and RPN (normal, this std).
RPN_INIT_STD = 0.01


def hub_state_dict(weights) -> dict:
    """The state dict of a torchvision weights enum member (``weights.url``), from torch's hub
    cache (``torch.hub.get_dir()/checkpoints``) or downloaded into it.  Offline and not cached:
    WeightsError naming the file to place in the cache."""
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.exists():
        try:
            return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True,
                                                      map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash a RuntimeError
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"{weights.url} could not be downloaded ({reason}); offline, place "
                               f"that file at {cached}") from None
    try:
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{cached}: not a readable weights file ({str(e).splitlines()[0]}); "
                           "delete it and download it again") from None


def is_resnet_classifier(state: dict) -> bool:
    """True for a torchvision ResNet classification state dict (``conv1.weight``, ``layer1.0...``)."""
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def resnet_classifier_to_ours(state: dict) -> dict:
    """Our backbone's names for a torchvision ResNet classification state dict: the same names
    under ``backbone.`` (our ResNet keeps torchvision's), the classifier ``fc.*`` dropped."""
    return {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}


def init_like_torchvision(model: torch.nn.Module) -> None:
    """Initialise the FPN, RPN and mask head as torchvision's Mask R-CNN does (its box head uses
    PyTorch's default Linear init, as ours): FPN convs ``kaiming_uniform_(a=1)``, RPN convs
    normal(std=RPN_INIT_STD), mask-head convs ``kaiming_normal_(fan_out, relu)``; biases 0."""
    rules = (("fpn", lambda w: torch.nn.init.kaiming_uniform_(w, a=1)),
             ("rpn", lambda w: torch.nn.init.normal_(w, std=RPN_INIT_STD)),
             ("mask_head", lambda w: torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")))
    with torch.no_grad():
        for name, init in rules:
            for module in getattr(model, name).modules() if hasattr(model, name) else ():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    init(module.weight)
                    if module.bias is not None:
                        module.bias.zero_()


def _pretrained_state(model: torch.nn.Module, source) -> tuple[dict, bool]:
    """(state dict in our names, whether it holds the backbone only) for ``source``."""
    config = getattr(model, "config", None)
    if source == "coco":
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        if config is not None and (config.backbone, config.backbone_style) != ("resnet50", "pytorch"):
            raise WeightsError("--weights coco is torchvision's ResNet-50 Mask R-CNN: it needs "
                               "backbone: resnet50 and backbone_style: pytorch (Config.preset('torchvision'))")
        from ..weights.torchvision import convert_state_dict
        return convert_state_dict(hub_state_dict(MaskRCNN_ResNet50_FPN_Weights.COCO_V1)), False
    if source == "imagenet":
        import torchvision.models as tvm

        if config is None or config.backbone_style != "pytorch" or config.backbone not in IMAGENET_WEIGHTS:
            raise WeightsError("--weights imagenet is torchvision's ImageNet ResNet: it needs "
                               f"backbone_style: pytorch and a backbone of {', '.join(IMAGENET_WEIGHTS)}")
        weights = getattr(tvm, IMAGENET_WEIGHTS[config.backbone]).IMAGENET1K_V1
        return resnet_classifier_to_ours(hub_state_dict(weights)), True
    state = _read_state_dict(source)
    if is_resnet_classifier(state):
        return resnet_classifier_to_ours(state), True
    if any(k.startswith("backbone.body.") for k in state):
        from ..weights.torchvision import convert_state_dict
        return convert_state_dict(state), False
    return state, False


def _read_state_dict(source) -> dict:
    """A state dict from a dict, a training checkpoint, a .safetensors/.pt file or a saved model
    folder (``MaskRCNN.save``)."""
    if isinstance(source, dict):
        return source["model"] if "model" in source and "step" in source else source
    from ..weights.io import WEIGHTS_FILE, read_weights
    path = Path(source)
    return read_weights(path / WEIGHTS_FILE if path.is_dir() else path)


def load_pretrained(model: torch.nn.Module, source) -> dict:
    """Copy the tensors of ``source`` whose names and shapes match into ``model``.

    source: a state dict, a checkpoint, a weights file or a saved model folder; a torchvision
    Mask R-CNN state dict (converted); a torchvision ResNet classification state dict
    (``conv1.weight``, ``layer1.0...``: the backbone, ``fc.*`` dropped); or "coco" / "imagenet":
    torchvision's COCO Mask R-CNN / ImageNet ResNet through torch's hub cache (see
    :func:`hub_state_dict`).  A backbone-only source leaves the rest initialised as torchvision
    does (:func:`init_like_torchvision`).
    Tensors whose shape differs (the class-specific layers when the class count changes, as
    Matterport's ``exclude=`` did by name) keep the model's fresh initialisation; one log line
    names them.  Returns dict(loaded=[...], reinitialised=[...], missing=[...], unexpected=[...],
    backbone_only=bool).  Raises WeightsError when nothing matches (the wrong file).
    """
    state, backbone_only = _pretrained_state(model, source)
    if backbone_only:
        init_like_torchvision(model)
    m = load_state_partial(model, state)
    loaded, missing, unexpected = list(m.matched), m.missing, m.unexpected
    reinit = [f"{name} {list(theirs)}->{list(ours)}" for name, theirs, ours in m.reshaped]
    if reinit:
        log.warning("load_pretrained: re-initialised %d tensor(s) whose shape differs from the "
                    "pretrained weights (class-specific layers): %s", len(reinit), ", ".join(reinit))
    log.info("load_pretrained: loaded %d tensors, %d missing, %d unexpected",
             len(loaded), len(missing), len(unexpected))
    return {"loaded": loaded, "reinitialised": reinit, "missing": missing, "unexpected": unexpected,
            "backbone_only": backbone_only}
