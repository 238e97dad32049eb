"""Learning-rate schedules (upstream FM9G / BMTrain / MiniCPM semantics), all with linear warmup.

``t`` is the index of the optimizer step about to run (0 for the first). Warmup: ``lr·(t+1)/W`` for
``t < W`` (BMTrain's rule, so step 0 already moves). After warmup:

- ``cosine``: ``max(0.1·lr, lr·(0.1 + 0.45·(1 + cos(π·p))))`` with ``p = (t−W)/(T−W)``: lr → 0.1·lr.
- ``warmupstabledrop``: ``lr`` until ``T−D``, then ``lr·(0.1 + 0.9·(T−t)/D)``: a linear drop to 0.1·lr.
- ``warmupstableexp``: ``lr`` until ``B`` (drop_begin; < 0 means ``T−D``), then ``lr·drop_rate^((t−B)/D)``.
- ``linear``: ``lr·(T−t)/(T−W)`` (BMTrain's Linear, down to 0 at T).
- ``constant``: ``lr``.

``checkpoint.resume.rewarm_iters`` (upstream's ``resume_no_optimze``): after a resume at step R, the lr is
additionally multiplied by ``(t−R+1)/N`` for ``R ≤ t < R+N`` — a short re-warm for a fresh (not loaded) optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fm.train.config import ScheduleConfig


@dataclass
class Schedule:
    name: str
    lr: float
    train_iters: int
    warmup_iters: int = 0
    drop_iters: int = 0
    drop_begin: int = -1
    drop_rate: float = 0.5

    def __post_init__(self) -> None:
        self.name = self.name.strip().lower()
        if self.name not in ("cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant"):
            raise ValueError(f"unknown lr_scheduler {self.name!r}")

    def lr_at(self, t: int) -> float:
        lr, T, W, D = self.lr, self.train_iters, self.warmup_iters, self.drop_iters
        if t < W:
            return lr * (t + 1) / W
        if self.name == "constant":
            return lr
        if self.name == "cosine":
            p = min(1.0, (t - W) / max(1, T - W))
            return max(0.1 * lr, lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * p))))
        if self.name == "linear":
            return max(0.0, lr * (T - t) / max(1, T - W))
        if self.name == "warmupstabledrop":
            if t < T - D:
                return lr
            return lr * (0.1 + 0.9 * max(0, T - t) / max(1, D))
        begin = self.drop_begin if self.drop_begin >= 0 else T - D
        if t < begin:
            return lr
        return lr * self.drop_rate ** ((t - begin) / max(1, D))


class LRScheduler:
    """Owns the step counter; sets ``group["lr"] = schedule(t) · rewarm(t) · group["lr_scale"]``.

    Advances only on a taken optimizer step (skipped non-finite steps do not move it)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, schedule: Schedule, rewarm_iters: int = 0):
        self.optimizer = optimizer
        self.schedule = schedule
        self.rewarm_iters = rewarm_iters
        self.num_iters = 0  # optimizer steps taken
        self.rewarm_start: int | None = None
        self.apply()

    def start_rewarm(self) -> None:
        if self.rewarm_iters > 0:
            self.rewarm_start = self.num_iters
            self.apply()

    def current_lr(self) -> float:
        t = self.num_iters
        lr = self.schedule.lr_at(t)
        if self.rewarm_start is not None and self.rewarm_iters > 0:
            k = t - self.rewarm_start
            if 0 <= k < self.rewarm_iters:
                lr *= (k + 1) / self.rewarm_iters
        return lr

    def apply(self) -> float:
        lr = self.current_lr()
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def step(self) -> float:
        self.num_iters += 1
        return self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"num_iters": self.num_iters, "rewarm_start": self.rewarm_start, "schedule": vars(self.schedule).copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_iters = int(state["num_iters"])
        self.rewarm_start = state.get("rewarm_start")
        self.apply()


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer | None, *, lr: float, train_iters: int,
                    rewarm_iters: int = 0) -> LRScheduler:
    """From the train config's ``schedule`` section (fractions of ``train_iters`` resolved), the peak ``lr``
    (``optim.lr``) and ``rewarm_iters`` (``checkpoint.resume.rewarm_iters``)."""
    from fm.train.config import frac_or_steps

    sched = Schedule(cfg.name, lr, train_iters, frac_or_steps(cfg.warmup_iters, train_iters),
                     frac_or_steps(cfg.drop_iters, train_iters), cfg.drop_begin, cfg.drop_rate)
    return LRScheduler(optimizer, sched, rewarm_iters)
