"""What the training loop does besides optimizer steps, as hooks (Detectron2's ``HookBase``).

:meth:`Trainer.fit <maskrcnn.engine.trainer.Trainer.fit>` is ``before_train``, then
``run_step`` + ``after_step`` until the last step, then ``after_train``; each hook is called in
list order.  The default hooks, in that order:

  TimeBudget        stop when ``max_seconds`` is up; re-fits the schedule's length to the pace
  MetricsLogger     window means of the losses to metrics.jsonl / TensorBoard; the tqdm bar
  Evaluation        validation every ``eval_every`` steps and at the end, ``model_best/`` at the
                    highest validation metric, early stop after ``patience`` evaluations
                    without improvement
  Checkpointer      ``checkpoints/ckpt-<step>.pt`` every ``checkpoint_every`` steps and at the end

A hook with state (the logger's open window, the best value so far) returns it from
``state_dict`` and gets it back from ``load_state_dict``: the checkpoint stores it, so a resumed
run logs, evaluates and stops exactly as the uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..utils import batches, read_ahead
from .distributed import agreed_max, gather_to_main, is_distributed, reduce_mean, unwrap

log = logging.getLogger(__name__)

#: MetricsLogger warns (once) when the steps of a logged window spent more than this share of
#: their time waiting for the DataLoader.
DATA_BOUND_SHARE = 0.5

#: A time-limited run re-estimates how many steps fit in its budget after 10 steps, then
#: every RATE_CHECK_EVERY steps, and whenever its schedule is about to end with time left.
FIRST_RATE_CHECK = 10
RATE_CHECK_EVERY = 100
#: Subfolder of the run folder holding the model with the best validation metric.
BEST_MODEL_DIR = "model_best"
BEST_INFO_FILE = "best.json"


class HookBase:
    """Override any of the methods; ``self.trainer`` is set before ``before_train``."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        """Called after every optimizer step; ``trainer.step`` is the number of steps done and
        ``trainer.values`` that step's float losses."""

    def after_train(self) -> None:
        pass

    def state_dict(self) -> dict:
        """Plain values to store in each checkpoint (restored by ``load_state_dict``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PeriodicHook(HookBase):
    """:meth:`run` every ``every`` steps (0 = only at the end) and after the last step, unless
    it has just run there.  Subclasses set ``every`` and record in ``last_step`` the step
    :meth:`run` last ran at."""

    every: int = 0
    last_step: int | None = None

    def after_step(self) -> None:
        t = self.trainer
        if self.every and t.step % self.every == 0 and not t.is_last_step():  # after_train does the last
            self.run()

    def after_train(self) -> None:
        if self.last_step != self.trainer.step:
            self.run()

    def run(self) -> None:
        raise NotImplementedError


class TimeBudget(HookBase):
    """Stop when ``max_seconds`` have passed.  After FIRST_RATE_CHECK steps (and every
    RATE_CHECK_EVERY) the schedule's length becomes the number of steps that fit, so a cosine
    rate still decays to about 0 by the end.  A schedule that would end with time left (an
    estimate made while another process held the cores) is re-estimated at its last step and
    extended when more steps fit (the cosine rate then rises again and decays to the new end).
    Under DDP every rank reads the slowest rank's elapsed time, so all of them change the
    schedule and stop at the same step (a rank that stopped alone would leave the others
    waiting in their next gradient all-reduce)."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds

    def before_train(self) -> None:
        self.started = time.perf_counter()
        self.start_step = self.trainer.step
        self.checked = (0, 0.0)  # (steps, seconds) at the last rate check

    def after_step(self) -> None:
        t = self.trainer
        elapsed = agreed_max(time.perf_counter() - self.started, t.info.device)
        done = t.step - self.start_step
        ending_early = t.step >= t.total_steps and t.step < t.max_steps and elapsed < self.max_seconds
        if done == FIRST_RATE_CHECK or done % RATE_CHECK_EVERY == 0 or (ending_early and done > self.checked[0]):
            # the first steps are slow and a shared machine's speed drifts: re-estimate from
            # the rate since the previous check
            rate = (done - self.checked[0]) / max(elapsed - self.checked[1], 1e-9)
            fit_steps = int(rate * max(self.max_seconds - elapsed, 0.0))
            t.set_total_steps(max(t.step + 1, min(t.max_steps, t.step + fit_steps)))
            self.checked = (done, elapsed)
        if elapsed >= self.max_seconds:
            t.request_stop(f"the time budget of {self.max_seconds:.0f} s is used")


class MetricsLogger(HookBase):
    """Every ``log_every`` steps (and at the last), the mean of each loss over the steps since
    the previous record, with the learning rate, speed and ``data_time`` (the mean seconds a
    step waited for its batch: a data pipeline that keeps up leaves it near 0), goes to
    metrics.jsonl and TensorBoard; the tqdm bar shows each step's losses."""

    def __init__(self, log_every: int, progress: bool):
        self.log_every, self.progress = log_every, progress
        self.window: list[dict] = []
        self.data_seconds = 0.0  # summed over the open window
        self.windows_seen = 0  # the first holds the workers' start-up: not judged
        self.warned_data = False
        self.last: dict = {}

    def before_train(self) -> None:
        t = self.trainer
        self.window_start = time.perf_counter()
        self.bar = None
        if self.progress and t.info.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=t.total_steps, initial=t.step, desc="train", dynamic_ncols=True,
                            smoothing=0.1)

    def after_step(self) -> None:
        t = self.trainer
        self.window.append(t.values)
        self.data_seconds += t.data_seconds
        if self.bar is not None:
            self.bar.total = t.total_steps
            self.bar.update(1)
            shown = {k: f"{v:.3f}" for k, v in t.values.items() if k.endswith("loss")}
            self.bar.set_postfix(shown | {"lr": f"{t.learning_rate:.2g}"}, refresh=False)
        if t.step % self.log_every == 0 or t.is_last_step():
            self.flush()

    def flush(self) -> None:
        """Log the mean of the open window (nothing when it is empty)."""
        if not self.window:
            return
        t = self.trainer
        now = time.perf_counter()
        mean = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
        self.last = reduce_mean(mean, t.info.device)
        step_time = max(now - self.window_start, 1e-9) / len(self.window)
        data_time = self.data_seconds / len(self.window)
        t.log({"step": t.step, "lr": t.learning_rate, **self.last, "it_per_s": 1 / step_time,
               "data_time": data_time, "seconds": now - t.started})
        self.windows_seen += 1
        if (self.windows_seen > 1 and not self.warned_data and data_time > DATA_BOUND_SHARE * step_time
                and t.info.is_main):
            self.warned_data = True
            where = (f"{t.num_workers} DataLoader worker(s)" if t.num_workers
                     else "the training process itself (no workers)")
            log.warning("the steps wait for their data: %.0f ms of each %.0f ms step (data_time in %s); loading "
                        "(decoding, augmentation, resizing) in %s is slower than the model trains: more workers "
                        "(--workers, or num_workers=) if cores are free, or a lighter augmentation",
                        data_time * 1e3, step_time * 1e3, t.metrics_path.name, where)
        self.window, self.window_start, self.data_seconds = [], now, 0.0

    def after_train(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()

    def state_dict(self) -> dict:
        return {"window": list(self.window), "data_seconds": self.data_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.window = list(state.get("window", []))
        self.data_seconds = float(state.get("data_seconds", 0.0))


class Evaluation(PeriodicHook):
    """``evaluate(model) -> {name: value}`` in eval mode every ``every`` steps (0 = only at the
    end) and after the last step; logged as ``val/<name>``.  It runs on rank 0, or on every
    rank when it says it shares the work (``evaluate.distributed``, as :func:`ap_evaluator`'s
    does); rank 0 logs, keeps the best model and counts the patience, and its stop reaches
    every rank.

    best_metric: the name whose highest value is kept in ``out_dir/model_best/`` (with
                 ``best.json``: step, metric, value, all metrics); ignored when ``evaluate``
                 does not return it.
    patience:    stop after this many evaluations in a row without a new best (None = never).
    """

    def __init__(self, evaluate: Callable, every: int = 0, best_metric: str = "mask_AP",
                 patience: int | None = None):
        self.evaluate, self.every = evaluate, every
        self.best_metric, self.patience = best_metric, patience
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the best
        self.last_step: int | None = None
        self.metrics: dict = {}

    def run(self) -> dict:
        """Evaluate now, log, update the best model and the patience count."""
        t = self.trainer
        self.last_step = t.step
        metrics = {}
        # an ap_evaluator runs on every rank (each detects its share); any other on rank 0
        shared = getattr(self.evaluate, "distributed", False) and t.info.world_size > 1
        if t.info.is_main or shared:
            model = unwrap(t.wrapped)
            model.eval()
            with torch.no_grad():
                metrics = {k: None if v is None else float(v) for k, v in self.evaluate(model).items()}
            model.train()
        if t.info.is_main:
            t.log({"step": t.step, **{f"val/{k}": v for k, v in metrics.items()}})
            self._track_best(model, metrics)
        # only rank 0 scores: its patience stop goes to every rank (a rank that stopped alone
        # would leave the others waiting in their next gradient all-reduce)
        if agreed_max(float(t.info.is_main and t.stop_reason is not None), t.info.device):
            t.request_stop("rank 0 stopped: no better validation metric within the patience")
        self.metrics = {f"val/{k}": v for k, v in metrics.items()}
        return self.metrics

    def _track_best(self, model, metrics: dict) -> None:
        if self.best_metric not in metrics:
            return
        value = metrics[self.best_metric]
        t = self.trainer
        if value is not None and (self.best_value is None or value > self.best_value):
            self.best_value, self.best_step, self.stale = value, t.step, 0
            from .checkpoint import save_model_folder
            save_model_folder(model, t.out_dir / BEST_MODEL_DIR,
                              {BEST_INFO_FILE: {"step": t.step, "metric": f"val/{self.best_metric}",
                                                "value": value, "metrics": metrics}})
            log.info("step %d: new best val/%s %.4f -> %s", t.step, self.best_metric, value,
                     t.out_dir / BEST_MODEL_DIR)
            return
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            best = "none yet" if self.best_value is None else f"{self.best_value:.4f} at step {self.best_step}"
            t.request_stop(f"no better val/{self.best_metric} in {self.stale} evaluations (best {best})")

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step, "stale": self.stale,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.stale, self.last_step = int(state.get("stale", 0)), state.get("last_step")


class Checkpointer(PeriodicHook):
    """A checkpoint every ``every`` steps (0 = only at the end) and after the last step."""

    def __init__(self, every: int):
        self.every = every

    def run(self) -> None:
        self.trainer.save()
        self.last_step = self.trainer.step


def ap_evaluator(dataset, class_names: list[str], batch_size: int = 4, progress: bool = True):
    """``evaluate(model) -> {"mask_AP", "mask_AP50", "box_AP", "box_AP50"}`` on the whole of
    ``dataset`` (items ``(image uint8 [3, H, W], target)``, labels in the model's class ids),
    with ``maskrcnn.evaluation``'s COCO evaluator and a progress bar on a terminal.

    Each image's detections are scored as they come (masks kept as RLE, never all full-size
    masks at once), so memory does not grow with the number of detections times image size.
    Under DDP every rank calls it (``evaluate.distributed``): each detects every
    world_size-th image, and rank 0 scores them all and returns the metrics ({} elsewhere)."""
    def evaluate(model) -> dict:
        from tqdm import tqdm

        from ..evaluation.coco_eval import CocoEvaluator

        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        mine = list(range(rank, len(dataset), world))
        evaluator = CocoEvaluator(class_names)
        with tqdm(total=len(dataset), desc="validate", unit="img", leave=False,
                  disable=None if progress and rank == 0 else True) as bar:
            # the next batch is read while the model runs on this one
            loaded = read_ahead(((i, dataset[i]) for i in mine), batch_size)
            for chunk in batches(loaded, batch_size):
                for (i, (_, target)), found in zip(chunk, model.detect([image for _, (image, _) in chunk])):
                    evaluator.add(target, found, image_id=i + 1)
                bar.update(len(chunk) * world)
        parts = gather_to_main(evaluator.state())
        if parts is None:
            return {}
        merged = CocoEvaluator(class_names)
        for part in parts:
            merged.extend(part)
        m = merged.compute()
        return {"mask_AP": m["segm"]["AP"], "mask_AP50": m["segm"]["AP50"],
                "box_AP": m["bbox"]["AP"], "box_AP50": m["bbox"]["AP50"]}
    evaluate.distributed = True
    return evaluate


def read_best_info(run_dir) -> dict | None:
    """``model_best/best.json`` of a run folder (step, metric, value, metrics), or None."""
    path = Path(run_dir) / BEST_MODEL_DIR / BEST_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else None
