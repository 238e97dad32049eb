"""Mixture configs (``dataset_configs/*.json``): parsing, validation, transforms, and the token-share mixer.

A config is a JSON list of datasets (upstream FM9G keys). Every problem in a config is collected and
reported in one :class:`MixtureConfigError`, so a user fixes a config in one round trip.

Paths (``path`` and ``transforms``) are relative to the directory of the config file unless absolute.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

OversizeRule = Literal["drop", "head", "segment"]
Transform = Callable[[dict, int, random.Random], dict]

REQUIRED_KEYS = ("task_name", "abs_weight", "path")
OPTIONAL_KEYS = ("dataset_name", "transforms", "allow_repeat", "nlines", "ave_tokens_per_line", "total_tokens",
                 "incontext_weight", "do_compact", "is_long", "oversize_rule", "format")
VALID_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
FORMATS = ("jsonl", "megatron")
OVERSIZE_RULES = ("drop", "head", "segment")


class MixtureConfigError(ValueError):
    """All problems of a mixture config, one per line."""

    def __init__(self, config_path: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{config_path}: {len(self.problems)} problem(s) in the mixture config:\n{lines}")


class TransformError(ValueError):
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


# --------------------------------------------------------------------------------------------- transforms

def load_transform(script: str) -> Transform:
    """Import ``script`` (a .py file) and return its ``transform`` function."""
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(i: int, raw: Any, base_dir: str, problems: list[str]) -> DatasetSpec | None:
    where = f"entry {i}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a JSON object, got {type(raw).__name__}")
        return None
    task = raw.get("task_name")
    if isinstance(task, str) and task:
        where = f"entry {i} (task {task!r})"
    n_before = len(problems)
    for key in raw:
        if key not in VALID_KEYS:
            close = difflib.get_close_matches(key, VALID_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(VALID_KEYS)}"
            problems.append(f"{where}: unknown key {key!r}{hint}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            problems.append(f"{where}: missing required key {key!r}")
    if "task_name" in raw and not (isinstance(task, str) and task):
        problems.append(f"{where}: 'task_name' must be a non-empty string")
    weight = raw.get("abs_weight")
    if "abs_weight" in raw and not (_is_number(weight) and weight > 0):
        problems.append(f"{where}: 'abs_weight' must be a number > 0, got {weight!r}")
    fmt = raw.get("format", "jsonl")
    if fmt not in FORMATS:
        problems.append(f"{where}: 'format' must be one of {FORMATS}, got {fmt!r}")
    rule = raw.get("oversize_rule")
    if rule is not None and rule not in OVERSIZE_RULES:
        problems.append(f"{where}: 'oversize_rule' must be one of {OVERSIZE_RULES}, got {rule!r}")
    for key in ("allow_repeat", "do_compact", "is_long"):
        if key in raw and not isinstance(raw[key], bool):
            problems.append(f"{where}: {key!r} must be true or false, got {raw[key]!r}")
    for key in ("nlines", "ave_tokens_per_line", "total_tokens"):
        if raw.get(key) is not None and not _is_number(raw[key]):
            problems.append(f"{where}: {key!r} must be a number, got {raw[key]!r}")
    iw = raw.get("incontext_weight")
    if iw is not None and not (isinstance(iw, list) and all(_is_number(x) for x in iw)):
        problems.append(f"{where}: 'incontext_weight' must be a list of numbers, got {iw!r}")
    path = raw.get("path")
    abs_path = None
    if "path" in raw:
        if not isinstance(path, str) or not path:
            problems.append(f"{where}: 'path' must be a non-empty string")
        else:
            abs_path = _resolve(base_dir, path)
            _check_data_files(where, abs_path, fmt, problems)
    transforms = raw.get("transforms")
    abs_script = None
    if transforms is not None:
        if fmt == "megatron":
            problems.append(f"{where}: a 'megatron' dataset is already tokenized; remove 'transforms'")
        elif not isinstance(transforms, str) or not transforms:
            problems.append(f"{where}: 'transforms' must be a path to a .py file")
        else:
            abs_script = _resolve(base_dir, transforms)
            if not os.path.isfile(abs_script):
                problems.append(f"{where}: transform script not found: {abs_script} "
                                f"(paths are relative to the config file's directory {base_dir})")
    if len(problems) > n_before:
        return None
    return DatasetSpec(
        task_name=task, abs_weight=float(weight), path=abs_path, dataset_name=raw.get("dataset_name", task),
        transforms=abs_script, allow_repeat=raw.get("allow_repeat", True), format=fmt, oversize_rule=rule,
        do_compact=raw.get("do_compact", True), nlines=raw.get("nlines"),
        ave_tokens_per_line=raw.get("ave_tokens_per_line"), total_tokens=raw.get("total_tokens"),
        incontext_weight=iw, is_long=raw.get("is_long", False),
    )


def _check_data_files(where: str, path: str, fmt: str, problems: list[str]) -> None:
    if fmt == "megatron":
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                problems.append(f"{where}: {prefix + ext} not found ('path' of a megatron dataset is the prefix "
                                "of its .bin/.idx pair)")
        return
    if not os.path.isdir(path):
        problems.append(f"{where}: path not found: {path} (create it with quick_start/convert_json2index.py)")
        return
    if not os.path.isfile(os.path.join(path, "data.jsonl")):
        problems.append(f"{where}: {path}/data.jsonl not found (not an index directory; "
                        "create it with quick_start/convert_json2index.py)")
    if not (os.path.isfile(os.path.join(path, "index")) or os.path.isfile(os.path.join(path, "index.h5"))):
        problems.append(f"{where}: {path} has no 'index' or 'index.h5' (rebuild it with convert_json2index.py)")


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
    try:
        from fm.data.indexed import IndexedDataset

        ds = IndexedDataset(spec.path)
        if len(ds) == 0:
            return
        record = ds.record(0)
    except Exception as e:
        problems.append(f"{where}: cannot read the first record of {spec.path}: {e}")
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
        for spec in specs:
            if spec.transforms is not None:
                _check_transform_runs(spec, problems)
    if problems:
        raise MixtureConfigError(config_path, problems)
    for spec in specs:
        if spec.incontext_weight is not None:
            log.warning("task %r: 'incontext_weight' is accepted for compatibility but ignored "
                        "(samples are always packed whole, one line per sample)", spec.task_name)
    return MixtureConfig(path=os.path.abspath(config_path), datasets=specs)


def load_mixture(config_path: str, check_transforms: bool = True) -> MixtureConfig:
    """Read and validate ``dataset_configs/*.json``."""
    import json

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
    is the counters.
    """

    def __init__(self, weights: Sequence[float], tokens: Sequence[int] | None = None):
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.tokens = list(tokens) if tokens is not None else [0] * len(self.weights)
        self.total = sum(self.tokens)

    def pick(self, active: Sequence[bool]) -> int:
        if len(self.tokens) == 1:  # one dataset: nothing to choose (the loop below gives the same answer)
            return 0 if active[0] else -1
        best, best_deficit = -1, -math.inf
        total = self.total
        for d, (w, t) in enumerate(zip(self.weights, self.tokens)):
            if active[d]:
                deficit = w * total - t
                if deficit > best_deficit:
                    best, best_deficit = d, deficit
        return best

    def add(self, d: int, ntokens: int) -> None:
        self.tokens[d] += ntokens
        self.total += ntokens
