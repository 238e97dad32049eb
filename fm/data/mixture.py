"""Mixture configs (``dataset_configs/*.json``): parsing, validation, transforms, and the token-share mixer.

A config is a JSON list of datasets (upstream FM9G keys). Every problem in a config is collected and
reported in one :class:`MixtureConfigError`, so a user fixes a config in one round trip.

Paths (``path`` and ``transforms``) are relative to the directory of the config file unless absolute.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from fm.data.datasets import json_keys, open_dataset, shared_opens
from fm.data.indexed import read_meta, valid_json_keys
from fm.errors import FmError
from fm.schema import check, fields_of, key

log = logging.getLogger(__name__)

OversizeRule = Literal["drop", "head", "segment"]
Transform = Callable[[dict, int, random.Random], dict]



@dataclass
class MixtureEntry:
    """One entry of a mixture config as written (upstream FM9G's keys); :mod:`fm.schema` validates it."""

    task_name: str = key(help="unique name of the dataset in logs, tensorboard and the loader state")
    abs_weight: float = key(help="share of the tokens (normalised over the entries)", gt=0)
    path: str = key(help="index directory (or megatron .bin/.idx prefix), relative to the config's directory")
    dataset_name: str = key("", "informational")
    transforms: str | None = key(None, "a .py file with transform(data, num_sample, r) -> {input, output}")
    allow_repeat: bool = key(True, "start the dataset again when it is exhausted")
    nlines: int | float | None = key(None, "informational (the index knows its lines)")
    ave_tokens_per_line: int | float | None = key(None, "informational")
    total_tokens: int | float | None = key(None, "informational")
    incontext_weight: list[float] | None = key(None, "accepted, ignored: samples are packed whole")
    do_compact: bool = key(True, "pack several samples into one row")
    is_long: bool = key(False, "informational")
    oversize_rule: Literal["drop", "head", "segment"] | None = key(
        None, "a sample longer than max_length: drop it, keep its head, or cut it into rows (default: head for "
        "instruction data, segment for plain text)")
    format: Literal["jsonl", "megatron"] = key("jsonl", "an fm/upstream index (jsonl) or a megatron-core dataset")
    json_keys: list[str] | None = key(
        None, "the records' text keys: [\"text\"] (trained on whole) or [INPUT, OUTPUT] (prompt masked, answer "
        "trained on); default: what fm convert --json-keys recorded, else [\"input\", \"output\"]")
    messages_key: str | None = key(
        None, "the records' key holding a conversation ([{role, content}, ...], usually \"messages\"), rendered with "
        "the tokenizer's chat_template: all but the last message (plus the generation prompt) masked, the last "
        "(assistant) message trained on")


_ENTRY_FIELDS = fields_of(MixtureEntry)
REQUIRED_KEYS = tuple(n for n, (f, _) in _ENTRY_FIELDS.items() if f.default is MISSING)
VALID_KEYS = tuple(_ENTRY_FIELDS)


class MixtureConfigError(FmError, ValueError):
    """All problems of a mixture config, one per line."""

    def __init__(self, config_path: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{config_path}: {len(self.problems)} problem(s) in the mixture config:\n{lines}")


class TransformError(FmError, ValueError):
    """A transform returned something other than ``{"input": str, "output": str}`` or raised."""


@dataclass
class DatasetSpec:
    """One validated entry of a mixture config (paths absolute)."""

    task_name: str
    abs_weight: float
    path: str
    dataset_name: str = ""
    transforms: str | None = None
    allow_repeat: bool = True
    format: Literal["jsonl", "megatron"] = "jsonl"
    oversize_rule: OversizeRule | None = None  # None: head for instruction data, segment for plain text
    do_compact: bool = True
    nlines: int | None = None
    ave_tokens_per_line: float | None = None
    total_tokens: float | None = None
    incontext_weight: list[float] | None = None
    is_long: bool = False
    json_keys: list[str] | None = None  # None: meta.json's, else input/output (see fm.data.sources.json_keys)
    messages_key: str | None = None  # records are conversations under this key (see fm.data.sources.Source)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MixtureConfig:
    path: str
    datasets: list[DatasetSpec]

    @property
    def task_names(self) -> list[str]:
        return [d.task_name for d in self.datasets]

    def weights(self) -> list[float]:
        """``abs_weight`` normalised to sum 1: the token share of each dataset."""
        total = sum(d.abs_weight for d in self.datasets)
        return [d.abs_weight / total for d in self.datasets]


# The keys a dataset's entry may change from one data stage to the next: its weighting, and what only informs.
# Every other key changes how its lines become samples, and a line cut at the switch continues under the new rule.
STAGE_FREE_KEYS = ("abs_weight", "allow_repeat", "dataset_name", "nlines", "ave_tokens_per_line", "total_tokens",
                   "is_long", "incontext_weight")
_IDENTITY_KEYS = ("task_name", "path", "format")


def _processing_differences(a: DatasetSpec, b: DatasetSpec) -> list[str]:
    """``key: value in a vs value in b`` for every key that changes how the dataset is read (not its weighting)."""
    out = []
    for f in fields(DatasetSpec):
        if f.name in STAGE_FREE_KEYS or f.name in _IDENTITY_KEYS:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            out.append(f"{f.name} {y!r} vs {x!r}")
    return out


def stage_union(configs: Sequence[MixtureConfig], names: Sequence[str] | None = None) -> tuple[list[DatasetSpec],
                                                                                                list[str]]:
    """The datasets of a run's data stages, each once (in order of first appearance), and the problems.

    A dataset's identity is its ``task_name`` and its ``path`` (with ``format``), the same identity resuming
    matches datasets by: a dataset listed in two stages continues where it was. One ``task_name`` naming two
    different paths is a problem (the task name keys logs, tensorboard and the loader state), and so is a dataset
    read differently in two stages (``transforms``, ``oversize_rule``, ``json_keys``, ``messages_key``,
    ``do_compact``: every key but :data:`STAGE_FREE_KEYS`, its weighting and informational keys), since a line cut
    into rows at the switch would continue under other rules. ``names`` name the stages in the messages (default
    ``stage 0``, ``stage 1``, ...)."""
    names = list(names) if names is not None else [f"stage {k}" for k in range(len(configs))]
    union: list[DatasetSpec] = []
    first: dict[str, tuple[int, DatasetSpec]] = {}
    problems: list[str] = []
    for k, cfg in enumerate(configs):
        for spec in cfg.datasets:
            seen = first.get(spec.task_name)
            if seen is None:
                first[spec.task_name] = (k, spec)
                union.append(spec)
            elif (seen[1].path, seen[1].format) != (spec.path, spec.format):
                problems.append(f"task {spec.task_name!r} is {spec.path} ({spec.format}) in {names[k]} but "
                                f"{seen[1].path} ({seen[1].format}) in {names[seen[0]]}: a task name is one dataset "
                                "in every stage (rename one of them)")
            else:
                diff = _processing_differences(seen[1], spec)
                if diff:
                    problems.append(f"task {spec.task_name!r} ({spec.path}) is read differently in {names[k]} than "
                                    f"in {names[seen[0]]}: {'; '.join(diff)}; a dataset in two stages must have the "
                                    f"same entry except {', '.join(STAGE_FREE_KEYS[:2])} (its weighting): a line cut "
                                    "at the switch would continue under other rules (give it another task_name to "
                                    "make it another dataset)")
    return union, problems


# --------------------------------------------------------------------------------------------- transforms

_TRANSFORMS: dict[tuple[str, int, int], Transform] = {}


def load_transform(script: str) -> Transform:
    """Import ``script`` (a .py file) and return its ``transform`` function.

    A script is imported once per process (and again when the file changes): the datasets of a large mixture
    usually share a few scripts, so they share the module, as functions of one module share its globals.
    """
    path = os.path.abspath(script)
    st = os.stat(path)
    cache_key = (path, st.st_mtime_ns, st.st_size)
    fn = _TRANSFORMS.get(cache_key)
    if fn is None:
        fn = _TRANSFORMS[cache_key] = _import_transform(path)
    return fn


def _import_transform(script: str) -> Transform:
    name = "fm_transform_" + str(abs(hash(os.path.abspath(script))))
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # lets the script use dataclasses/pickle, which look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    fn = getattr(module, "transform", None)
    if not callable(fn):
        raise TransformError(f"{script} defines no function transform(data, num_sample, r)")
    return fn


def identity_transform(data: dict, num_sample: int, r: random.Random) -> dict:
    """Used when an entry has no ``transforms``: the record's own ``input``/``output`` (missing → "")."""
    return {"input": data.get("input", "") or "", "output": data.get("output", "") or ""}


def check_transformed(out: Any, task_name: str, record: Any) -> tuple[str, str]:
    """The (input, output) strings of a transform result, or a TransformError naming task and record."""
    if (not isinstance(out, dict) or not isinstance(out.get("input"), str)
            or not isinstance(out.get("output"), str)):
        got = type(out).__name__ if not isinstance(out, dict) else \
            "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(out.items())[:6]) + "}"
        raise TransformError(f"task {task_name!r}: transform must return a dict with string 'input' and 'output', "
                             f"got {got} for record {_short(record)}")
    return out["input"], out["output"]


def _short(record: Any, limit: int = 200) -> str:
    text = repr(record)
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------------------------- parsing

def _resolve(base_dir: str, p: str) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base_dir, p))


def _check_entry(i: int, raw: Any, base_dir: str, problems: list[str]) -> DatasetSpec | None:
    where = f"entry {i}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a JSON object, got {type(raw).__name__}")
        return None
    task = raw.get("task_name")
    if isinstance(task, str) and task:
        where = f"entry {i} (task {task!r})"
    values, found = check(MixtureEntry, raw)
    found += [f"missing required key {k!r}" for k in REQUIRED_KEYS if k not in raw]
    for k in ("task_name", "path"):
        if values.get(k) == "":
            found.append(f"{k}: must be a non-empty string")
    fmt = values.get("format", "jsonl")
    keys = values.get("json_keys")
    if keys is not None:
        if not valid_json_keys(keys):
            found.append(f"json_keys: give one key (the text trained on) or two different keys (input, then output), "
                         f"got {keys!r}")
        elif fmt == "megatron":
            found.append("json_keys: a 'megatron' dataset holds token ids, not records; remove 'json_keys'")
        elif values.get("transforms"):
            found.append("json_keys: a transform reads the record's keys itself; remove 'json_keys' (or the "
                         "transform)")
    if values.get("messages_key") is not None:
        clash = [k for k in ("json_keys", "transforms") if values.get(k)] + (["format"] if fmt == "megatron" else [])
        if not values["messages_key"]:
            found.append("messages_key: must be a non-empty string (the records' conversation key, e.g. \"messages\")")
        elif clash:
            found.append(f"messages_key: conversations are rendered with the tokenizer's chat template; remove "
                         f"{' and '.join(repr(k) for k in clash)} (or 'messages_key')")
    abs_path = abs_script = None
    if values.get("path"):
        abs_path = _resolve(base_dir, values["path"])
        _check_data_files(where, abs_path, fmt, problems)
    if values.get("transforms"):
        if fmt == "megatron":
            found.append("a 'megatron' dataset is already tokenized; remove 'transforms'")
        else:
            abs_script = _resolve(base_dir, values["transforms"])
            if not os.path.isfile(abs_script):
                found.append(f"transform script not found: {abs_script} (paths are relative to the config file's "
                             f"directory {base_dir})")
    problems.extend(f"{where}: {p}" for p in found)
    if found or any(p.startswith(f"{where}:") for p in problems):
        return None
    entry = MixtureEntry(**values)
    return DatasetSpec(
        task_name=entry.task_name, abs_weight=entry.abs_weight, path=abs_path, dataset_name=entry.dataset_name or
        entry.task_name, transforms=abs_script, allow_repeat=entry.allow_repeat, format=entry.format,
        oversize_rule=entry.oversize_rule, do_compact=entry.do_compact, nlines=entry.nlines,
        ave_tokens_per_line=entry.ave_tokens_per_line, total_tokens=entry.total_tokens,
        incontext_weight=entry.incontext_weight, is_long=entry.is_long, json_keys=entry.json_keys,
        messages_key=entry.messages_key,
    )


def _check_data_files(where: str, path: str, fmt: str, problems: list[str]) -> None:
    if fmt == "megatron":
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        if os.path.isfile(os.path.join(path, "data.jsonl")):
            problems.append(f"{where}: {path} is an index directory (data.jsonl), not a megatron-core dataset: "
                            "remove \"format\": \"megatron\" from this entry")
            return
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                problems.append(f"{where}: {prefix + ext} not found ('path' of a megatron dataset is the prefix "
                                "of its .bin/.idx pair)")
        return
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        problems.append(f"{where}: {path} is a megatron-core dataset ({prefix}.bin/.idx), not an index directory: "
                        f"add \"format\": \"megatron\" to this entry, with \"path\" the prefix {prefix}")
        return
    if not os.path.isdir(path):
        problems.append(f"{where}: path not found: {path} (create it with fm convert)")
        return
    found = len(problems)
    if not os.path.isfile(os.path.join(path, "data.jsonl")):
        problems.append(f"{where}: {path}/data.jsonl not found (not an index directory; "
                        "create it with fm convert)")
    if not (os.path.isfile(os.path.join(path, "index")) or os.path.isfile(os.path.join(path, "index.h5"))):
        problems.append(f"{where}: {path} has no 'index' or 'index.h5' (rebuild it with fm convert)")
    if len(problems) > found:
        return
    try:
        read_meta(path)  # its format_version and json_keys
    except ValueError as e:
        problems.append(f"{where}: {e}")


def _check_transform_runs(spec: DatasetSpec, problems: list[str]) -> None:
    """Import the script and run it on the dataset's first record, so a broken transform fails now."""
    where = f"task {spec.task_name!r}"
    try:
        fn = load_transform(spec.transforms)
    except TransformError as e:
        problems.append(f"{where}: {e}")
        return
    except Exception as e:  # any import-time error of the user's script
        problems.append(f"{where}: transform {spec.transforms} failed to import: {type(e).__name__}: {e}")
        return
    record = _first_record(spec, problems)
    if record is None:
        return
    try:
        out = fn(record, 0, random.Random(0))
    except Exception as e:
        problems.append(f"{where}: transform {spec.transforms} raised {type(e).__name__}: {e} "
                        f"on record 0 {_short(record)}")
        return
    try:
        check_transformed(out, spec.task_name, record)
    except TransformError as e:
        problems.append(f"{e} (line 0, transform {spec.transforms})")


def _first_record(spec: DatasetSpec, problems: list[str]) -> dict | None:
    try:
        ds = open_dataset(spec.path, spec.format)
        return ds.record(0) if len(ds) else None
    except Exception as e:
        problems.append(f"task {spec.task_name!r}: cannot read the first record of {spec.path}: {e}")
        return None


def _check_keys(spec: DatasetSpec, problems: list[str]) -> None:
    """The first record of a jsonl dataset without a transform has its output key (a common corpus stored as
    ``{"text": ...}`` must say so with json_keys, or every line would train on nothing)."""
    record = _first_record(spec, problems)
    if record is None:
        return
    if spec.messages_key is not None:
        if not isinstance(record.get(spec.messages_key), list):
            problems.append(f"task {spec.task_name!r}: line 1 of {spec.path}/data.jsonl has no list under "
                            f"{spec.messages_key!r} (messages_key; its keys: {sorted(record)[:8]})")
        return
    _, out_key = json_keys(spec.json_keys, open_dataset(spec.path, spec.format))
    if out_key not in record:
        text_keys = [k for k, v in record.items() if isinstance(v, str)][:6]
        problems.append(f"task {spec.task_name!r}: line 1 of {spec.path}/data.jsonl has no {out_key!r} key (its text "
                        f"keys: {text_keys}): name the text's key with \"json_keys\", e.g. \"json_keys\": "
                        f"[{json.dumps(text_keys[0] if text_keys else 'text')}], or add a transform")


def parse_mixture(entries: Any, config_path: str = "<mixture>", base_dir: str | None = None,
                  check_transforms: bool = True) -> MixtureConfig:
    """Validate a parsed config; raise MixtureConfigError listing every problem."""
    base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(config_path))
    problems: list[str] = []
    if not isinstance(entries, list) or not entries:
        raise MixtureConfigError(config_path, ["the config must be a non-empty JSON list of datasets"])
    specs: list[DatasetSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(entries):
        spec = _check_entry(i, raw, base_dir, problems)
        task = raw.get("task_name") if isinstance(raw, dict) else None
        if isinstance(task, str) and task:
            if task in seen:
                problems.append(f"entry {i}: duplicate task_name {task!r} (first used by entry {seen[task]}); "
                                "task names must be unique")
                spec = None
            else:
                seen[task] = i
        if spec is not None:
            specs.append(spec)
    if check_transforms:
        with shared_opens():
            for spec in specs:
                if spec.transforms is not None:
                    _check_transform_runs(spec, problems)
                elif spec.format == "jsonl":
                    _check_keys(spec, problems)
    if problems:
        raise MixtureConfigError(config_path, problems)
    for spec in specs:
        if spec.incontext_weight is not None:
            log.warning("task %r: 'incontext_weight' is accepted for compatibility but ignored "
                        "(samples are always packed whole, one line per sample)", spec.task_name)
    return MixtureConfig(path=os.path.abspath(config_path), datasets=specs)


def load_mixture(config_path: str, check_transforms: bool = True) -> MixtureConfig:
    """Read and validate ``dataset_configs/*.json``."""
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"dataset config not found: {config_path}")
    with open(config_path, encoding="utf-8") as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise MixtureConfigError(config_path, [f"not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"]) \
                from e
    return parse_mixture(entries, config_path, check_transforms=check_transforms)


# --------------------------------------------------------------------------------------------- mixer

class TokenShareMixer:
    """Deterministic "largest deficit first" choice of the next dataset.

    Picks the active dataset maximising ``w_d·T − t_d`` (T: tokens so far, t_d: tokens from d; ties go to
    the earlier dataset). Each dataset's token count then stays within one sample of ``w_d·T`` at every
    prefix, with no randomness: the same counters always give the same choice, so the mixer's whole state
    is the counters. A mixture of many datasets is picked with numpy (the same float64 arithmetic, so the
    same choices): a Python loop over a thousand datasets per sample would cost more than the sample.
    """

    VECTOR_FROM = 16  # datasets from which one numpy argmax beats the Python loop

    def __init__(self, weights: Sequence[float], tokens: Sequence[int] | None = None):
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        # float64 holds token counts exactly (up to 2**53) and is what the deficits are computed in
        self.tokens = np.array(tokens if tokens is not None else [0] * len(self.weights), dtype=np.float64)
        self.total = int(self.tokens.sum())
        self._vector = len(self.weights) >= self.VECTOR_FROM
        self._w = np.asarray(self.weights, dtype=np.float64)
        self._open = [True] * len(self.weights)
        self._left = len(self.weights)
        self._minus = self.tokens.copy()  # tokens, +inf for datasets that ran out: w·T − this is the deficit
        self._buf = np.empty(len(self.weights), dtype=np.float64)

    def close(self, d: int) -> None:
        """Dataset d is used up: never pick it again."""
        if self._open[d]:
            self._open[d] = False
            self._left -= 1
            self._minus[d] = math.inf

    def pick(self, active: Sequence[bool] | None = None) -> int:
        """The next dataset (-1 when none is left); ``active`` marks the open datasets (default: not closed)."""
        if active is not None:
            for d, a in enumerate(active):
                if not a:
                    self.close(d)
        if not self._left:
            return -1
        if self._vector:
            buf = np.multiply(self._w, float(self.total), out=self._buf)
            buf -= self._minus
            return int(buf.argmax())
        best, best_deficit = -1, -math.inf
        total = self.total
        for d, (w, t, is_open) in enumerate(zip(self.weights, self.tokens.tolist(), self._open)):
            if is_open:
                deficit = w * total - t
                if deficit > best_deficit:
                    best, best_deficit = d, deficit
        return best

    def add(self, d: int, ntokens: int) -> None:
        self.tokens[d] += ntokens
        if self._open[d]:
            self._minus[d] += ntokens
        self.total += ntokens
