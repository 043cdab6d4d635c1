"""The training loop: SGD, warm-up and decay, clipping, mixed precision, logs, checkpoints, DDP.

    trainer = Trainer(model, train_set, "runs/exp1", config, layers="heads", val_dataset=val_set)
    trainer.fit(steps=2000, resume=True)

``fit`` is a short loop over :meth:`Trainer.run_step`; logging, validation and the best model,
checkpoints, the time budget and early stopping are hooks (:mod:`maskrcnn.engine.hooks`).

The model is any ``nn.Module`` whose ``forward(images, targets)`` in train mode returns a dict of
scalar losses (already weighted); the trainer minimises their sum.  ``model.set_trainable(layers)``
is called when the model has it (Matterport's regimes "heads", "3+", "4+", "5+", "all").

What lands in ``out_dir``:
  checkpoints/ckpt-<step>.pt   every ``checkpoint_every`` steps and at the end (last ``keep`` kept)
  metrics.jsonl                one JSON record per logged step / validation: {"step", "lr", losses...}
  tb/                          the same scalars for TensorBoard
  model_best/                  with a validation set: the model at the best validation mask AP
Only rank 0 writes.  ``fit(resume=True)`` restores the newest readable checkpoint and continues
exactly: the batch order is a pure function of (seed, epoch); each item's augmentation draws
from generators seeded by (seed, epoch, position), whichever process loads it; the global RNG
states (the model's sampling) and the hooks' states are restored.  So on the CPU a resumed run
repeats the uninterrupted run's losses exactly, however often it was killed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import LAYER_REGIMES
from ..data.dataset import collate
from ..device import to_device
from ..errors import MaskRCNNError
from ..utils import atomic_write_bytes, usable_cores
from . import checkpoint as ckpt
from .distributed import DistInfo, agreed_max, barrier, unwrap, wrap_model
from .hooks import Checkpointer, Evaluation, HookBase, MetricsLogger, TimeBudget, ap_evaluator
from .schedule import build_scheduler

log = logging.getLogger(__name__)


#: Data loading processes per training process: on a CPU, where they share the cores with the
#: step's own threads; on CUDA at most this many (one per core left to this process), since a
#: Mask R-CNN item (decode, polygons to masks, augmentation, resize, mini masks) costs 80-110 ms
#: of one core at COCO sizes, and an H200 runs a step at batch 4 in under 0.1 s.
CPU_WORKERS = 2
CUDA_WORKERS_MAX = 8


def default_workers(device: torch.device) -> int:
    """How many DataLoader workers a training process on ``device`` uses when not told:
    ``CPU_WORKERS`` off CUDA; on CUDA the cores this process may use (its affinity, divided
    among torchrun's ``LOCAL_WORLD_SIZE`` processes) less one for the process itself, between
    ``CPU_WORKERS`` and ``CUDA_WORKERS_MAX``."""
    if torch.device(device).type != "cuda":
        return CPU_WORKERS
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(CPU_WORKERS, min(CUDA_WORKERS_MAX, usable_cores() // local - 1))


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA) with
    ``seed``: call it before building the model so the initial weights follow the seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded_rng(*key: int):
    """Run the body with python, numpy and torch (CPU) global generators seeded from ``key``
    (e.g. (seed, epoch, position)), then put the previous states back: the body's random draws
    are a pure function of ``key`` and the caller's streams are untouched."""
    words = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(2, np.uint32)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(int(words[0]))
    np.random.seed(int(words[0]))
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededItems(torch.utils.data.Dataset):
    """``dataset`` read with keys ``(epoch, position, index)``: item ``index`` is loaded (and
    augmented) under :func:`seeded_rng` ``(seed, epoch, position)``.  A DataLoader worker's own
    random stream depends on which batches it served before; this makes an item's augmentation
    the same in an uninterrupted run, a resumed one and with any number of workers.

    prepare: optional ``prepare(image, target) -> (image, target)`` run on each item after
    loading, under the same seeded stream (the model's per-image preparation,
    :func:`maskrcnn.model.training.prepare_training_item`: in the workers, not in the step)."""

    def __init__(self, dataset, seed: int, prepare: Callable | None = None):
        self.dataset, self.seed, self.prepare = dataset, seed, prepare

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, position, index = key
        with seeded_rng(self.seed, epoch, position):
            item = self.dataset[index]
            return self.prepare(*item) if self.prepare is not None else item


def item_preparer(model: torch.nn.Module) -> Callable | None:
    """The per-image training preparation of ``model`` for the data loader: a Mask R-CNN's
    :func:`~maskrcnn.model.training.prepare_training_item` with its config; None for any other
    model, whose ``forward`` gets the items as the dataset gives them."""
    from functools import partial

    from ..model.maskrcnn import MaskRCNN
    from ..model.training import prepare_training_item

    model = unwrap(model)
    return partial(prepare_training_item, config=model.config) if isinstance(model, MaskRCNN) else None


def targets_to_device(targets: list[dict], device: torch.device) -> list[dict]:
    """Move the tensors of each target dict to ``device`` (other values unchanged), through
    pinned memory without a GPU wait (:func:`maskrcnn.device.to_device`; the DataLoader's
    tensors are pinned already)."""
    return [{k: to_device(v, device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


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
    val_dataset:  validation items ``(image, target)`` (or a prepared :class:`maskrcnn.Dataset`),
                  labels in the model's class ids: COCO mask and box AP on all of it every
                  ``eval_every`` steps and at the end; ``out_dir/model_best/`` keeps the model
                  at the highest ``best_metric`` ("mask_AP"); ``patience`` evaluations without
                  a new best stop the run.
    evaluate:     instead of ``val_dataset``, any ``evaluate(model) -> {"name": value}``, run on
                  rank 0 in eval mode at the same times.
    hooks:        more :class:`~maskrcnn.engine.hooks.HookBase` objects, called after the
                  built-in ones.
    info:         this process's place in a distributed run (``init_distributed()``); default
                  single-process on the model's device.
    amp:          "auto", "bf16", "fp16" or "off" (see :func:`autocast_dtype`).
    prepare_in_workers: False leaves a Mask R-CNN's per-image preparation (resizing images and
                  masks) in the step, as before it moved to the data loader: the same losses,
                  slower; for measuring what the move gains.
    """

    def __init__(self, model: torch.nn.Module, dataset, out_dir, config, *, layers: str = "all",
                 val_dataset=None, evaluate: Callable | None = None, eval_every: int = 0,
                 best_metric: str = "mask_AP", patience: int | None = None,
                 checkpoint_every: int = 500, keep: int = 3, log_every: int = 20, seed: int = 0,
                 num_workers: int = 0, info: DistInfo | None = None, amp: str = "auto",
                 progress: bool = True, hooks: tuple = (), prepare_in_workers: bool = True):
        if layers not in LAYER_REGIMES:
            raise MaskRCNNError(f"layers={layers!r} is not one of {', '.join(LAYER_REGIMES)}")
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                            ("keep", keep)):
            if value < 0:
                raise MaskRCNNError(f"{name}={value}: must be 0 or more")
        if log_every < 1 or (patience is not None and patience < 1):
            raise MaskRCNNError(f"log_every={log_every}, patience={patience}: must be 1 or more")
        self.info = info or DistInfo(device=next(model.parameters()).device)
        self.model = model.to(self.info.device)
        self.dataset, self.config, self.layers = dataset, config, layers
        self.out_dir = Path(out_dir)
        self.seed, self.num_workers, self.keep = seed, num_workers, keep
        self.prepare_in_workers = prepare_in_workers
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
        self.step = self.start_step = 0
        self.max_steps = 1
        self.values: dict[str, float] = {}
        self.data_seconds = 0.0  # how long the last step waited for its batch
        self.stop_reason: str | None = None
        self._writer = None
        if evaluate is None and val_dataset is not None:
            evaluate = ap_evaluator(_as_items(val_dataset), _class_names(model, val_dataset),
                                    progress=progress)
        self.evaluation = (Evaluation(evaluate, eval_every, best_metric, patience)
                           if evaluate is not None else None)
        self.logger = MetricsLogger(log_every, progress)
        self.hooks: list[HookBase] = [self.logger, *([self.evaluation] if self.evaluation else []),
                                      Checkpointer(checkpoint_every), *hooks]

    # ---- paths ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    # ---- the run's length and end ----------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """The step the run ends at (the learning-rate schedule's length)."""
        return self.lr_factor.total_steps

    def set_total_steps(self, total: int) -> None:
        """End the run (and a cosine schedule) at step ``total``."""
        self.lr_factor.set_total_steps(total)

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (hooks: time budget, early stop)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.info.is_main:
                log.info("stopping at step %d: %s", self.step, reason)

    def is_last_step(self) -> bool:
        """True when the step just done is the run's last."""
        return self.stop_reason is not None or self.step >= min(self.max_steps, self.total_steps)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- data ----------------------------------------------------------------------------
    def batches(self, start_step: int):
        """Endless (images, targets) batches from optimizer step ``start_step`` on, the same
        batches (and augmentations) an uninterrupted run would see at those steps.  One
        DataLoader serves every epoch, so its workers start once, not at each epoch; they also
        do a Mask R-CNN's per-image preparation (:func:`item_preparer`), so that it overlaps
        the step instead of running in it."""
        prepare = item_preparer(self.wrapped) if self.prepare_in_workers else None
        loader = DataLoader(SeededItems(self.dataset, self.seed, prepare), batch_sampler=self.keyed_batches(start_step),
                            collate_fn=collate, num_workers=self.num_workers,
                            # pinned pages let run_step's non_blocking copies overlap the GPU
                            pin_memory=self.info.device.type == "cuda",
                            # an own generator: DataLoader otherwise draws its workers' base seed
                            # from the global RNG, and a resumed run would see another stream
                            generator=torch.Generator().manual_seed(self.seed))
        yield from loader

    def keyed_batches(self, start_step: int):
        """Endless batches of :class:`SeededItems` keys ``(epoch, position, index)`` from optimizer
        step ``start_step`` on: each epoch a seeded shuffle, cut into this process's batches."""
        per_epoch = len(self.dataset) // (self.batch_size * self.info.world_size)
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            chosen = epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch,
                                   self.info.rank, self.info.world_size)
            # position in the epoch across all processes: each rank's items draw their own streams
            first = [(b * self.info.world_size + self.info.rank) * self.batch_size for b in range(len(chosen))]
            for b in range(offset, len(chosen)):
                yield [(epoch, first[b] + j, index) for j, index in enumerate(chosen[b])]
            epoch, offset = epoch + 1, 0

    # ---- state ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 only), with the hooks' states."""
        if not self.info.is_main:
            return None
        extra = {"scaler": self.scaler.state_dict(), "layers": self.layers,
                 "hooks": {type(h).__name__: h.state_dict() for h in self.hooks}}
        if hasattr(self.config, "to_dict"):
            extra["config"] = self.config.to_dict()
        return ckpt.save_checkpoint(self.checkpoint_dir, self.step, unwrap(self.wrapped),
                                    self.optimizer, self.scheduler, extra, self.keep)

    def resume(self) -> bool:
        """Restore the newest readable checkpoint of ``out_dir``; False (and one log line) when
        there is none: the run starts from step 0 and the records of the one before are dropped."""
        if self.info.is_main:
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
            ckpt.recover_model_folder(self.out_dir / "model_best")
        barrier()
        found = ckpt.latest_checkpoint(self.checkpoint_dir)
        self._check_ranks_agree(-1 if found is None else int(found[1]["step"]))
        if found is None:
            if self.info.is_main:
                log.info("resume: no checkpoint in %s: training from step 0", self.checkpoint_dir)
                self._truncate_metrics(0)
            self.start_step = 0
            return False
        path, state = found
        self.step = ckpt.restore(state, unwrap(self.wrapped), self.optimizer, self.scheduler)
        extra = state["extra"]
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        for hook in self.hooks:
            hook.load_state_dict(extra.get("hooks", {}).get(type(hook).__name__, {}))
        if self.info.world_size > 1:  # each rank continues its own stream, not rank 0's copy
            torch.manual_seed(self.seed * 1000 + self.info.rank + self.step)
        self.start_step = self.step
        if self.info.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed from %s (step %d)", path, self.step)
        return True

    def _check_ranks_agree(self, step: int) -> None:
        """Under DDP every rank must resume from the same checkpoint step (``step``, -1 for
        none): ranks that disagree would run different numbers of steps from different weights
        and hang at their first all-reduce that has no partner.  One clear error on every rank
        instead (typically ``--out`` on storage one machine cannot see)."""
        if self.info.world_size <= 1:
            return
        highest, lowest = agreed_max(step, self.info.device), -agreed_max(-step, self.info.device)
        if highest != lowest:
            own = f"checkpoint step {step}" if step >= 0 else "no checkpoint"
            raise MaskRCNNError(f"resume: rank {self.info.rank} finds {own} in {self.checkpoint_dir}, another rank "
                                f"finds step {int(highest if step != highest else lowest)} (-1: none): every "
                                f"rank reads the run's checkpoints, so --out must be on storage all machines share")

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
    def log(self, record: dict) -> None:
        """Append ``record`` ({"step": int, name: number...}) to metrics.jsonl and TensorBoard
        (rank 0).  TensorBoard drops what a killed run logged after the step resumed from."""
        if not self.info.is_main:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MaskRCNNError(f"{self.metrics_path}: cannot write ({e.strerror or e})") from None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.start_step + 1)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._writer.add_scalar(k, v, record["step"])
        self._writer.flush()

    # ---- the loop ------------------------------------------------------------------------
    def run_step(self, images: list, targets: list) -> dict[str, float]:
        """One optimizer step on one batch; returns the float losses and their sum "loss"."""
        device = self.info.device
        images = [to_device(im, device) for im in images]
        targets = targets_to_device(targets, device)
        amp = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        with amp:
            losses = self.wrapped(images, targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        # The losses are read once, after the backward pass is queued: on a GPU each read makes
        # the host wait for every kernel before it, and a read between forward and backward
        # kept the host from queuing the backward while the forward ran.  A loss that is not
        # finite still stops the run before the optimizer touches the weights.
        names = [*losses, "loss"]
        values = dict(zip(names, torch.stack([v.detach().float() for v in [*losses.values(), total]]).tolist()))
        if not math.isfinite(values["loss"]):
            raise MaskRCNNError(f"the loss became {values['loss']} at step {self.step + 1} "
                                f"({', '.join(f'{k}={values[k]:.4g}' for k in losses)}); "
                                "lower learning_rate or resume from the last checkpoint")
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return values

    def fit(self, steps: int, resume: bool = False, max_seconds: float | None = None) -> dict:
        """Train until optimizer step ``steps`` (counting steps done before a resume).

        max_seconds: stop earlier when the time is up (see :class:`~maskrcnn.engine.hooks.TimeBudget`).
        Returns dict(step, seconds, it_per_s, losses of the last logged window, val metrics,
        best_step / best_value when validating, stop_reason).
        """
        if steps < 0:
            raise MaskRCNNError(f"steps={steps}: must be 0 or more")
        if resume:
            self.resume()
        self.max_steps, self.stop_reason = steps, None
        self.set_total_steps(steps)  # after resume: a resumed run may be asked to go further
        hooks = ([TimeBudget(max_seconds)] if max_seconds is not None else []) + self.hooks
        for hook in hooks:
            hook.trainer = self
        self.started = time.perf_counter()
        start_step = self.step
        if self.info.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.wrapped.train()
        for hook in hooks:
            hook.before_train()
        batches = self.batches(self.step)
        while self.step < min(self.max_steps, self.total_steps) and self.stop_reason is None:
            # the time the step waited for its batch (Detectron2's data_time): near 0 while the
            # DataLoader workers keep ahead of the step, the step's whole wait when they do not
            waited = time.perf_counter()
            batch = next(batches)
            self.data_seconds = time.perf_counter() - waited
            self.values = self.run_step(*batch)
            for hook in hooks:
                hook.after_step()
        for hook in hooks:
            hook.after_train()
        barrier()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        seconds = time.perf_counter() - self.started
        done = self.step - start_step
        result = {"step": self.step, "seconds": seconds,
                  "it_per_s": done / seconds if seconds > 0 else math.nan,
                  "losses": self.logger.last, "stop_reason": self.stop_reason}
        if self.evaluation is not None:
            result.update(self.evaluation.metrics, best_step=self.evaluation.best_step,
                          best_value=self.evaluation.best_value)
        return result


def _as_items(dataset):
    """Validation items ``(image, target)``: a prepared maskrcnn Dataset is wrapped."""
    if hasattr(dataset, "image_info") and hasattr(dataset, "load_mask"):
        from ..data.dataset import TorchDataset
        return TorchDataset(dataset)
    return dataset


def _class_names(model, dataset) -> list[str]:
    names = getattr(unwrap(model), "class_names", None) or getattr(dataset, "class_names", None)
    if names:
        return list(names)
    num_classes = unwrap(model).config.num_classes
    return ["BG"] + [f"class {i}" for i in range(1, num_classes)]
