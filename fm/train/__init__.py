"""Training: typed train config, lr schedules, muP param groups, metrics, checkpoints and the pretraining loop.

Entry point: ``fm.train.trainer.run(load_config(path, cli=...))`` (what ``apps/fm9g_2b/pretrain_dragonfly.py``
does). Submodules import lazily so ``import fm.train`` stays cheap.
"""

from __future__ import annotations

from fm.train.config import ConfigError, TrainConfig, load_config
from fm.train.schedules import LRScheduler, Schedule, build_scheduler

__all__ = ["ConfigError", "TrainConfig", "load_config", "LRScheduler", "Schedule", "build_scheduler"]
