"""Early warnings of instability: loss spikes (llm-foundry's loss-spike callback, OLMo-core's stability monitor).

A step's loss (the agreed cross-entropy of the step, every rank the same number) is compared with the running mean
and standard deviation of the last ``stability.spike_window`` good steps (finite and not spikes themselves)::

    z = (loss - mean) / std          a spike when the window is full and z > stability.spike_zscore

The decision is made on the host from the step's one agreement (:mod:`fm.train.step`), so every rank makes the same
one without another collective, and the trainer can skip the update (``stability.skip_spikes``) the way it skips a
non-finite step. ``stability.max_consecutive_spikes`` spikes in a row stop the run. The window and the counters are
part of the trainer's resumable state (the checkpoint's ``.log_ckpt``): a resumed run decides exactly as the
uninterrupted one, except that resuming restarts the count of consecutive spikes (the trainer sets it to 0: a resume
is a deliberate action, typically after such a stop).

A data stage (``data.stages``) changes the loss level: the window of the old stage says nothing about the new one
(and spikes never join the window, so a higher level would make every later step a spike). When a step's stage
differs from the previous step's (:meth:`SpikeDetector.enter_stage`; the stage is part of the state, so this holds
across a resume too), the window is emptied and the count of consecutive spikes restarts: detection re-arms once
``spike_window`` good steps of the new stage have filled it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpikeCheck:
    """What the detector said about one step: ``z`` is None while the window fills (or detection is off, or the
    loss is not finite)."""

    spike: bool
    z: float | None
    mean: float | None = None
    std: float | None = None


class SpikeDetector:
    """Running statistics of recent good losses and the spike counters; resumable (``state_dict``)."""

    def __init__(self, zscore: float = 0.0, window: int = 50):
        self.zscore = float(zscore)
        self.window = int(window)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.total = 0  # spikes seen by the run
        self.consecutive = 0  # spikes in a row up to the last step
        self.stage: int | None = None  # the data stage of the last step (None: no step yet)

    @property
    def enabled(self) -> bool:
        return self.zscore > 0

    def stats(self) -> tuple[float, float]:
        """Mean and (population) standard deviation of the window."""
        n = len(self.losses)
        mean = math.fsum(self.losses) / n
        var = math.fsum((x - mean) ** 2 for x in self.losses) / n
        return mean, math.sqrt(var)

    def check(self, loss: float) -> SpikeCheck:
        """Is ``loss`` a spike? Does not change the state (:meth:`observe` does)."""
        if not self.enabled or not math.isfinite(loss) or len(self.losses) < self.window:
            return SpikeCheck(False, None)
        mean, std = self.stats()
        if std > 0:
            z = (loss - mean) / std
        else:  # a flat window: any rise is infinitely many deviations away
            z = math.inf if loss > mean else 0.0
        return SpikeCheck(z > self.zscore, z, mean, std)

    def observe(self, loss: float, spike: bool) -> None:
        """The step is done: a good finite loss joins the window; a spike counts. A non-finite step is neither
        (it is counted by the trainer's non-finite rule) and ends no streak of spikes."""
        if spike:
            self.total += 1
            self.consecutive += 1
        elif math.isfinite(loss):
            self.consecutive = 0
            if self.enabled:
                self.losses.append(float(loss))

    def enter_stage(self, stage: int) -> bool:
        """The data stage of the next step. True when it differs from the last step's: the window is emptied and
        the consecutive count restarts (detection re-arms when the window is full again)."""
        changed = self.stage is not None and stage != self.stage
        if changed:
            self.losses.clear()
            self.consecutive = 0
        self.stage = stage
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "total": self.total, "consecutive": self.consecutive,
                "stage": self.stage}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in d.get("losses", ())), maxlen=self.window)
        self.total = int(d.get("total", 0))
        self.consecutive = int(d.get("consecutive", 0))
        stage = d.get("stage")  # absent in checkpoints from before data stages: the trainer infers it
        self.stage = None if stage is None else int(stage)
