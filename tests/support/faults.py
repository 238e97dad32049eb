"""Faults the test suite injects into a training run, as callbacks (:mod:`fm.train.callbacks`): the product reads no
test variable. In-process runs pass them to ``fm.train.trainer.run(cfg, callbacks=[...])``; torchrun's workers get
them from ``tests/support/worker.py --nan-steps/--die-after/--record-indexes``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import IO, Any

from fm.train.callbacks import Callback, TrainEnd


class NanLoss(Callback):
    """The losses of rank r at (1-based) iteration i are NaN, for every ``(r, i)`` in ``at``."""

    def __init__(self, at: set[tuple[int, int]]):
        self.at = set(at)

    def micro_batch(self, trainer, micro, loss):
        if (trainer.engine.rank, trainer.iteration + 1) in self.at:
            return loss * float("nan")
        return loss


class DieAfter(Callback):
    """The process SIGKILLs itself right after iteration ``n`` (a crash: nothing is saved, nothing cleaned up)."""

    def __init__(self, n: int):
        self.n = n

    def step_end(self, trainer, stats):
        if trainer.iteration == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordIndexes(Callback):
    """Each micro-batch's data-line indexes, appended to ``<dir>/rank-<r>.jsonl`` as ``{"iter", "indexes"}``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._file: IO[str] | None = None

    def micro_batch(self, trainer, micro: dict[str, Any], loss):
        if self._file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.dir / f"rank-{trainer.engine.rank}.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps({"iter": trainer.iteration + 1, "indexes": micro.get("indexes", {})}) + "\n")
        return loss

    def train_end(self, trainer, end: TrainEnd) -> None:
        self.close(trainer)

    def close(self, trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def parse_nan_steps(text: str) -> set[tuple[int, int]]:
    """``"1:2, 0:5"`` → ``{(1, 2), (0, 5)}``."""
    out = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        rank, _, it = item.partition(":")
        out.add((int(rank), int(it)))
    return out
