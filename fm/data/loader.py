"""The training data loader: weighted mixture → tokenize → pack, sharded, with exact and reshardable resume.

One concept per module (see docs/mixtures.md):

* :mod:`fm.data.order` — which line of a dataset a stream reads next (Feistel permutation, resharding layers);
* :mod:`fm.data.datasets` and :mod:`fm.data.sources` — opening a dataset of either format, records → token ids;
* :mod:`fm.data.stream` — one virtual stream: cursors, the token-share mixer, the packer;
* :mod:`fm.data.state` — the state as dataclasses, its JSON form and versions, :func:`merge_states`;
* this module — :class:`MixtureLoader`: the streams of one rank, run in DataLoader workers or in-process.

Each (rank, DataLoader worker) pair is a virtual stream ``v`` of ``V = world_size × max(1, num_workers)``.
Every batch carries the state of its stream as it was right after the batch; the loader keeps, per stream,
the state of the last batch it handed out (not what workers prefetched) and which stream comes next in the
DataLoader's round-robin order. That is the whole state: O(datasets × streams) integers, independent of how
many lines were read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm.data.datasets import open_dataset, shared_opens
from fm.data.mixture import DatasetSpec, MixtureConfig, load_mixture
from fm.data.order import LineOrder, compact_layers, permute
from fm.data.packing import to_torch
from fm.data.sources import check_vocabulary
from fm.data.state import STAT_KEYS, STATE_VERSION, DatasetState, LoaderState, StreamState, merge_states
from fm.data.stream import Plan, run_stream

log = logging.getLogger(__name__)


def _exhausted_reason(specs: Sequence[DatasetSpec], nlines: Sequence[int]) -> str:
    parts = [f"{s.task_name!r} ({'empty' if n == 0 else f'{n} lines, allow_repeat: false'})"
             for s, n in zip(specs, nlines)]
    return "every dataset is used up: " + ", ".join(parts)


class _MixtureIterable(IterableDataset):
    """DataLoader worker i runs virtual stream ``assignment[i]`` (a local stream index)."""

    def __init__(self, plan: Plan, assignment: list[int], starts: list[StreamState], rank: int, local: int):
        self.plan, self.assignment, self.starts = plan, assignment, starts
        self.rank, self.local = rank, local

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            # A worker process tokenizes in its own thread (threads=1): the tokenizers library's thread pool of
            # every core, in each worker, would oversubscribe the machine; off, its batch calls run in the caller
            # (set before this process's first encode: the library reads it at every call)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        wid = 0 if info is None else info.id
        if wid >= len(self.assignment):
            return
        s = self.assignment[wid]
        v = self.rank * self.local + s
        for batch, snap in run_stream(self.plan, v, self.starts[s]):
            batch["_stream"], batch["_state"] = s, snap
            yield batch
        yield {"_stream": s, "_end": True}


def _identity(x: Any) -> Any:
    return x


class MixtureLoader:
    """Iterable over packed batches of one rank (see the module docstring and docs/mixtures.md)."""

    def __init__(self, config: MixtureConfig, tokenizer, *, batch_size: int, max_length: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2, seed: int = 0,
                 vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or max_length < 4:
            raise ValueError(f"batch_size must be ≥ 1 and max_length ≥ 4, got {batch_size}, {max_length}")
        if getattr(tokenizer, "eos_id", 0) is None:
            raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', '')} has no EOS token, which ends every "
                             "sample: name one with data.eos_token (or eos_token in its tokenizer_config.json)")
        self.config = config
        self.specs = config.datasets
        self.task_names = config.task_names
        self.weights = config.weights()
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.seed = seed
        self.vocab_size = vocab_size
        self.local = max(1, num_workers)
        self.V = world_size * self.local
        self.stop_reason: str | None = None
        with shared_opens():
            nlines = [self._open(s) for s in self.specs]
        self._datasets = [DatasetState(s.task_name, w, s.allow_repeat, n)
                          for s, w, n in zip(self.specs, self.weights, nlines)]
        self._streams = [StreamState.fresh(len(self.specs)) for _ in range(self.local)]
        self._next = 0

    def _open(self, spec: DatasetSpec) -> int:
        """Lines of the dataset, after checking its token ids against the vocabulary."""
        ds = open_dataset(spec.path, spec.format)
        check_vocabulary(spec, ds, self.tokenizer, self.vocab_size)
        if spec.messages_key is not None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"task {spec.task_name!r}: messages_key {spec.messages_key!r} needs a tokenizer with a "
                             f"chat_template, and {getattr(self.tokenizer, 'path', 'the tokenizer')} has none (give a "
                             "Hugging Face tokenizer whose tokenizer_config.json carries one)")
        return len(ds)

    def _plan(self) -> Plan:
        return Plan(self.specs, self.weights, [{"lines": d.lines, "layers": d.layers} for d in self._datasets],
                    self.tokenizer, self.batch_size, self.max_length, self.seed, self.V, self.vocab_size)

    # ---- iteration

    def __iter__(self) -> Iterator[dict]:
        order = [(self._next + i) % self.local for i in range(self.local)]
        order = [s for s in order if not self._streams[s].finished]
        self.stop_reason = None
        if order:
            data = _MixtureIterable(self._plan(), order, list(self._streams), self.rank, self.local)
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
                        self._streams[s].finished = True
                        continue
                    self._streams[s] = item.pop("_state")
                    yield to_torch(item)
            finally:
                del items, loader  # shuts the workers down (prefetched batches are dropped, never counted)
        self.stop_reason = _exhausted_reason(self.specs, [d.lines for d in self._datasets])
        log.info("data loader of rank %d ended: %s", self.rank, self.stop_reason)

    # ---- state

    def state_dict(self) -> dict:
        """This rank's state as of the last batch handed out (JSON-serialisable); merge ranks with merge_states."""
        # Statistics leave the per-stream states (which keep only counters) and are summed per dataset:
        # merge_states adds the ranks' sums; the totals from before a resume are counted by rank 0 only.
        datasets = []
        for d, ds in enumerate(self._datasets):
            stats = list(ds.stats) if self.rank == 0 else [0] * len(STAT_KEYS)
            for s in self._streams:
                stats = [a + int(b) for a, b in zip(stats, s.stats[d])]
            datasets.append(DatasetState(ds.task, ds.weight, ds.allow_repeat, ds.lines, ds.layers, stats))
        first = self.rank * self.local
        state = LoaderState(self.seed, self.world_size, self.num_workers, self.batch_size, self.max_length, datasets,
                            {first + i: s for i, s in enumerate(self._streams)}, {self.rank: self._next})
        return state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from a global state (merge_states), for any world size / worker count / config change."""
        st = LoaderState.from_dict(state)
        if len(st.streams) != st.total_streams:
            raise ValueError(f"loader state holds {len(st.streams)} of {st.total_streams} streams: "
                             "pass merge_states([state of every rank]), not one rank's state_dict()")
        old = {t.task: (i, t) for i, t in enumerate(st.datasets)}
        # num_workers 0 and 1 both mean one stream per rank: same streams, exact continuation
        same_streams = st.total_streams == self.V and st.world_size == self.world_size
        same_mix = [t.task for t in st.datasets] == self.task_names and \
            all(abs(t.weight - w) < 1e-12 for t, w in zip(st.datasets, self.weights))
        if not same_mix:
            log.warning("dataset mixture changed since the checkpoint (tasks or weights): token-share counters "
                        "restart; datasets kept continue where they were, new ones start at their beginning")
        if st.batch_size != self.batch_size or st.max_length != self.max_length:
            log.warning("batch_size/max_length changed since the checkpoint (%s×%s → %s×%s): rows differ from an "
                        "uninterrupted run, no line is skipped or repeated", st.batch_size, st.max_length,
                        self.batch_size, self.max_length)
        if st.seed != self.seed:
            log.warning("seed changed since the checkpoint (%s → %s): the order of lines not yet read changes",
                        st.seed, self.seed)
        if not same_streams:
            log.info("resharding the data loader: %d streams (world %d × workers %d) → %d (world %d × workers %d)",
                     st.total_streams, st.world_size, st.num_workers, self.V, self.world_size, self.num_workers)
        streams = [st.streams[v] for v in range(st.total_streams)]
        first = self.rank * self.local
        new_streams = [StreamState.fresh(len(self.specs)) for _ in range(self.local)]
        if same_streams:
            for i in range(self.local):
                new_streams[i].batches = streams[first + i].batches
                new_streams[i].finished = streams[first + i].finished
        for d, spec in enumerate(self.specs):
            name = spec.task_name
            ds = self._datasets[d]
            ds.layers, ds.stats = [], [0] * len(STAT_KEYS)
            if name not in old:
                log.warning("dataset %r is new since the checkpoint: it starts at its beginning", name)
                continue
            j, t = old[name]
            if t.lines != ds.lines:
                log.warning("dataset %r has %d lines, the checkpoint saw %d: its order restarts from the beginning",
                            name, ds.lines, t.lines)
                continue
            if t.allow_repeat != spec.allow_repeat:
                log.warning("dataset %r: allow_repeat changed to %s", name, spec.allow_repeat)
            ds.stats = list(t.stats)
            if same_streams:
                ds.layers = [[V, list(n)] for V, n in t.layers]
                for i in range(self.local):
                    old_stream, new = streams[first + i], new_streams[i]
                    new.line[d], new.chunk[d] = old_stream.line[j], old_stream.chunk[j]
                    new.mixer_tokens[d] = old_stream.mixer_tokens[j] if same_mix else 0
            else:
                # The lines each old stream took are gone; a partly used line (chunk > 0) goes back.
                root_len = None if (t.allow_repeat and t.lines > 0) else t.lines
                layers = [[V, list(n)] for V, n in t.layers] + [[st.total_streams, [int(s.line[j]) for s in streams]]]
                ds.layers = compact_layers(layers, root_len, 0)
        for name in old:
            if name not in self.task_names:
                log.warning("dataset %r was removed from the mixture since the checkpoint", name)
        self._streams = new_streams
        self._next = int(st.next_stream[self.rank]) if same_streams else 0

    # ---- statistics

    def stats(self) -> dict:
        """Per task: tokens, samples, lines, drops by reason, share vs weight (this rank, as of the last batch)."""
        out: dict[str, dict] = {}
        total = 0
        for d, (spec, w) in enumerate(zip(self.specs, self.weights)):
            vals = list(self._datasets[d].stats)
            for s in self._streams:
                vals = [a + int(b) for a, b in zip(vals, s.stats[d])]
            out[spec.task_name] = dict(zip(STAT_KEYS, vals), weight=w)
            total += vals[0]
        for v in out.values():
            v["share"] = v["tokens"] / total if total else 0.0
        return out


def _as_tokenizer(tokenizer):
    """A tokenizer object, or the path/name of one (SentencePiece .model, tokenizer.json or HF tokenizer directory,
    ``demo``): loaded with :func:`fm.tokenizer.load_tokenizer`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from fm.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def build_train_loader(dataset_config: str | MixtureConfig, tokenizer, *, batch_size: int, max_length: int,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2,
                       seed: int = 0, vocab_size: int | None = None) -> MixtureLoader:
    """The training loader: validated config → MixtureLoader for this rank.

    ``tokenizer``: a :class:`fm.tokenizer.Tokenizer`, or what :func:`fm.tokenizer.load_tokenizer` takes.
    ``vocab_size``: the model's; every dataset's token ids (or tokenizer) are checked against it (default: the
    tokenizer's own size).
    """
    with shared_opens():  # validating the config and counting lines open each dataset once
        config = dataset_config if isinstance(dataset_config, MixtureConfig) else load_mixture(dataset_config)
        return MixtureLoader(config, _as_tokenizer(tokenizer), batch_size=batch_size, max_length=max_length,
                             rank=rank, world_size=world_size, num_workers=num_workers,
                             prefetch_factor=prefetch_factor, seed=seed, vocab_size=vocab_size)


__all__ = ["MixtureLoader", "build_train_loader", "merge_states", "permute", "LineOrder", "compact_layers",
           "run_stream", "STAT_KEYS", "STATE_VERSION"]
