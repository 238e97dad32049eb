"""Fault injection for the test suite: what a training run does when told to fail on purpose.

The trainer takes a :class:`FaultHooks` object (all no-ops by default). Tests that start training
in-process pass one; tests that launch workers through torchrun set ``FM_TEST_*`` environment
variables, which :func:`fm.train.trainer.run` reads once, at the process edge, with
:meth:`FaultHooks.from_env`:

* ``FM_TEST_NAN_STEPS="rank:iter,rank:iter"``: that rank's loss is NaN at that (1-based) iteration;
* ``FM_TEST_DIE_AFTER=iter``: the process SIGKILLs itself right after that iteration;
* ``FM_TEST_RECORD_INDEXES=DIR``: each step's data-line indexes are appended to ``DIR/rank-<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class FaultHooks:
    nan_loss_at: frozenset[tuple[int, int]] = frozenset()  # (rank, iteration) pairs whose loss is NaN
    die_after: int = 0  # SIGKILL after this iteration (0: never)
    record_dir: Path | None = None  # where to record the data-line indexes of every step
    _record: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FaultHooks:
        nan = set()
        for item in filter(None, (s.strip() for s in env.get("FM_TEST_NAN_STEPS", "").split(","))):
            r, _, it = item.partition(":")
            nan.add((int(r), int(it)))
        record = env.get("FM_TEST_RECORD_INDEXES")
        return cls(frozenset(nan), int(env.get("FM_TEST_DIE_AFTER", "0") or 0), Path(record) if record else None)

    def poisons(self, rank: int, iteration: int) -> bool:
        return (rank, iteration) in self.nan_loss_at

    def record(self, rank: int, iteration: int, micro: Mapping[str, Any]) -> None:
        if self.record_dir is None:
            return
        if self._record is None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            self._record = open(self.record_dir / f"rank-{rank}.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._record.write(json.dumps({"iter": iteration, "indexes": micro.get("indexes", {})}) + "\n")

    def after_step(self, iteration: int) -> None:
        if self.die_after and iteration == self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None
