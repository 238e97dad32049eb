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

**Data stages.** A loader may have later stages: ``stages=[(start_iter, mixture), ...]``. Its datasets are those of
every stage (:func:`fm.data.mixture.stage_union`; a stage gives the others weight 0), so a dataset keeps one index
and one position in every stream across stages. The switch is decided by the batch count, never by time: each rank
hands out ``grad_accum`` batches per optimizer step, so the batch that makes the count ``start_iter × grad_accum``
is the last of the old stage. Right after it the streams' token-share counters restart (the new weights count from
there), the old stage's DataLoader is shut down (what its workers prefetched is dropped, never counted) and the new
stage's starts from the same positions: a dataset of both stages continues with its next line, a new one starts at
its beginning. The state records the stage and the batches handed out.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm.data.datasets import open_dataset, shared_opens
from fm.data.mixture import DatasetSpec, MixtureConfig, load_mixture, stage_union
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


@contextlib.contextmanager
def _fork_without_garbage() -> Iterator[None]:
    """Fork the loader's workers with no garbage to inherit. Reference cycles the parent has not collected yet are
    copied into each worker, whose own garbage collection would then destroy them there: for a torch process group
    (gloo's, after ``destroy_process_group``) that destructor waits on threads that exist only in the parent, and
    the worker hangs. Collect here, in the parent, where destructors are safe, and freeze what is left so the
    workers' collections never visit the parent's objects."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _identity(x: Any) -> Any:
    return x


class MixtureLoader:
    """Iterable over packed batches of one rank (see the module docstring and docs/mixtures.md)."""

    def __init__(self, config: MixtureConfig, tokenizer, *, batch_size: int, max_length: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2, seed: int = 0,
                 vocab_size: int | None = None, stages: Sequence[tuple[int, MixtureConfig]] = (),
                 grad_accum: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or max_length < 4:
            raise ValueError(f"batch_size must be ≥ 1 and max_length ≥ 4, got {batch_size}, {max_length}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be ≥ 1, got {grad_accum}")
        if getattr(tokenizer, "eos_id", 0) is None:
            raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', '')} has no EOS token, which ends every "
                             "sample: name one with data.eos_token (or eos_token in its tokenizer_config.json)")
        starts = [0, *(int(s) for s, _ in stages)]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"data stages must start after iteration 0, in increasing order; got starts {starts}")
        self.stage_configs = [config, *(c for _, c in stages)]
        self.stage_starts = starts  # first iteration (optimizer steps done) of each stage
        self.grad_accum = grad_accum
        union, problems = stage_union(self.stage_configs)
        if problems:
            raise ValueError("data stages: " + "; ".join(problems))
        self.task_names = [s.task_name for s in union]
        index = {name: d for d, name in enumerate(self.task_names)}
        # per stage, over the union: the stage's own entry of its datasets, weight 0 for the others
        self._stage_specs: list[list[DatasetSpec]] = []
        self._stage_weights: list[list[float]] = []
        for cfg in self.stage_configs:
            specs, weights = list(union), [0.0] * len(union)
            for spec, w in zip(cfg.datasets, cfg.weights()):
                specs[index[spec.task_name]], weights[index[spec.task_name]] = spec, w
            self._stage_specs.append(specs)
            self._stage_weights.append(weights)
        self.stage = 0
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.seed = seed
        self.vocab_size = vocab_size
        self.local = max(1, num_workers)
        self.V = world_size * self.local
        self.stop_reason: str | None = None
        nlines = [0] * len(union)
        with shared_opens():
            for cfg in self.stage_configs:  # every stage's entries are checked (keys, vocabulary)
                for spec in cfg.datasets:
                    nlines[index[spec.task_name]] = self._open(spec)
        self._datasets = [DatasetState(s.task_name, w, s.allow_repeat, n)
                          for s, w, n in zip(self.specs, self.weights, nlines)]
        self._streams = [StreamState.fresh(len(union)) for _ in range(self.local)]
        self._next = 0
        self._taken = 0  # batches this rank handed out (grad_accum per optimizer step)

    # ---- the active stage

    @property
    def config(self) -> MixtureConfig:
        return self.stage_configs[self.stage]

    @property
    def specs(self) -> list[DatasetSpec]:
        """The active stage's entry of every dataset of the run (stage_union)."""
        return self._stage_specs[self.stage]

    @property
    def weights(self) -> list[float]:
        """The active stage's token share of every dataset of the run (0: not in this stage)."""
        return self._stage_weights[self.stage]

    @property
    def batches_taken(self) -> int:
        """Batches this rank handed out, over every stage and resume."""
        return self._taken

    def stage_at(self, step: int) -> int:
        """The stage of optimizer step ``step`` (0-based)."""
        return bisect.bisect_right(self.stage_starts, step) - 1

    def _stage_end(self) -> int | None:
        """The batch count at which the active stage ends (None: the last stage)."""
        k = self.stage + 1
        return self.stage_starts[k] * self.grad_accum if k < len(self.stage_starts) else None

    def _enter_stage(self, k: int) -> None:
        """Make stage k the active one: positions stay, the token-share counters restart, ended streams go on."""
        if k == self.stage:
            return
        for s in self._streams:
            s.mixer_tokens[:] = 0
            s.finished = False
        for d, (spec, w) in enumerate(zip(self._stage_specs[k], self._stage_weights[k])):
            self._datasets[d].weight, self._datasets[d].allow_repeat = w, spec.allow_repeat
        log.info("rank %d: data stage %d (from iteration %d, after %d batches): %s", self.rank, k,
                 self.stage_starts[k], self._taken, self.stage_configs[k].path)
        self.stage = k

    def set_step(self, step: int) -> None:
        """The trainer's position after a resume: ``step`` optimizer steps done. The loader counts ``step ×
        grad_accum`` batches handed out and makes that step's stage the active one (a state saved without stages,
        ``load_data`` false, stages added or moved at the resume)."""
        taken = step * self.grad_accum
        if taken != self._taken:
            log.info("rank %d: data loader at iteration %d (%d batches); its state said %d batches", self.rank,
                     step, taken, self._taken)
            self._taken = taken
        self._enter_stage(self.stage_at(step))

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
        self.stop_reason = None
        switched = True
        while switched:  # one DataLoader per stage
            switched = False
            end = self._stage_end()
            order = [(self._next + i) % self.local for i in range(self.local)]
            order = [s for s in order if not self._streams[s].finished]
            if not order:
                break
            data = _MixtureIterable(self._plan(), order, list(self._streams), self.rank, self.local)
            if self.num_workers == 0:
                items = iter(data)
                loader = None
            else:
                loader = DataLoader(data, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                    prefetch_factor=self.prefetch_factor, persistent_workers=False)
                with _fork_without_garbage():
                    items = iter(loader)  # forks the workers
            try:
                for item in items:
                    s = item.pop("_stream")
                    self._next = (s + 1) % self.local
                    if item.get("_end"):
                        self._streams[s].finished = True
                        continue
                    self._streams[s] = item.pop("_state")
                    self._taken += 1
                    if end is not None and self._taken >= end:  # the old stage's last batch: switch right after it
                        self._enter_stage(self.stage_at(self._taken // self.grad_accum))
                        switched = True
                    yield to_torch(item)
                    if switched:
                        break
            finally:
                del items, loader  # shuts the workers down (prefetched batches are dropped, never counted)
        active = [(s, d.lines) for s, d, w in zip(self.specs, self._datasets, self.weights) if w > 0]
        self.stop_reason = _exhausted_reason([s for s, _ in active], [n for _, n in active])
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
                            {first + i: s for i, s in enumerate(self._streams)}, {self.rank: self._next},
                            stage=self.stage, taken={self.rank: self._taken}, grad_accum=self.grad_accum)
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
        # batches handed out: this rank's, or (other ranks) rank 0's, in steps of the state's grad_accum
        taken = st.taken.get(self.rank if st.world_size == self.world_size else 0, min(st.taken.values(), default=0))
        if st.grad_accum != self.grad_accum:
            taken = taken // st.grad_accum * self.grad_accum
        self._taken = taken
        self.stage = self.stage_at(taken // self.grad_accum)
        if st.stage != self.stage:
            log.info("data stage %d at the checkpoint, %d now (after %d batches): the token-share counters restart",
                     st.stage, self.stage, taken)
        # the active stage's datasets and weights (weight 0: in another stage only, e.g. a stage added at the resume)
        old_mix = {t.task: t.weight for t in st.datasets if t.weight > 0}
        new_mix = {name: w for name, w in zip(self.task_names, self.weights) if w > 0}
        same_mix = st.stage == self.stage and old_mix.keys() == new_mix.keys() and \
            all(abs(old_mix[name] - w) < 1e-12 for name, w in new_mix.items())
        if not same_mix and st.stage == self.stage:
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
                new_streams[i].finished = streams[first + i].finished and st.stage == self.stage
        for d, spec in enumerate(self.specs):
            name = spec.task_name
            ds = self._datasets[d]
            ds.weight, ds.allow_repeat = self.weights[d], spec.allow_repeat
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
                       seed: int = 0, vocab_size: int | None = None,
                       stages: Sequence[tuple[int, str | MixtureConfig]] = (), grad_accum: int = 1) -> MixtureLoader:
    """The training loader: validated config → MixtureLoader for this rank.

    ``stages``: later data stages ``(start_iter, mixture config)``, in increasing order; ``grad_accum``: the
    batches each rank takes per optimizer step, which turns a stage's ``start_iter`` into a batch count.

    ``tokenizer``: a :class:`fm.tokenizer.Tokenizer`, or what :func:`fm.tokenizer.load_tokenizer` takes.
    ``vocab_size``: the model's; every dataset's token ids (or tokenizer) are checked against it (default: the
    tokenizer's own size).
    """
    with shared_opens():  # validating the config and counting lines open each dataset once
        config = dataset_config if isinstance(dataset_config, MixtureConfig) else load_mixture(dataset_config)
        later = [(start, c if isinstance(c, MixtureConfig) else load_mixture(c)) for start, c in stages]
        return MixtureLoader(config, _as_tokenizer(tokenizer), batch_size=batch_size, max_length=max_length,
                             rank=rank, world_size=world_size, num_workers=num_workers,
                             prefetch_factor=prefetch_factor, seed=seed, vocab_size=vocab_size, stages=later,
                             grad_accum=grad_accum)


__all__ = ["MixtureLoader", "build_train_loader", "merge_states", "permute", "LineOrder", "compact_layers",
           "run_stream", "STAT_KEYS", "STATE_VERSION"]
