"""The training loop: SGD, warm-up and decay, clipping, mixed precision, logs, checkpoints, DDP.

    trainer = Trainer(model, train_set, "runs/exp1", config, layers="heads")
    trainer.fit(steps=2000, resume=True)

The model is any ``nn.Module`` whose ``forward(images, targets)`` in train mode returns a dict of
scalar losses (already weighted); the trainer minimises their sum.  ``model.set_trainable(layers)``
is called when the model has it (Matterport's regimes "heads", "3+", "4+", "5+", "all").

What lands in ``out_dir``:
  checkpoints/ckpt-<step>.pt   every ``checkpoint_every`` steps and at the end (last ``keep`` kept)
  metrics.jsonl                one JSON record per logged step / validation: {"step", "lr", losses...}
  tb/                          the same scalars for TensorBoard
Only rank 0 writes.  ``fit(resume=True)`` restores the newest readable checkpoint and continues
exactly: the batch order is a pure function of (seed, epoch) and the RNG states are restored,
so on the CPU a resumed run repeats the uninterrupted run's losses.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import LAYER_REGIMES
from ..data.dataset import collate
from ..errors import MaskRCNNError
from ..utils import atomic_write_bytes
from . import checkpoint as ckpt
from .distributed import DistInfo, barrier, reduce_mean, unwrap, wrap_model
from .schedule import build_scheduler

log = logging.getLogger(__name__)

#: A time-limited run re-estimates how many steps fit in its budget after 10 steps, then
#: every RATE_CHECK_EVERY steps.
RATE_CHECK_EVERY = 100


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Move the tensors of each target dict to ``device`` (other values unchanged)."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """This process's batches of dataset indices for one epoch: a DistributedSampler shuffle
    (seeded by ``seed`` and ``epoch``) cut into full batches (the last partial one dropped)."""
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def sgd_optimizer(model: torch.nn.Module, learning_rate: float, momentum: float,
                  weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters; weight decay on weights (ndim > 1)
    only, not on biases and norm scales (Matterport excludes BN gamma/beta the same way)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MaskRCNNError("no trainable parameters (check --layers)")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=learning_rate, momentum=momentum)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` in {"auto", "bf16", "fp16", "off"}: "auto" is bf16 on
    GPUs that support it, fp16 on older GPUs, and off (fp32) on the CPU.  Measured on 2 cores
    of a Xeon with AMX, bf16 autocast makes a demo-model step 1.5x faster (0.36 -> 0.23 s), but
    its effect on the accuracy reached is not measured yet and fp32 keeps CPU runs exactly
    reproducible, so the CPU opts in with ``amp="bf16"``."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class Trainer:
    """Trains ``model`` on ``dataset`` (items ``(image uint8 [3,H,W], target dict)``).

    config:       a :class:`maskrcnn.Config` (learning_rate, learning_momentum, weight_decay,
                  gradient_clip_norm, warmup_steps, lr_schedule, lr_steps, lr_gamma,
                  images_per_gpu as the per-process batch size).
    layers:       regime passed to ``model.set_trainable`` (ignored if the model has none).
    evaluate:     ``evaluate(model) -> {"name": value}``, run on rank 0 in eval mode every
                  ``eval_every`` steps and at the end (0 = only at the end); e.g. mask and box AP.
    info:         this process's place in a distributed run (``init_distributed()``); default
                  single-process on the model's device.
    amp:          "auto", "bf16", "fp16" or "off" (see :func:`autocast_dtype`).
    """

    def __init__(self, model: torch.nn.Module, dataset, out_dir, config, *, layers: str = "all",
                 evaluate: Callable | None = None, eval_every: int = 0, checkpoint_every: int = 500,
                 keep: int = 3, log_every: int = 20, seed: int = 0, num_workers: int = 0,
                 info: DistInfo | None = None, amp: str = "auto", progress: bool = True):
        if layers not in LAYER_REGIMES:
            raise MaskRCNNError(f"layers={layers!r} is not one of {', '.join(LAYER_REGIMES)}")
        self.info = info or DistInfo(device=next(model.parameters()).device)
        self.model = model.to(self.info.device)
        self.dataset, self.config, self.layers = dataset, config, layers
        self.out_dir = Path(out_dir)
        self.evaluate, self.eval_every = evaluate, eval_every
        self.checkpoint_every, self.keep, self.log_every = checkpoint_every, keep, log_every
        self.seed, self.num_workers, self.progress = seed, num_workers, progress
        self.batch_size = config.images_per_gpu
        self.amp_dtype = autocast_dtype(self.info.device, amp)
        if len(dataset) < self.batch_size * self.info.world_size:
            raise MaskRCNNError(f"the training set has {len(dataset)} images, fewer than one batch "
                                f"({self.batch_size} x {self.info.world_size} processes)")
        if hasattr(model, "set_trainable"):
            model.set_trainable(layers)
        self.optimizer = sgd_optimizer(model, config.learning_rate, config.learning_momentum,
                                       config.weight_decay)
        self.scheduler, self.lr_factor = build_scheduler(self.optimizer, config, total_steps=1)
        self.scaler = torch.amp.GradScaler(self.info.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.wrapped = wrap_model(model, self.info)
        self.step = 0
        self._writer = None

    # ---- paths ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    # ---- data ----------------------------------------------------------------------------
    def batches(self, start_step: int):
        """Endless (images, targets) batches from optimizer step ``start_step`` on, the same
        batches an uninterrupted run would see at those steps."""
        per_epoch = len(self.dataset) // (self.batch_size * self.info.world_size)
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            chosen = epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch,
                                   self.info.rank, self.info.world_size)[offset:]
            # An own generator: DataLoader otherwise draws its base seed from the global RNG,
            # and a resumed run would then see a different torch random stream.
            loader = DataLoader(self.dataset, batch_sampler=chosen, collate_fn=collate,
                                num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, offset = epoch + 1, 0

    # ---- state ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 only)."""
        if not self.info.is_main:
            return None
        extra = {"scaler": self.scaler.state_dict(), "layers": self.layers}
        if hasattr(self.config, "to_dict"):
            extra["config"] = self.config.to_dict()
        return ckpt.save_checkpoint(self.checkpoint_dir, self.step, unwrap(self.wrapped),
                                    self.optimizer, self.scheduler, extra, self.keep)

    def resume(self) -> bool:
        """Restore the newest readable checkpoint of ``out_dir``; False when there is none."""
        if self.info.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
        barrier()
        found = ckpt.latest_checkpoint(self.checkpoint_dir)
        if found is None:
            return False
        path, state = found
        self.step = ckpt.restore(state, unwrap(self.wrapped), self.optimizer, self.scheduler)
        if state["extra"].get("scaler"):
            self.scaler.load_state_dict(state["extra"]["scaler"])
        if self.info.world_size > 1:  # each rank continues its own stream, not rank 0's copy
            torch.manual_seed(self.seed * 1000 + self.info.rank + self.step)
        if self.info.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed from %s (step %d)", path, self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop the records a killed run logged after its last checkpoint."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        atomic_write_bytes(self.metrics_path, "".join(kept).encode())

    # ---- logging -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._writer.add_scalar(k, v, record["step"])
        self._writer.flush()

    def _validate(self) -> dict:
        metrics = {}
        if self.evaluate is not None and self.info.is_main:
            model = unwrap(self.wrapped)
            model.eval()
            with torch.no_grad():
                metrics = {f"val/{k}": None if v is None else float(v)
                           for k, v in self.evaluate(model).items()}
            model.train()
            self._log({"step": self.step, **metrics})
        barrier()
        return metrics

    # ---- the loop ------------------------------------------------------------------------
    def train_step(self, images: list, targets: list) -> dict[str, float]:
        """One optimizer step on one batch; returns the float losses and their sum "loss"."""
        device = self.info.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = to_device(targets, device)
        amp = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        with amp:
            losses = self.wrapped(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise MaskRCNNError(f"the loss became {float(total)} at step {self.step + 1} "
                                f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); "
                                "lower learning_rate or resume from the last checkpoint")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(total.detach())
        return values

    def fit(self, steps: int, resume: bool = False, max_seconds: float | None = None) -> dict:
        """Train until optimizer step ``steps`` (counting steps done before a resume).

        max_seconds: stop earlier when the time is up; after 10 steps (and every
        ``RATE_CHECK_EVERY``) the schedule's length is set to the number of steps that fit, so a
        cosine rate still decays to about 0 by the end.
        Returns dict(step, seconds, it_per_s, losses of the last logged window, val metrics).
        """
        if resume:
            self.resume()
        self.lr_factor.total_steps = steps  # after resume: a resumed run may be asked to go further
        start_step, started = self.step, time.perf_counter()
        if self.info.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.wrapped.train()
        bar = None
        if self.progress and self.info.is_main:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=self.step, desc="train", dynamic_ncols=True, smoothing=0.1)
        window, window_start, last, val = [], time.perf_counter(), {}, {}
        checked = (0, 0.0)  # (steps, seconds) at the last rate check
        batches = self.batches(self.step)
        while self.step < min(steps, self.lr_factor.total_steps):
            values = self.train_step(*next(batches))
            window.append(values)
            elapsed = time.perf_counter() - started
            done = self.step - start_step
            if max_seconds is not None and (done == 10 or done % RATE_CHECK_EVERY == 0):
                # the first steps are slow and a shared machine's speed drifts: re-estimate from
                # the rate since the previous check
                rate = (done - checked[0]) / max(elapsed - checked[1], 1e-9)
                fit_steps = int(rate * max(max_seconds - elapsed, 0.0))
                self.lr_factor.total_steps = max(self.step + 1, min(steps, self.step + fit_steps))
                checked = (done, elapsed)
                if bar is not None:
                    bar.total = self.lr_factor.total_steps
            last_step = (self.step >= min(steps, self.lr_factor.total_steps)
                         or (max_seconds is not None and elapsed >= max_seconds))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k == "loss" or k.endswith("loss")}
                                | {"lr": f"{self.optimizer.param_groups[0]['lr']:.2g}"}, refresh=False)
            if self.step % self.log_every == 0 or last_step:
                now = time.perf_counter()
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                last = reduce_mean(mean, self.info.device)
                self._log({"step": self.step, "lr": self.optimizer.param_groups[0]["lr"], **last,
                           "it_per_s": len(window) / max(now - window_start, 1e-9),
                           "seconds": now - started})
                window, window_start = [], now
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and not last_step:
                self.save()
            if self.eval_every and self.step % self.eval_every == 0 and not last_step:
                val = self._validate()
            if last_step:
                break
        if bar is not None:
            bar.close()
        self.save()
        if self.evaluate is not None:
            val = self._validate()
        barrier()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        seconds = time.perf_counter() - started
        done = self.step - start_step
        return {"step": self.step, "seconds": seconds,
                "it_per_s": done / seconds if seconds > 0 else math.nan, "losses": last, **val}
