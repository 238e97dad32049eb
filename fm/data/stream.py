"""One virtual stream: its cursor in each dataset, the token-share mixer, and the packer.

Stream v (of V, one per rank × DataLoader worker) reads sequence positions ``v, v+V, …`` of every dataset
(fm.data.order), picks the next dataset with the token-share mixer and packs samples into rows. Its output
depends only on its :class:`~fm.data.state.StreamState`, which every batch carries as it was right after the
batch. A dataset is opened when the mixer first draws from it, and each refill is sized by the dataset's
weight, so a mixture of a thousand small datasets costs what it reads, not what it lists.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fm.data.mixture import DatasetSpec, TokenShareMixer
from fm.data.order import LineOrder
from fm.data.packing import INPUT_TOO_LONG, OVERSIZE_DROPPED, SEGMENTED, TRUNCATED, PackedBatchBuilder, sample_pieces
from fm.data.sources import Source, refill_lines
from fm.data.state import STAT_INDEX, StreamState

S_TOKENS, S_SAMPLES, S_LINES = STAT_INDEX["tokens"], STAT_INDEX["samples"], STAT_INDEX["lines"]
EVENT_COL = {e: STAT_INDEX[e] for e in (INPUT_TOO_LONG, OVERSIZE_DROPPED, TRUNCATED, SEGMENTED)}


@dataclass
class Plan:
    """Everything a worker needs to run its streams (picklable: no open files)."""

    specs: list[DatasetSpec]
    weights: list[float]
    dataset_states: list[dict]  # per dataset: {"lines", "layers"}
    tokenizer: Any
    batch_size: int
    max_length: int
    seed: int
    V: int
    vocab_size: int | None = None


class Cursor:
    """One stream's position in one dataset: counter n (lines done), seg (chunks of line n done), a buffer."""

    def __init__(self, source: Source, order: LineOrder, v: int, V: int, n: int, seg: int, max_length: int,
                 weight: float):
        self.source, self.order = source, order
        self.v, self.V = v, V
        self.n, self.seg = n, seg
        self.max_length = max_length
        self.refill = refill_lines(source.ds, weight)
        self.buffer: deque = deque()  # (line, samples, event) for lines n, n+1, …

    def _refill(self) -> None:
        start = self.n + len(self.buffer)
        top = self.v + (start + np.arange(self.refill, dtype=np.int64)) * self.V
        if self.order.length is not None:
            top = top[top < self.order.length]
        if self.order.nlines == 0 or len(top) == 0:
            return
        lines, epochs, roots = self.order.lines(top)
        tok = self.source.tokenizer
        bos, eos, max_length, rule = self.source.bos_id, tok.eos_id, self.max_length, self.source.spec.oversize_rule
        append = self.buffer.append
        for line, (in_ids, out_ids) in zip(lines.tolist(), self.source.tokenize(lines, epochs, roots)):
            append((line, *sample_pieces(in_ids, out_ids, bos, eos, max_length, rule)))

    def peek(self, stats: np.ndarray) -> tuple[int, tuple[tuple, int, int, int]] | None:
        """The next sample (line, (pieces, n, n_masked, last_label)), skipping (and counting in ``stats``) dropped
        lines; None when exhausted."""
        skipped = 0
        while True:
            if not self.buffer:
                self._refill()
                if not self.buffer:
                    return None
            line, samples, event = self.buffer[0]
            if samples:
                return line, samples[self.seg]
            skipped += 1
            if skipped > max(self.order.nlines, self.refill) and self.order.length is None:
                # a repeating dataset in which no line yields a sample would spin forever
                raise ValueError(f"task {self.source.spec.task_name!r}: {skipped} lines in a row dropped "
                                 f"({event}, max_length {self.max_length}): no line of this dataset can be trained; "
                                 "raise max_length, change oversize_rule, or remove the dataset")
            stats[EVENT_COL[event]] += 1
            stats[S_LINES] += 1
            self.buffer.popleft()
            self.n += 1

    def commit(self, stats: np.ndarray, ntokens: int) -> None:
        _, samples, event = self.buffer[0]
        if self.seg == 0:
            stats[S_LINES] += 1
            if event is not None:
                stats[EVENT_COL[event]] += 1
        stats[S_TOKENS] += ntokens
        stats[S_SAMPLES] += 1
        self.seg += 1
        if self.seg == len(samples):
            self.buffer.popleft()
            self.n += 1
            self.seg = 0


def run_stream(plan: Plan, v: int, start: StreamState) -> Iterator[tuple[dict, StreamState]]:
    """Batches of virtual stream v from ``start``; each with the stream's state right after it."""
    names = [s.task_name for s in plan.specs]
    state = start.copy()
    cursors: dict[int, Cursor] = {}  # opened when first drawn from
    touched: set[int] = set()  # cursors moved since the last snapshot

    def cursor(d: int) -> Cursor:
        cur = cursors.get(d)
        if cur is None:
            spec, ds_state = plan.specs[d], plan.dataset_states[d]
            order = LineOrder(ds_state["lines"], spec.allow_repeat, ds_state["layers"], plan.seed, spec.task_name)
            source = Source(spec, plan.tokenizer, plan.seed, plan.vocab_size)
            cur = cursors[d] = Cursor(source, order, v, plan.V, int(state.line[d]), int(state.chunk[d]),
                                      plan.max_length, plan.weights[d])
        return cur

    mixer = TokenShareMixer(plan.weights, state.mixer_tokens)
    for d, w in enumerate(plan.weights):
        if w <= 0:  # not in this data stage: never drawn (its position waits for a stage that has it)
            mixer.close(d)
    compact = [s.do_compact for s in plan.specs]
    pad = plan.tokenizer.pad_id

    def snapshot() -> StreamState:
        for d in touched:
            cur = cursors[d]
            state.line[d], state.chunk[d] = cur.n, cur.seg
        touched.clear()
        state.mixer_tokens[:] = mixer.tokens
        return state.copy()

    builder = PackedBatchBuilder(plan.batch_size, plan.max_length, pad, names)
    stats = state.stats
    while True:
        d = mixer.pick()
        if d < 0:
            break
        cur = cursor(d)
        touched.add(d)
        item = cur.peek(stats[d])
        if item is None:
            mixer.close(d)
            continue
        line, (pieces, n, masked, last) = item
        chunk = cur.seg
        if not builder.add_pieces(pieces, n, masked, last, d, line, compact[d], chunk):
            state.batches += 1
            yield builder.finish_numpy(), snapshot()  # state before this sample: a resume re-picks it
            builder = PackedBatchBuilder(plan.batch_size, plan.max_length, pad, names)
            builder.add_pieces(pieces, n, masked, last, d, line, compact[d], chunk)
        cur.commit(stats[d], n)
        touched.add(d)  # again: the snapshot above may have been taken between peek and commit
        mixer.add(d, n)
    if not builder.empty:
        state.batches += 1
        yield builder.finish_numpy(), snapshot()
