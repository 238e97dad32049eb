"""The training data loader: weighted mixture → tokenize → pack, sharded, with exact and reshardable resume.

Design (see docs/mixtures.md):

* Virtual streams. Each (rank, DataLoader worker) pair is a virtual stream ``v`` of ``V = world_size ×
  max(1, num_workers)``. A stream runs its own token-share mixer and packer, so its output depends only on
  its own small state.
* Line order. Dataset d's lines form an ordered *sequence*: epoch e is a deterministic permutation
  ``P_{d,e}`` (a keyed Feistel network: O(1) memory, whatever the dataset size), and epochs of an
  ``allow_repeat`` dataset follow each other (an infinite sequence). Stream v takes sequence positions
  ``v, v+V, v+2V, …``, so its progress in a dataset is one counter ``n``.
* Layers. Resuming with a different V' turns what is left of the sequence (the positions no stream took)
  into a new, shorter sequence that the V' streams share the same interleaved way. The remaining set is
  described by the old counters alone (``V`` integers), so a dataset's state is a short chain of layers
  ``[V, counters]``, compacted as soon as the holes they describe are filled.
* Snapshots. Every batch carries the state of its stream as it was right after the batch; the loader
  keeps, per stream, the snapshot of the last batch it handed out (not what workers prefetched) and which
  stream comes next in the DataLoader's round-robin order. That is the whole state: O(datasets × streams)
  integers, independent of how many lines were read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm.data.mixture import (
    DatasetSpec,
    MixtureConfig,
    TokenShareMixer,
    TransformError,
    _short,
    check_transformed,
    load_mixture,
    load_transform,
)
from fm.data.packing import (
    INPUT_TOO_LONG,
    OVERSIZE_DROPPED,
    SEGMENTED,
    TRUNCATED,
    PackedBatchBuilder,
    sample_pieces,
    to_torch,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
SMALL_DATASET = 1 << 16  # up to this many lines a whole epoch's permutation is cached (≤ 512 KB)
# Lines read + tokenized per dataset at a time (one tokenizer call): about REFILL_BYTES of text, between
# REFILL_MIN and REFILL_MAX lines. Large calls make SentencePiece ~10% cheaper per token than 256-line calls;
# the byte budget bounds what a stream buffers per dataset (~1 MB of text, ~1 MB of int32 ids).
REFILL_BYTES = 1 << 20
REFILL_MIN, REFILL_MAX = 16, 1024


def refill_lines(ds) -> int:
    """Lines per refill for dataset ``ds``, from its average line size (REFILL_MAX when it is unknown)."""
    nlines = len(ds)
    if hasattr(ds, "bin_path"):  # Megatron: about 4 bytes per token once read (no text)
        nbytes = os.path.getsize(ds.bin_path) // ds.dtype.itemsize * 4
    else:
        nbytes = getattr(ds, "nbytes", 0)
    if not nbytes or not nlines:
        return REFILL_MAX
    return max(REFILL_MIN, min(REFILL_MAX, REFILL_BYTES * nlines // nbytes))

# Per stream and dataset, the snapshot holds these integers (in this order).
C_N, C_SEG, C_MIX = 0, 1, 2  # line counter, chunks already taken from the current line, mixer tokens
STAT_KEYS = ("tokens", "samples", "lines", INPUT_TOO_LONG, OVERSIZE_DROPPED, TRUNCATED, SEGMENTED)
C_STATS = 3
NCOLS = C_STATS + len(STAT_KEYS)
S_TOKENS, S_SAMPLES, S_LINES, S_INPUT, S_OVERSIZE, S_TRUNC, S_SEG = range(C_STATS, NCOLS)
EVENT_COL = {INPUT_TOO_LONG: S_INPUT, OVERSIZE_DROPPED: S_OVERSIZE, TRUNCATED: S_TRUNC, SEGMENTED: S_SEG}


# --------------------------------------------------------------------------------------------- line order

def _key(*parts: Any) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a good 64-bit hash with numpy's wrapping uint64 arithmetic
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed pseudo-random permutation of ``range(n)`` evaluated at ``positions`` (O(1) memory).

    Feistel network on the smallest even bit width covering n, with cycle walking to stay below n.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 2:
        return positions.astype(np.int64) if n < 2 else (positions ^ np.uint64(key & 1)).astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    out = encrypt(positions)
    todo = np.flatnonzero(out >= np.uint64(n))
    while len(todo):  # cycle walking: expected < 4 rounds since the domain is < 4n
        out[todo] = encrypt(out[todo])
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


@dataclass
class _Layer:
    """The positions of the parent sequence that V streams with counters ``n`` did not take, in order."""

    V: int
    n: list[int]
    parent_len: int | None  # None: infinite

    def __post_init__(self) -> None:
        V, n = self.V, np.asarray(self.n, dtype=np.int64)
        self.m, self.M = int(n.min()), int(n.max())
        hi = self.V * self.M if self.parent_len is None else min(self.V * self.M, self.parent_len)
        idx = np.arange(V * self.m, max(hi, V * self.m), dtype=np.int64)
        self.partial = idx[idx // V >= n[idx % V]]  # holes between the slowest and the fastest stream
        self.S = len(self.partial)
        self.length = None if self.parent_len is None else self.parent_len - int(n.sum())

    def map(self, j: np.ndarray) -> np.ndarray:
        j = np.asarray(j, dtype=np.int64)
        out = self.V * self.M + (j - self.S)
        inside = j < self.S
        if inside.any():
            out[inside] = self.partial[j[inside]]
        return out


def _build_chain(layers: Sequence[Sequence], root_len: int | None) -> list[_Layer]:
    chain: list[_Layer] = []
    length = root_len
    for V, n in layers:
        layer = _Layer(int(V), [int(x) for x in n], length)
        chain.append(layer)
        length = layer.length
    return chain


def compact_layers(layers: list, root_len: int | None, next_min: int) -> list:
    """Replace layers whose holes are all behind every stream (``next_min``: smallest next top index) by offsets."""
    chain = _build_chain(layers, root_len)
    out: list = [None] * len(chain)
    a = np.asarray([next_min], dtype=np.int64)
    for k in range(len(chain) - 1, -1, -1):
        layer = chain[k]
        if int(a[0]) >= layer.S:
            out[k] = [1, [layer.V * layer.M - layer.S]]
        else:
            out[k] = [layer.V, list(layer.n)]
        a = layer.map(a)
    merged: list = []
    for V, n in out:  # bottom-up: fold consecutive offsets (identity layers vanish)
        if V == 1 and merged and merged[-1][0] == 1:
            merged[-1] = [1, [merged[-1][1][0] + n[0]]]
        else:
            merged.append([V, list(n)])
    return [layer for layer in merged if not (layer[0] == 1 and layer[1][0] == 0)]


class LineOrder:
    """Top-layer sequence positions of a dataset → line numbers (and epochs)."""

    def __init__(self, nlines: int, allow_repeat: bool, layers: Sequence, seed: int, task: str):
        self.nlines = nlines
        self.allow_repeat = allow_repeat and nlines > 0
        root_len = None if self.allow_repeat else nlines
        self.chain = _build_chain(layers, root_len)
        self.length = self.chain[-1].length if self.chain else root_len  # None: infinite
        self.seed, self.task = seed, task
        self._cache: dict[int, np.ndarray] = {}  # small datasets: whole permutations of recent epochs

    def _permute(self, pos: np.ndarray, epoch: int) -> np.ndarray:
        key = _key(self.seed, self.task, epoch)
        if self.nlines > SMALL_DATASET:
            return permute(pos, self.nlines, key)
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = permute(np.arange(self.nlines), self.nlines, key)
        return self._cache[epoch][pos]

    def lines(self, top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(line numbers, epochs, root positions) of top-layer positions (all < length)."""
        g = np.asarray(top, dtype=np.int64)
        for layer in reversed(self.chain):
            g = layer.map(g)
        epochs = g // self.nlines
        pos = g - epochs * self.nlines
        first, last = int(epochs.min(initial=0)), int(epochs.max(initial=0))
        if first == last:  # the usual case: one epoch (np.unique costs more than the permutation here)
            return self._permute(pos, first), epochs, g
        lines = np.empty_like(pos)
        for e in range(first, last + 1):
            sel = epochs == e
            if sel.any():
                lines[sel] = self._permute(pos[sel], e)
        return lines, epochs, g


# --------------------------------------------------------------------------------------------- sources

try:  # msgspec decodes ~2x faster than json (a dependency of the converter)
    import msgspec

    _decode = msgspec.json.Decoder().decode
except ImportError:  # pragma: no cover
    import json

    _decode = json.loads


class _LazyRandom:
    """The ``r`` a transform gets: a ``random.Random`` seeded on first use (seeding costs ~10 µs per line).

    It forwards every attribute to one shared ``random.Random``; most transforms never touch it.
    """

    __slots__ = ("_rng", "_seed", "_seeded")

    def __init__(self, rng: random.Random, seed: int):
        self._rng, self._seed, self._seeded = rng, seed, False

    def __getattr__(self, name: str) -> Any:
        if not self._seeded:
            self._rng.seed(self._seed)
            self._seeded = True
        return getattr(self._rng, name)


class _Lines:
    """Raw lines of an IndexedDataset by number: vectorised offsets + one mmap (no syscall per line)."""

    def __init__(self, ds):
        self.ds = ds
        self._mm = None
        off = getattr(ds, "_off", None)
        self.fast = off is not None and hasattr(ds, "upstream_format")
        if self.fast:
            self.off = off  # memory-mapped: never copied, whatever the dataset size
            self.upstream = bool(ds.upstream_format)  # n end offsets instead of n+1 offsets

    def get(self, lines: np.ndarray) -> list[bytes]:
        if not self.fast:
            return [self.ds[int(i)] for i in lines]
        if self._mm is None:
            import mmap

            with open(self.ds.data_path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.ds.nbytes else b""
        mm = self._mm
        if self.upstream:
            ends = self.off[lines].astype(np.int64)
            starts = np.where(lines > 0, self.off[np.maximum(lines - 1, 0)], 0).astype(np.int64)
        else:
            starts, ends = self.off[lines].astype(np.int64), self.off[lines + 1].astype(np.int64)
        return [mm[s:e].rstrip(b"\n") for s, e in zip(starts.tolist(), ends.tolist())]

    def __getstate__(self) -> dict:
        return {"ds": self.ds}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ds"])


class _Source:
    """Reads records of one dataset and turns them into token ids (input, output)."""

    def __init__(self, spec: DatasetSpec, tokenizer, seed: int):
        self.spec = spec
        self.tokenizer = tokenizer
        self.seed = seed
        self.rng = random.Random(0)
        if spec.format == "megatron":
            from fm.data.megatron import MegatronDataset

            self.ds = MegatronDataset(spec.path)
            self.transform = None
        else:
            from fm.data.indexed import IndexedDataset

            self.ds = IndexedDataset(spec.path)
            self.lines = _Lines(self.ds)
            self.transform = load_transform(spec.transforms) if spec.transforms else None

    def __len__(self) -> int:
        return len(self.ds)

    def _records(self, lines: np.ndarray) -> list[dict]:
        out = []
        for line, raw in zip(lines.tolist(), self.lines.get(lines)):
            try:
                rec = _decode(raw)
            except Exception as e:
                raise ValueError(f"{self.ds.data_path}: line {line + 1} is not valid JSON ({e}); "
                                 "rebuild the index with convert_json2index.py") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{self.ds.data_path}: line {line + 1} is not a JSON object")
            out.append(rec)
        return out

    def tokenize(self, lines: np.ndarray, epochs: np.ndarray, roots: np.ndarray) -> list[tuple[list, list]]:
        if self.spec.format == "megatron":
            return [((), np.asarray(self.ds[int(i)])) for i in lines.tolist()]
        inputs, outputs = [], []
        epoch_keys: dict[int, int] = {}
        records = self._records(lines)
        transform, rng = self.transform, self.rng  # locals: this loop runs once per line
        for line, epoch, root, record in zip(lines.tolist(), epochs.tolist(), roots.tolist(), records):
            if transform is None:
                inp, out = record.get("input", "") or "", record.get("output", "") or ""
                if not isinstance(inp, str) or not isinstance(out, str):
                    check_transformed({"input": inp, "output": out}, self.spec.task_name, record)
            else:
                # The RNG is a function of (seed, task, line, epoch): no RNG state to save, same result on resume.
                if epoch not in epoch_keys:
                    epoch_keys[epoch] = _key(self.seed, self.spec.task_name, "rng", epoch)
                r = _LazyRandom(rng, epoch_keys[epoch] ^ ((line * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
                try:
                    result = transform(record, root, r)
                except Exception as e:
                    raise TransformError(f"task {self.spec.task_name!r}: transform {self.spec.transforms} raised "
                                         f"{type(e).__name__}: {e} on line {line + 1} of "
                                         f"{getattr(self.ds, 'data_path', self.spec.path)} "
                                         f"{_short(record)}") from e
                if type(result) is dict and type(result.get("input")) is str and type(result.get("output")) is str:
                    inp, out = result["input"], result["output"]  # check_transformed's common case, inlined
                else:
                    inp, out = check_transformed(result, self.spec.task_name, record)
            inputs.append(inp)
            outputs.append(out)
        # int32 arrays where the tokenizer offers them (fm.tokenizer.Tokenizer): no Python int per token
        enc = getattr(self.tokenizer, "encode_batch_arrays", None) or self.tokenizer.encode_batch
        out_ids = enc(outputs)
        nonempty = [i for i, s in enumerate(inputs) if s]
        if not nonempty:
            return [((), ids) for ids in out_ids]
        in_ids: list = [()] * len(inputs)
        for i, ids in zip(nonempty, enc([inputs[i] for i in nonempty])):
            in_ids[i] = ids
        return list(zip(in_ids, out_ids))


class _Cursor:
    """One stream's position in one dataset: counter n (lines done), seg (chunks of line n done), a buffer."""

    def __init__(self, source: _Source, order: LineOrder, v: int, V: int, n: int, seg: int, max_length: int):
        self.source, self.order = source, order
        self.v, self.V = v, V
        self.n, self.seg = n, seg
        self.max_length = max_length
        self.refill = refill_lines(source.ds)
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
        bos, eos, max_length, rule = tok.bos_id, tok.eos_id, self.max_length, self.source.spec.oversize_rule
        append = self.buffer.append
        for line, (in_ids, out_ids) in zip(lines.tolist(), self.source.tokenize(lines, epochs, roots)):
            append((line, *sample_pieces(in_ids, out_ids, bos, eos, max_length, rule)))

    def peek(self, stats: list[int]) -> tuple[int, tuple[tuple, int, int, int]] | None:
        """The next sample (line, (pieces, n, n_masked, last_label)), skipping (and counting) dropped lines; None
        when exhausted."""
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

    def commit(self, stats: list[int], ntokens: int) -> None:
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


# --------------------------------------------------------------------------------------------- one stream

@dataclass
class _Plan:
    """Everything a worker needs to run its streams (picklable: no open files)."""

    specs: list[DatasetSpec]
    weights: list[float]
    dataset_states: list[dict]  # per dataset: {"lines", "layers"}
    tokenizer: Any
    batch_size: int
    max_length: int
    seed: int
    V: int


def run_stream(plan: _Plan, v: int, snapshot: dict) -> Iterator[tuple[dict, dict]]:
    """Batches of virtual stream v from ``snapshot``; each with the stream's snapshot right after it."""
    names = [s.task_name for s in plan.specs]
    sources = [_Source(s, plan.tokenizer, plan.seed) for s in plan.specs]
    cols = [list(c) for c in snapshot["c"]]
    cursors = []
    for d, (spec, ds_state) in enumerate(zip(plan.specs, plan.dataset_states)):
        order = LineOrder(ds_state["lines"], spec.allow_repeat, ds_state["layers"], plan.seed, spec.task_name)
        cursors.append(_Cursor(sources[d], order, v, plan.V, cols[d][C_N], cols[d][C_SEG], plan.max_length))
    mixer = TokenShareMixer(plan.weights, [c[C_MIX] for c in cols])
    active = [True] * len(cursors)
    batches = snapshot["b"]
    compact = [s.do_compact for s in plan.specs]
    pad = plan.tokenizer.pad_id

    def export() -> dict:
        for d, cur in enumerate(cursors):
            cols[d][C_N], cols[d][C_SEG], cols[d][C_MIX] = cur.n, cur.seg, mixer.tokens[d]
        return {"b": batches, "c": [list(c) for c in cols]}

    builder = PackedBatchBuilder(plan.batch_size, plan.max_length, pad, names)
    while True:
        d = mixer.pick(active)
        if d < 0:
            break
        cur = cursors[d]
        item = cur.peek(cols[d])
        if item is None:
            active[d] = False
            continue
        line, (pieces, n, masked, last) = item
        chunk = cur.seg
        if not builder.add_pieces(pieces, n, masked, last, d, line, compact[d], chunk):
            batches += 1
            yield builder.finish_numpy(), export()  # state before this sample: a resume re-picks it
            builder = PackedBatchBuilder(plan.batch_size, plan.max_length, pad, names)
            builder.add_pieces(pieces, n, masked, last, d, line, compact[d], chunk)
        cur.commit(cols[d], n)
        mixer.tokens[d] += n  # TokenShareMixer.add, inlined: this loop runs once per sample
        mixer.total += n
    if not builder.empty:
        batches += 1
        yield builder.finish_numpy(), export()


def _exhausted_reason(specs: Sequence[DatasetSpec], nlines: Sequence[int]) -> str:
    parts = [f"{s.task_name!r} ({'empty' if n == 0 else f'{n} lines, allow_repeat: false'})"
             for s, n in zip(specs, nlines)]
    return "every dataset is used up: " + ", ".join(parts)


class _MixtureIterable(IterableDataset):
    """DataLoader worker i runs virtual stream ``assignment[i]`` (a local stream index)."""

    def __init__(self, plan: _Plan, assignment: list[int], snapshots: list[dict], rank: int, local: int):
        self.plan, self.assignment, self.snapshots = plan, assignment, snapshots
        self.rank, self.local = rank, local

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = 0 if info is None else info.id
        if wid >= len(self.assignment):
            return
        s = self.assignment[wid]
        v = self.rank * self.local + s
        for batch, snap in run_stream(self.plan, v, self.snapshots[s]):
            batch["_stream"], batch["_state"] = s, snap
            yield batch
        yield {"_stream": s, "_end": True}


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------------------- the loader

class MixtureLoader:
    """Iterable over packed batches of one rank (contract 2 in /tmp/api.md); see the module docstring."""

    def __init__(self, config: MixtureConfig, tokenizer, *, batch_size: int, max_length: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or max_length < 4:
            raise ValueError(f"batch_size must be ≥ 1 and max_length ≥ 4, got {batch_size}, {max_length}")
        self.config = config
        self.specs = config.datasets
        self.task_names = config.task_names
        self.weights = config.weights()
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.seed = seed
        self.local = max(1, num_workers)
        self.V = world_size * self.local
        self.stop_reason: str | None = None
        nlines = [self._count_lines(s) for s in self.specs]
        self._datasets = [{"lines": n, "layers": [], "base": [0] * len(STAT_KEYS)} for n in nlines]
        self._streams = [self._fresh_snapshot() for _ in range(self.local)]
        self._finished = [False] * self.local
        self._next = 0

    @staticmethod
    def _count_lines(spec: DatasetSpec) -> int:
        if spec.format == "megatron":
            from fm.data.megatron import MegatronDataset

            return len(MegatronDataset(spec.path))
        from fm.data.indexed import IndexedDataset

        return len(IndexedDataset(spec.path))

    def _fresh_snapshot(self) -> dict:
        return {"b": 0, "c": [[0] * NCOLS for _ in self.specs]}

    def _plan(self) -> _Plan:
        return _Plan(self.specs, self.weights, [{"lines": d["lines"], "layers": d["layers"]} for d in self._datasets],
                     self.tokenizer, self.batch_size, self.max_length, self.seed, self.V)

    # ---- iteration

    def __iter__(self) -> Iterator[dict]:
        order = [(self._next + i) % self.local for i in range(self.local)]
        order = [s for s in order if not self._finished[s]]
        self.stop_reason = None
        if order:
            data = _MixtureIterable(self._plan(), order, [dict(s) for s in self._streams], self.rank, self.local)
            if self.num_workers == 0:
                items = iter(data)
                loader = None
            else:
                loader = DataLoader(data, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                    prefetch_factor=self.prefetch_factor, persistent_workers=False)
                items = iter(loader)
            try:
                for item in items:
                    s = item.pop("_stream")
                    self._next = (s + 1) % self.local
                    if item.get("_end"):
                        self._finished[s] = True
                        continue
                    self._streams[s] = item.pop("_state")
                    yield to_torch(item)
            finally:
                del items, loader  # shuts the workers down (prefetched batches are dropped, never counted)
        self.stop_reason = _exhausted_reason(self.specs, [d["lines"] for d in self._datasets])
        log.info("data loader of rank %d ended: %s", self.rank, self.stop_reason)

    # ---- state

    def _meta(self) -> dict:
        return {"kind": "fm.mixture_loader", "version": STATE_VERSION, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.num_workers, "V": self.V,
                "batch_size": self.batch_size, "max_length": self.max_length}

    def state_dict(self) -> dict:
        """This rank's state as of the last batch handed out (JSON-serialisable); merge ranks with merge_states."""
        # Statistics leave the per-stream snapshots (which keep only counters) and are summed per dataset:
        # merge_states adds the ranks' sums; the totals from before a resume are counted by rank 0 only.
        tasks = []
        for d, (spec, w, ds) in enumerate(zip(self.specs, self.weights, self._datasets)):
            base = list(ds["base"]) if self.rank == 0 else [0] * len(STAT_KEYS)
            for snap in self._streams:
                for k in range(len(STAT_KEYS)):
                    base[k] += snap["c"][d][C_STATS + k]
            tasks.append({"task": spec.task_name, "weight": w, "allow_repeat": spec.allow_repeat,
                          "lines": ds["lines"], "layers": [[V, list(n)] for V, n in ds["layers"]], "base": base})
        first = self.rank * self.local
        streams = {str(first + i): {"b": s["b"], "c": [c[:C_STATS] for c in s["c"]], "f": self._finished[i]}
                   for i, s in enumerate(self._streams)}
        return {**self._meta(), "tasks": tasks, "streams": streams, "next": {str(self.rank): self._next}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a global state (merge_states), for any world size / worker count / config change."""
        _check_state(state)
        if len(state["streams"]) != state["V"]:
            raise ValueError(f"loader state holds {len(state['streams'])} of {state['V']} streams: "
                             "pass merge_states([state of every rank]), not one rank's state_dict()")
        old = {t["task"]: (i, t) for i, t in enumerate(state["tasks"])}
        # num_workers 0 and 1 both mean one stream per rank: same streams, exact continuation
        same_streams = state["V"] == self.V and state["world_size"] == self.world_size
        same_mix = [t["task"] for t in state["tasks"]] == self.task_names and \
            all(abs(t["weight"] - w) < 1e-12 for t, w in zip(state["tasks"], self.weights))
        if not same_mix:
            log.warning("dataset mixture changed since the checkpoint (tasks or weights): token-share counters "
                        "restart; datasets kept continue where they were, new ones start at their beginning")
        if state["batch_size"] != self.batch_size or state["max_length"] != self.max_length:
            log.warning("batch_size/max_length changed since the checkpoint (%s×%s → %s×%s): rows differ from an "
                        "uninterrupted run, no line is skipped or repeated", state["batch_size"],
                        state["max_length"], self.batch_size, self.max_length)
        if state["seed"] != self.seed:
            log.warning("seed changed since the checkpoint (%s → %s): the order of lines not yet read changes",
                        state["seed"], self.seed)
        if not same_streams:
            log.info("resharding the data loader: %d streams (world %d × workers %d) → %d (world %d × workers %d)",
                     state["V"], state["world_size"], state["num_workers"], self.V, self.world_size, self.num_workers)
        streams = [state["streams"][str(v)] for v in range(state["V"])]
        first = self.rank * self.local
        new_streams = [self._fresh_snapshot() for _ in range(self.local)]
        if same_streams:
            for i in range(self.local):
                new_streams[i]["b"] = streams[first + i]["b"]
        for d, spec in enumerate(self.specs):
            name = spec.task_name
            ds = self._datasets[d]
            if name not in old:
                log.warning("dataset %r is new since the checkpoint: it starts at its beginning", name)
                ds.update(layers=[], base=[0] * len(STAT_KEYS))
                continue
            j, t = old[name]
            if t["lines"] != ds["lines"]:
                log.warning("dataset %r has %d lines, the checkpoint saw %d: its order restarts from the beginning",
                            name, ds["lines"], t["lines"])
                ds.update(layers=[], base=[0] * len(STAT_KEYS))
                continue
            if t["allow_repeat"] != spec.allow_repeat:
                log.warning("dataset %r: allow_repeat changed to %s", name, spec.allow_repeat)
            cols = [s["c"][j] for s in streams]
            if same_streams:
                ds.update(layers=[[V, list(n)] for V, n in t["layers"]], base=list(t["base"]))
                for i in range(self.local):
                    c = list(cols[first + i][:C_STATS]) + [0] * len(STAT_KEYS)
                    if not same_mix:
                        c[C_MIX] = 0
                    new_streams[i]["c"][d] = c
            else:
                # The lines each old stream took are gone; a partly used line (seg > 0) goes back.
                root_len = None if (t["allow_repeat"] and t["lines"] > 0) else t["lines"]
                layers = [[V, list(n)] for V, n in t["layers"]] + [[state["V"], [c[C_N] for c in cols]]]
                ds["layers"] = compact_layers(layers, root_len, 0)
                ds["base"] = list(t["base"])
        for name in old:
            if name not in self.task_names:
                log.warning("dataset %r was removed from the mixture since the checkpoint", name)
        self._streams = new_streams
        if same_streams:
            self._finished = [bool(streams[first + i]["f"]) for i in range(self.local)]
            self._next = int(state["next"][str(self.rank)])
        else:
            self._finished = [False] * self.local
            self._next = 0

    # ---- statistics

    def stats(self) -> dict:
        """Per task: tokens, samples, lines, drops by reason, share vs weight (this rank, as of the last batch)."""
        out: dict[str, dict] = {}
        total = 0
        for d, (spec, w) in enumerate(zip(self.specs, self.weights)):
            vals = list(self._datasets[d]["base"])
            for s in self._streams:
                for k in range(len(STAT_KEYS)):
                    vals[k] += s["c"][d][C_STATS + k]
            out[spec.task_name] = dict(zip(STAT_KEYS, vals), weight=w)
            total += vals[0]
        for v in out.values():
            v["share"] = v["tokens"] / total if total else 0.0
        return out


def _check_state(state: dict) -> None:
    if not isinstance(state, dict) or state.get("kind") != "fm.mixture_loader":
        raise ValueError("not a data loader state (expected the dict from MixtureLoader.state_dict/merge_states)")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"data loader state version {state.get('version')} is not supported "
                         f"(this fm reads version {STATE_VERSION})")


def merge_states(states: Sequence[dict]) -> dict:
    """Combine every rank's ``state_dict()`` into the global state the trainer saves once."""
    if not states:
        raise ValueError("merge_states needs the state of every rank")
    for s in states:
        _check_state(s)
    base = states[0]
    keys = ("V", "world_size", "num_workers", "seed", "batch_size", "max_length")
    for s in states[1:]:
        if any(s[k] != base[k] for k in keys) or [t["task"] for t in s["tasks"]] != [t["task"] for t in base["tasks"]]:
            raise ValueError("merge_states: the rank states come from differently configured loaders")
    merged = {k: v for k, v in base.items() if k not in ("streams", "next", "tasks")}
    merged["tasks"] = [dict(t, base=[sum(s["tasks"][d]["base"][k] for s in states) for k in range(len(t["base"]))])
                       for d, t in enumerate(base["tasks"])]
    merged["streams"], merged["next"] = {}, {}
    for s in states:
        merged["streams"].update(s["streams"])
        merged["next"].update(s["next"])
    if len(merged["streams"]) != base["V"] or len(merged["next"]) != base["world_size"]:
        raise ValueError(f"merge_states: got {len(merged['next'])} of {base['world_size']} ranks "
                         "(pass the state of every rank, e.g. gathered with all_gather_object)")
    return merged


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from fm.tokenizer import Tokenizer

        return Tokenizer(str(tokenizer))
    return tokenizer


def build_train_loader(dataset_config: str | MixtureConfig, tokenizer, *, batch_size: int, max_length: int,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2,
                       seed: int = 0) -> MixtureLoader:
    """The training loader of contract 2: validated config → MixtureLoader for this rank."""
    config = dataset_config if isinstance(dataset_config, MixtureConfig) else load_mixture(dataset_config)
    return MixtureLoader(config, _as_tokenizer(tokenizer), batch_size=batch_size, max_length=max_length, rank=rank,
                         world_size=world_size, num_workers=num_workers, prefetch_factor=prefetch_factor, seed=seed)


__all__ = ["MixtureLoader", "build_train_loader", "merge_states", "permute", "LineOrder", "compact_layers",
           "run_stream"]
