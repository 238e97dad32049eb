"""Tokenized records → training samples → packed rows (upstream FM9G semantics).

A record ``{"input": I, "output": O}`` becomes ``src = [BOS] + I + O`` and ``tgt = [-100]*len(I) + O + [EOS]``:
``tgt[t]`` is the label of position t (already shifted), −100 where the next token is still input. A row of
``max_length`` tokens holds whole samples back to back; attention never crosses a sample boundary
(``cu_seqlens``), and ``position_ids`` restart at 0 for every sample and for the padding tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100

# Why a line produced no sample, or was changed (keys of the loader's statistics).
INPUT_TOO_LONG = "input_too_long"
OVERSIZE_DROPPED = "oversize_dropped"
TRUNCATED = "truncated"
SEGMENTED = "segmented"


def default_rule(input_ids: Sequence[int], rule: str | None) -> str:
    """``oversize_rule`` override, else ``head`` for instruction data and ``segment`` for plain text."""
    if rule is not None:
        return rule
    return "head" if len(input_ids) else "segment"


def build_samples(input_ids: list[int], output_ids: list[int], bos_id: int, eos_id: int, max_length: int,
                  rule: str | None = None) -> tuple[list[tuple[list[int], list[int]]], str | None]:
    """The samples of one record and what happened to it (None, or one of the event names above).

    Input of ``≥ max_length − 2`` tokens leaves no room for an answer: the record is dropped. A sample
    longer than ``max_length`` is cut to its head (``head``), cut into ``max_length`` chunks that each
    become a sample (``segment``), or dropped (``drop``).
    """
    n_in = len(input_ids)
    if n_in >= max_length - 2:
        return [], INPUT_TOO_LONG
    src = [bos_id] + input_ids + output_ids
    tgt = [IGNORE_INDEX] * n_in + output_ids + [eos_id]
    n = len(src)
    if n <= max_length:
        return [(src, tgt)], None
    rule = default_rule(input_ids, rule)
    if rule == "drop":
        return [], OVERSIZE_DROPPED
    if rule == "head":
        return [(src[:max_length], tgt[:max_length])], TRUNCATED
    return [(src[i:i + max_length], tgt[i:i + max_length]) for i in range(0, n, max_length)], SEGMENTED


@dataclass
class PackedBatchBuilder:
    """Fills ``batch_size`` rows of ``max_length`` tokens with whole samples, in order.

    ``add`` places a sample in the current row, or starts the next row when it does not fit; it returns
    False (placing nothing) when the batch has no row left, so the caller can emit the batch first.
    """

    batch_size: int
    max_length: int
    pad_id: int
    task_names: Sequence[str]

    def __post_init__(self) -> None:
        b, n = self.batch_size, self.max_length
        self.inputs = np.full((b, n), self.pad_id, dtype=np.int64)
        self.targets = np.full((b, n), IGNORE_INDEX, dtype=np.int64)
        self.task_ids = np.full((b, n), -1, dtype=np.int64)
        self.position_ids = np.zeros((b, n), dtype=np.int64)
        self._arange = np.arange(n, dtype=np.int64)
        self.row = 0
        self.col = 0
        self.row_closed = False  # do_compact = false: the row takes no further sample
        self.starts: list[list[int]] = [[] for _ in range(b)]
        self.used = [0] * b
        self.lines: list[tuple[int, int, int]] = []  # (task id, line, chunk) per sample, in order

    @property
    def empty(self) -> bool:
        return self.row == 0 and self.col == 0

    def add(self, src: list[int], tgt: list[int], task: int, line: int, compact: bool = True,
            chunk: int = 0) -> bool:
        """``chunk``: index of this sample among the chunks of its line (a segmented line is listed once)."""
        n = len(src)
        if n > self.max_length:
            raise ValueError(f"sample of {n} tokens > max_length {self.max_length} (apply build_samples first)")
        if self.row_closed or self.col + n > self.max_length:
            if self.row + 1 >= self.batch_size:
                return False
            self.row += 1
            self.col = 0
            self.row_closed = False
        r, c = self.row, self.col
        self.inputs[r, c:c + n] = src
        self.targets[r, c:c + n] = tgt
        self.task_ids[r, c:c + n] = task
        self.position_ids[r, c:c + n] = self._arange[:n]
        self.starts[r].append(c)
        self.lines.append((task, line, chunk))
        self.col = c + n
        self.used[r] = c + n
        self.row_closed = not compact
        return True

    def finish(self) -> dict:
        """The batch dict of contract 2 (torch tensors)."""
        b, n = self.batch_size, self.max_length
        lengths = [0] * b
        cu = [0]
        for r in range(b):
            used = self.used[r]
            lengths[r] = used
            base = r * n
            for s in self.starts[r][1:]:
                cu.append(base + s)
            if used:
                cu.append(base + used)
            if used < n:
                # padding tail: its own segment, positions restart there too
                self.position_ids[r, used:] = self._arange[:n - used]
                cu.append(base + n)
        cu_arr = np.asarray(cu, dtype=np.int32)
        indexes: dict[str, list[int]] = {}
        for task, line, chunk in self.lines:
            lst = indexes.setdefault(self.task_names[task], [])
            if chunk == 0 or not lst or lst[-1] != line:  # the chunks of a segmented line share it
                lst.append(line)
        return {
            "inputs": torch.from_numpy(self.inputs),
            "targets": torch.from_numpy(self.targets),
            "task_ids": torch.from_numpy(self.task_ids),
            "position_ids": torch.from_numpy(self.position_ids),
            "cu_seqlens": torch.from_numpy(cu_arr),
            "max_seqlen": int(np.diff(cu_arr).max()),
            "lengths": torch.tensor(lengths, dtype=torch.long),
            "num_tokens": int(sum(lengths)),
            "task_names": list(self.task_names),
            "indexes": indexes,
        }
