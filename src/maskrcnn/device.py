"""Tensors of values the host knows (a std-dev, an image's window, the mean pixel) on the
model's device, without making a GPU wait.

``torch.tensor(values, device="cuda")`` (and ``x.new_tensor(values)`` for a CUDA ``x``) copies
from ordinary host memory, and PyTorch waits for that copy: the host stops until every kernel
queued before it has run, so the GPU then idles while the host queues the next kernels.  In a
detection that is one stall per image before the proposals, one before the detection layer and
one in each box decoding.  :func:`device_constant` makes such a tensor once per (values, dtype,
device), through pinned memory and an asynchronous copy, and keeps it.
"""
from __future__ import annotations

import functools

import torch


def _hashable(values):
    if isinstance(values, (list, tuple)):
        return tuple(_hashable(v) for v in values)
    if isinstance(values, torch.Tensor):
        return _hashable(values.tolist())
    return values.item() if hasattr(values, "item") else values  # numpy scalars too


@functools.lru_cache(maxsize=512)
def _kept(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # made outside inference_mode, so that training can save it for backward after a detect
    with torch.inference_mode(False), torch.no_grad():
        return to_device(torch.tensor(values, dtype=dtype), device)


def device_constant(values, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, kept for the next call on a GPU.

    values: a number or (nested) sequence of numbers.  Returns a tensor of their shape; on a
    CPU (or while a graph is traced or exported) a new one each call, elsewhere a shared one
    that callers must not modify in place.
    """
    device = torch.device(device)
    if device.type == "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return torch.tensor(values, dtype=dtype, device=device)
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return _kept(_hashable(values), dtype, device)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor.to(device)`` without making the host wait for a GPU.

    A CPU tensor bound for a GPU is copied through pinned memory, asynchronously: from ordinary
    host memory PyTorch waits for the copy, i.e. for every kernel queued before it (the stall
    described above).  Any other move, or none, is ``tensor.to(device)``.  The source may be
    changed afterwards: pinning copies it first.
    """
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def host_waits(fn) -> "collections.Counter[str]":
    """Where ``fn()`` makes the host wait for the GPU, on a CUDA machine: PyTorch's
    synchronisation warnings (``torch.cuda.set_sync_debug_mode("warn")``: a ``nonzero``, an
    ``.item()``, a copy to or from ordinary host memory...) counted by "folder/file.py:line" of
    the Python line that made each call (``maskrcnn/...``, ``torchvision/ops/...``).  The GPU is
    synchronised first, so that waits queued before the call are not counted."""
    import collections
    import os
    import warnings

    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "called a synchronizing" in str(w.message):  # not the mode's own "prototype" notice
            folder, name = os.path.split(w.filename)
            sites[f"{os.path.basename(folder)}/{name}:{w.lineno}"] += 1
    return sites
