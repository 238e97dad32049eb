"""Tokenized records → training samples → packed rows (upstream FM9G semantics).

A record ``{"input": I, "output": O}`` becomes ``src = [BOS] + I + O`` and ``tgt = [-100]*len(I) + O + [EOS]``:
``tgt[t]`` is the label of position t (already shifted), −100 where the next token is still input. No BOS
(``bos_id`` None: a tokenizer that adds none to text, ``add_bos`` False, e.g. GPT-2's or Qwen's; or a chat-template
sample, whose ids are the template's, a BOS only where it writes one): ``src = I + O``,
``tgt = [-100]*(len(I) - 1) + O + [EOS]``. The BOS is decided per sample (:class:`fm.data.sources.Source` gives it
per dataset). A row of
``max_length`` tokens holds whole samples back to back; attention never crosses a sample boundary
(``cu_seqlens``), and ``position_ids`` restart at 0 for every sample and for the padding tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fm.constants import IGNORE_INDEX

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


def sample_pieces(input_ids: Sequence[int], output_ids: Sequence[int], bos_id: int | None, eos_id: int,
                  max_length: int, rule: str | None = None) -> tuple[list[tuple[tuple, int, int, int]], str | None]:
    """The samples of one record as ``(pieces, n, n_masked, last_label)`` and what happened to it (None, or one
    of the event names above).

    ``src`` of a sample is its ``pieces`` (sequences of ids: lists or arrays) back to back, ``n`` tokens. The
    common case keeps the record's id arrays as they are, ``([BOS], input, output)``: the tokens are copied
    once, when the batch is assembled. The labels are fully determined by ``src``, ``n_masked`` (leading −100
    positions, the input part) and ``last_label`` (the label of the last position); the others are the next
    token of ``src``. Input of ``≥ max_length − 2`` tokens leaves no room for an answer: the record is dropped.
    A sample longer than ``max_length`` is cut to its head (``head``), cut into ``max_length`` chunks that each
    become a sample (``segment``), or dropped (``drop``).

    ``bos_id`` None (no BOS for this sample: see the module docstring): ``src = input + output``, and the last input
    token is trained to predict the first output token (``n_masked = len(input) - 1``). A record with neither
    input nor output then has no token: it yields ``[EOS]`` → EOS.
    """
    n_in = len(input_ids)
    if n_in >= max_length - 2:
        return [], INPUT_TOO_LONG
    head: tuple = () if bos_id is None else (_bos(bos_id),)
    lead = len(head)
    if lead == 0 and n_in == 0 and len(output_ids) == 0:
        output_ids = _bos(eos_id)
    masked = max(n_in + lead - 1, 0)  # positions whose label is still an input token
    n = lead + n_in + len(output_ids)
    if n <= max_length:
        return [((*head, input_ids, output_ids) if n_in else (*head, output_ids), n, masked, eos_id)], None
    rule = default_rule(input_ids, rule)
    if rule == "drop":
        return [], OVERSIZE_DROPPED
    src = np.concatenate((*head, np.asarray(input_ids, dtype=np.int64), np.asarray(output_ids, dtype=np.int64)))

    def label(t: int) -> int:  # label of position t of the whole sample
        return IGNORE_INDEX if t < masked else (int(src[t + 1]) if t + 1 < n else eos_id)

    if rule == "head":
        return [((src[:max_length],), max_length, masked, label(max_length - 1))], TRUNCATED
    parts = []
    for a in range(0, n, max_length):
        b = min(a + max_length, n)
        parts.append(((src[a:b],), b - a, min(max(masked - a, 0), b - a), label(b - 1)))
    return parts, SEGMENTED


_BOS: dict[int, np.ndarray] = {}
_PAD: dict[tuple[int, int], np.ndarray] = {}


def _pad_row(pad_id: int, n: int) -> np.ndarray:
    """A read-only row of ``n`` pad ids (sliced for padding tails: no array built per batch)."""
    arr = _PAD.get((pad_id, n))
    if arr is None:
        arr = _PAD[(pad_id, n)] = np.full(n, pad_id, dtype=np.int64)
        arr.flags.writeable = False
    return arr


def _bos(bos_id: int) -> np.ndarray:
    arr = _BOS.get(bos_id)
    if arr is None:
        arr = _BOS[bos_id] = np.array([bos_id], dtype=np.int64)
    return arr


@dataclass
class PackedBatchBuilder:
    """Fills ``batch_size`` rows of ``max_length`` tokens with whole samples, in order.

    ``add_pieces`` places a sample in the current row, or starts the next row when it does not fit; it returns
    False (placing nothing) when the batch has no row left, so the caller can emit the batch first.
    A sample's tokens stay in the pieces it came in (the tokenizer's arrays) until :meth:`finish_numpy` copies
    all of them into the batch with one ``np.concatenate``.
    """

    batch_size: int
    max_length: int
    pad_id: int
    task_names: Sequence[str]

    def __post_init__(self) -> None:
        b = self.batch_size
        self.row = 0
        self.col = 0
        self.row_closed = False  # do_compact = false: the row takes no further sample
        self.pieces: list[Sequence[int]] = []  # the samples' token pieces, rows one after the other
        self.row_ends: list[int] = []  # len(self.pieces) where each finished row ends
        self.lengths: list[int] = [0] * b
        self.masked: list[int] = []  # per sample: leading −100 labels (its input tokens)
        self.last_label: list[int] = []  # per sample: label of its last position (EOS, or the next chunk's token)
        self.seg_lens: list[list[int]] = [[] for _ in range(b)]
        self.seg_tasks: list[list[int]] = [[] for _ in range(b)]
        self.lines: list[tuple[int, int, int]] = []  # (task id, line, chunk) per sample, in order

    @property
    def empty(self) -> bool:
        return not self.lines

    def add_pieces(self, pieces: Sequence[Sequence[int]], n: int, n_masked: int, last_label: int, task: int,
                   line: int, compact: bool = True, chunk: int = 0) -> bool:
        """Place a sample of :func:`sample_pieces`: ``n`` tokens in ``pieces``, its first ``n_masked`` labels −100
        and its last one ``last_label`` (the others are the next input token). ``chunk``: index of this sample
        among the chunks of its line (a segmented line is listed once)."""
        if n > self.max_length:
            raise ValueError(f"sample of {n} tokens > max_length {self.max_length} (apply sample_pieces first)")
        if self.row_closed or self.col + n > self.max_length:
            if self.row + 1 >= self.batch_size:
                return False
            self.lengths[self.row] = self.col
            self.row_ends.append(len(self.pieces))
            self.row += 1
            self.col = 0
        r = self.row
        self.pieces.extend(pieces)
        self.masked.append(n_masked)
        self.last_label.append(last_label)
        self.seg_lens[r].append(n)
        self.seg_tasks[r].append(task)
        self.lines.append((task, line, chunk))
        self.col += n
        self.row_closed = not compact
        return True

    def finish(self) -> dict:
        """The batch dict the trainer consumes (torch tensors; keys in docs/mixtures.md)."""
        return to_torch(self.finish_numpy())

    def finish_numpy(self) -> dict:
        """:meth:`finish` with numpy arrays: they cross process boundaries as plain bytes, cheaper than
        torch's shared-memory tensors for many small batches."""
        b, n = self.batch_size, self.max_length
        lengths = list(self.lengths)
        lengths[self.row] = self.col
        row_ends = [*self.row_ends, len(self.pieces)] + [len(self.pieces)] * (b - 1 - self.row)
        pieces: list[Sequence[int]] = []
        segs: list[int] = []
        seg_tasks: list[int] = []
        start = 0
        for r in range(b):
            pad = n - lengths[r]
            pieces += self.pieces[start:row_ends[r]]
            start = row_ends[r]
            segs += self.seg_lens[r]
            seg_tasks += self.seg_tasks[r]
            if pad:  # padding tail: its own segment
                pieces.append(_pad_row(self.pad_id, n)[:pad])
                segs.append(pad)
                seg_tasks.append(-1)
        seg_arr = np.array(segs, dtype=np.int64)
        ends = seg_arr.cumsum()  # rows are contiguous and each sums to max_length: global boundaries
        starts = ends - seg_arr
        flat = np.concatenate(pieces, dtype=np.int64)  # the one copy of the tokens
        tasks = np.array(seg_tasks, dtype=np.int64)
        task_ids = np.repeat(tasks, seg_arr)
        position_ids = np.arange(b * n, dtype=np.int64) - np.repeat(starts, seg_arr)
        # Targets: the next input token, then per sample its last label and −100 over its input part.
        targets = np.empty_like(flat)
        targets[:-1] = flat[1:]
        is_sample = tasks >= 0
        targets[ends[is_sample] - 1] = self.last_label
        # A few slices per batch (input parts, padding tails) cost less than whole-batch masks.
        if any(self.masked):
            for s, m in zip(starts[is_sample].tolist(), self.masked):
                if m:
                    targets[s:s + m] = IGNORE_INDEX
        for r in range(b):
            if lengths[r] < n:
                targets[r * n + lengths[r]:(r + 1) * n] = IGNORE_INDEX
        inputs, targets = flat.reshape(b, n), targets.reshape(b, n)
        task_ids, position_ids = task_ids.reshape(b, n), position_ids.reshape(b, n)
        cu_arr = np.zeros(len(ends) + 1, dtype=np.int32)
        cu_arr[1:] = ends
        indexes: dict[str, list[int]] = {}
        for task, line, chunk in self.lines:
            lst = indexes.setdefault(self.task_names[task], [])
            if chunk == 0 or not lst or lst[-1] != line:  # the chunks of a segmented line share it
                lst.append(line)
        return {
            "inputs": inputs,
            "targets": targets,
            "task_ids": task_ids,
            "position_ids": position_ids,
            "cu_seqlens": cu_arr,
            "max_seqlen": max(segs),
            "lengths": np.asarray(lengths, dtype=np.int64),
            "num_tokens": int(sum(lengths)),
            "num_targets": int(np.count_nonzero(targets != IGNORE_INDEX)),  # a host number: no device sync to count
            "task_names": list(self.task_names),
            "indexes": indexes,
        }


TENSOR_KEYS = ("inputs", "targets", "task_ids", "position_ids", "cu_seqlens", "lengths")


def to_torch(batch: dict) -> dict:
    """numpy arrays of a batch → torch tensors (no copy)."""
    for key in TENSOR_KEYS:
        batch[key] = torch.from_numpy(batch[key])
    return batch
