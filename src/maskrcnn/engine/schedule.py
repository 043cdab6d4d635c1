"""Learning-rate schedules: linear warm-up, then step or cosine decay, as a ``LambdaLR``.

The factor multiplies ``config.learning_rate``; it is a pure function of the step, so a
scheduler restored from a checkpoint continues exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupDecay:
    """The learning-rate factor at optimizer step ``step`` (0-based).

    warmup_steps: the factor rises linearly from 1/warmup_steps to 1 over these steps.
    schedule:     "step" (times ``gamma`` at each of ``milestones``), "cosine" (from 1 down to 0
                  at ``total_steps``, counted after the warm-up) or "constant".
    total_steps:  length of the run (cosine only); changed while training through
                  :meth:`set_total_steps` (a time-budgeted run sets it once it knows how many
                  steps fit).
    """

    warmup_steps: int = 0
    schedule: str = "step"
    milestones: tuple = ()
    gamma: float = 0.1
    total_steps: int = 1

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.schedule == "step":
            decay = self.gamma ** sum(step >= m for m in self.milestones)
        elif self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0, step - self.warmup_steps) / span)
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.schedule == "constant":
            decay = 1.0
        else:
            raise ValueError(f"unknown lr schedule {self.schedule!r}")
        return warm * decay

    def set_total_steps(self, total_steps: int) -> None:
        """Make the schedule end at optimizer step ``total_steps`` (at least 1)."""
        self.total_steps = max(1, int(total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int
                    ) -> tuple[torch.optim.lr_scheduler.LambdaLR, WarmupDecay]:
    """LambdaLR over ``optimizer`` from ``config.warmup_steps``, ``lr_schedule``, ``lr_steps``
    and ``lr_gamma``.  Returns the scheduler and its factor function (whose
    :meth:`WarmupDecay.set_total_steps` changes the run's length)."""
    factor = WarmupDecay(config.warmup_steps, config.lr_schedule, tuple(config.lr_steps),
                         config.lr_gamma, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), factor
