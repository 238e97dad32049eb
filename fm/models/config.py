"""Typed model configs: dataclasses loaded from JSON with unknown keys rejected.

Every key of upstream's ``model_configs/*.json`` is a field (some only informational), so an
upstream file loads unchanged; a key that is neither ours nor upstream's is an error naming the
file and the closest valid key. Validation is :mod:`fm.schema`'s, shared with train and mixture configs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from fm.errors import FmError
from fm.schema import check, format_problems

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class ModelConfigError(FmError, ValueError):
    """A model config file or dict is invalid; the message names the file, the key and the fix."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


SIZES = ("vocab_size", "dim_model", "dim_ff", "dim_head", "num_heads", "num_layers", "max_length")


def positive_sizes(config: Any) -> list[tuple[bool, str]]:
    return [(getattr(config, n) >= 1, f"{n}={getattr(config, n)} must be >= 1") for n in SIZES if hasattr(config, n)]


def raise_problems(checks: list[tuple[bool, str]]) -> None:
    """A config's own checks (in ``__post_init__``): every failing one at once."""
    failed = [message for ok, message in checks if not ok]
    if failed:
        raise ModelConfigError(failed[0] if len(failed) == 1 else format_problems("model config", failed),
                               problems=failed)


def config_from_dict(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    """Build dataclass ``cls`` from ``data``: every unknown key (with the closest valid one), wrong type and
    failed check is reported at once, naming ``source``."""
    if not isinstance(data, dict):
        raise ModelConfigError(f"{source}: a model config must be a JSON object, got {type(data).__name__}")
    kwargs, problems = check(cls, data)
    if problems:
        raise ModelConfigError(format_problems(source, problems), problems=problems)
    try:
        config = cls(**kwargs)
    except ModelConfigError as exc:
        raise ModelConfigError(format_problems(source, exc.problems), problems=exc.problems) from None
    config.source = source
    return config


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read model config ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON-serialisable fields of a config (what ``config.json`` in a checkpoint holds)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def resolve_dtype(name: str, source: str = "<config>") -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ModelConfigError(f"{source}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
