"""The data loader's state: where every virtual stream is in every dataset, as small dataclasses.

A stream's state is a few integers per dataset (:class:`StreamState`), a dataset's is its line order's layers
and the statistics of earlier runs (:class:`DatasetState`); :class:`LoaderState` holds them with the settings
the streams were cut with. ``LoaderState.to_dict()`` is the JSON the trainer saves once (every rank's state
merged by :func:`merge_states`); :meth:`LoaderState.from_dict` reads it back, and reads version 1 (fm before
these dataclasses) too. Version 2 gained ``stage``, ``taken`` and ``grad_accum`` (data stages) as optional keys:
a state without them is stage 0 with its batch counts unknown (the trainer sets them from its iteration).
See docs/mixtures.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fm.data.packing import INPUT_TOO_LONG, OVERSIZE_DROPPED, SEGMENTED, TRUNCATED

STATE_KIND = "fm.mixture_loader"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Per dataset and stream: what was produced (tokens, samples, lines) and what happened to lines (drops, cuts).
STAT_KEYS = ("tokens", "samples", "lines", INPUT_TOO_LONG, OVERSIZE_DROPPED, TRUNCATED, SEGMENTED)
STAT_INDEX = {k: i for i, k in enumerate(STAT_KEYS)}
_SETTINGS = ("seed", "world_size", "num_workers", "batch_size", "max_length")


@dataclass
class StreamState:
    """One virtual stream, right after the last batch it produced; arrays hold one entry per dataset."""

    batches: int
    line: np.ndarray  # lines of the dataset's sequence this stream is done with (its counter n)
    chunk: np.ndarray  # rows already taken from the line it is in (a line cut into several rows)
    mixer_tokens: np.ndarray  # tokens the token-share mixer counted for the dataset
    stats: np.ndarray  # (datasets, len(STAT_KEYS)): statistics of this run (not saved: folded into DatasetState)
    finished: bool = False

    @classmethod
    def fresh(cls, datasets: int) -> StreamState:
        z = np.zeros(datasets, dtype=np.int64)
        return cls(0, z.copy(), z.copy(), z.copy(), np.zeros((datasets, len(STAT_KEYS)), dtype=np.int64))

    def copy(self) -> StreamState:
        return StreamState(self.batches, self.line.copy(), self.chunk.copy(), self.mixer_tokens.copy(),
                           self.stats.copy(), self.finished)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "line": self.line.tolist(), "chunk": self.chunk.tolist(),
                "mixer_tokens": self.mixer_tokens.tolist(), "finished": self.finished}

    @classmethod
    def from_dict(cls, d: dict, datasets: int) -> StreamState:
        s = cls.fresh(datasets)
        s.batches, s.finished = int(d["batches"]), bool(d["finished"])
        for name in ("line", "chunk", "mixer_tokens"):
            values = np.asarray(d[name], dtype=np.int64)
            if values.shape != (datasets,):
                raise ValueError(f"loader state: a stream's {name!r} has {values.size} entries for {datasets} datasets")
            setattr(s, name, values)
        return s


@dataclass
class DatasetState:
    """One dataset: its line order's layers (see fm.data.order) and the statistics of earlier runs."""

    task: str
    weight: float
    allow_repeat: bool
    lines: int
    layers: list[list] = field(default_factory=list)  # [[V, counters]], oldest first
    stats: list[int] = field(default_factory=lambda: [0] * len(STAT_KEYS))

    def to_dict(self) -> dict:
        return {"task": self.task, "weight": self.weight, "allow_repeat": self.allow_repeat, "lines": self.lines,
                "layers": [[int(V), [int(x) for x in n]] for V, n in self.layers],
                "stats": dict(zip(STAT_KEYS, map(int, self.stats)))}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetState:
        stats = d["stats"]
        return cls(d["task"], float(d["weight"]), bool(d["allow_repeat"]), int(d["lines"]),
                   [[int(V), [int(x) for x in n]] for V, n in d["layers"]],
                   [int(stats.get(k, 0)) for k in STAT_KEYS])


@dataclass
class LoaderState:
    """The global state (every stream of every rank), or one rank's part of it before :func:`merge_states`."""

    seed: int
    world_size: int
    num_workers: int
    batch_size: int
    max_length: int
    datasets: list[DatasetState]
    streams: dict[int, StreamState]  # by global stream index: rank × streams per rank + local index
    next_stream: dict[int, int]  # by rank: the local stream the DataLoader's round robin hands out next
    stage: int = 0  # the data stage the streams are in (0: data.mixture)
    taken: dict[int, int] = field(default_factory=dict)  # by rank: batches handed out (grad_accum per step)
    grad_accum: int = 1  # batches per rank and optimizer step, which turns a stage's start_iter into a count

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def total_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def settings(self) -> tuple:
        return tuple(getattr(self, k) for k in _SETTINGS)

    def to_dict(self) -> dict:
        return {"kind": STATE_KIND, "version": STATE_VERSION, **{k: getattr(self, k) for k in _SETTINGS},
                "total_streams": self.total_streams, "datasets": [d.to_dict() for d in self.datasets],
                "streams": {str(v): s.to_dict() for v, s in sorted(self.streams.items())},
                "next_stream": {str(r): n for r, n in sorted(self.next_stream.items())},
                "stage": self.stage, "taken": {str(r): n for r, n in sorted(self.taken.items())},
                "grad_accum": self.grad_accum}

    @classmethod
    def from_dict(cls, state: dict) -> LoaderState:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise ValueError("not a data loader state (expected the dict from MixtureLoader.state_dict/merge_states)")
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"data loader state version {version} is not supported (this fm reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}): resume with the fm that wrote it, or set "
                             "load_dataloader_ckpt: false to start the data from the beginning")
        if version == 1:
            state = _upgrade_v1(state)
        try:
            datasets = [DatasetState.from_dict(d) for d in state["datasets"]]
            out = cls(**{k: int(state[k]) for k in _SETTINGS}, datasets=datasets,
                      streams={int(v): StreamState.from_dict(s, len(datasets)) for v, s in state["streams"].items()},
                      next_stream={int(r): int(n) for r, n in state["next_stream"].items()},
                      stage=int(state.get("stage", 0)),
                      taken={int(r): int(n) for r, n in state.get("taken", {}).items()},
                      grad_accum=int(state.get("grad_accum", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"data loader state (version {version}) is damaged: {type(e).__name__}: {e}") from e
        if "total_streams" in state and int(state["total_streams"]) != out.total_streams:
            raise ValueError(f"data loader state: total_streams {state['total_streams']} != world_size × workers "
                             f"({out.world_size} × {out.streams_per_rank})")
        return out


def _upgrade_v1(s: dict) -> dict:
    """Version 1 (positional lists: streams' ``c`` = [n, seg, mixer tokens] per dataset) as version 2."""
    try:
        return {**{k: s[k] for k in _SETTINGS}, "total_streams": s["V"],
                "datasets": [{"task": t["task"], "weight": t["weight"], "allow_repeat": t["allow_repeat"],
                              "lines": t["lines"], "layers": t["layers"], "stats": dict(zip(STAT_KEYS, t["base"]))}
                             for t in s["tasks"]],
                "streams": {v: {"batches": st["b"], "line": [c[0] for c in st["c"]], "chunk": [c[1] for c in st["c"]],
                                "mixer_tokens": [c[2] for c in st["c"]], "finished": st["f"]}
                            for v, st in s["streams"].items()},
                "next_stream": s["next"]}
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"data loader state (version 1) is damaged: {type(e).__name__}: {e}") from e


def merge_states(states: Sequence[dict]) -> dict:
    """Combine every rank's ``state_dict()`` into the global state the trainer saves once."""
    if not states:
        raise ValueError("merge_states needs the state of every rank")
    parts = [LoaderState.from_dict(s) for s in states]
    base = parts[0]
    for p in parts[1:]:
        if p.settings() != base.settings() or [d.task for d in p.datasets] != [d.task for d in base.datasets] or \
                (p.stage, p.grad_accum) != (base.stage, base.grad_accum):
            raise ValueError("merge_states: the rank states come from differently configured loaders (or data stages)")
    datasets = [DatasetState(d.task, d.weight, d.allow_repeat, d.lines, d.layers,
                             [sum(p.datasets[i].stats[k] for p in parts) for k in range(len(STAT_KEYS))])
                for i, d in enumerate(base.datasets)]
    streams: dict[int, StreamState] = {}
    next_stream: dict[int, int] = {}
    taken: dict[int, int] = {}
    for p in parts:
        streams.update(p.streams)
        next_stream.update(p.next_stream)
        taken.update(p.taken)
    if len(streams) != base.total_streams or len(next_stream) != base.world_size:
        raise ValueError(f"merge_states: got {len(next_stream)} of {base.world_size} ranks "
                         "(pass the state of every rank, e.g. gathered with all_gather_object)")
    return LoaderState(*base.settings(), datasets=datasets, streams=streams, next_stream=next_stream,
                       stage=base.stage, taken=taken, grad_accum=base.grad_accum).to_dict()
