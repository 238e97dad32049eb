"""Typed model configs: dataclasses loaded from JSON with unknown keys rejected.

Every key of upstream's ``model_configs/*.json`` is a field (some only informational), so an
upstream file loads unchanged; a key that is neither ours nor upstream's is an error naming the
file and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch

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


class ModelConfigError(ValueError):
    """A model config file or dict is invalid; the message names the file, the key and the fix."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_from_dict(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    """Build dataclass ``cls`` from ``data``; reject unknown keys and wrong types with a precise message."""
    if not isinstance(data, dict):
        raise ModelConfigError(f"{source}: a model config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ModelConfigError(f"{source}: unknown key {key!r} in a {cls.__name__}{hint}")
        tp = hints[key]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, tp):
            raise ModelConfigError(f"{source}: key {key!r} must be {_describe(tp)}, got {value!r}")
        kwargs[key] = value
    try:
        config = cls(**kwargs)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
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
