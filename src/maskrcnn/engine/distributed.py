"""Distributed data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N -m maskrcnn.cli train ...`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them and joins the process group
(NCCL when CUDA is available, gloo on CPU).  Without them, everything here is a no-op and the
same code trains in one process.  Only rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


#: How long a rank waits in a collective before the run fails.  Validation runs on rank 0 alone
#: while the others wait in the next collective, and a large validation set takes longer than
#: NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in 0..world_size-1, local_rank on its machine, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (once) and pick this process's device.

    device: "cpu" or "cuda" to force one; None = CUDA (GPU ``LOCAL_RANK``) when available.
    Outside torchrun returns rank 0 of 1 on that device."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself.

    ``find_unused_parameters`` is on: a frozen-BN or layer-regime model and a batch without
    positives may leave some parameters out of a step's graph."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over all processes (identity when not distributed)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def agreed_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over all processes (``value`` when not distributed): a number every
    rank then decides from alike, e.g. the elapsed time of a time budget, whose clocks differ."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks.
    ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
