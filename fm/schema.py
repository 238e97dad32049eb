"""One validator for every config (train, model, mixture), driven by the dataclasses' type hints.

A config class is a dataclass; a field may carry metadata made with :func:`key`: its help text (``fm train
--help`` and the docs table come from it), a lower bound (``min``/``gt``) and a normaliser for string choices.
:func:`check` converts a JSON object (or command-line strings, with ``from_cli``) field by field and returns the
values plus **every** problem it found — unknown keys with the closest valid key, wrong types, invalid
choices, values out of range — so a config with three mistakes is reported once, with all three.

Types understood: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``, ``list[X]``,
``tuple[X, ...]`` (a JSON list, or a string of items separated by commas, spaces or ``|``), ``dict``, ``Any``, and
``list[C]`` of a dataclass ``C`` (a JSON list of objects, each checked as ``C`` and named ``key[i].field``; on the
command line a JSON string).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args, get_origin

from fm.words import parse_bool


def key(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,  # noqa: A002
        gt: float | None = None, normalise: Callable[[str], str] | None = None, why: str = "",
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the metadata :func:`check` and :func:`help_rows` read (``why``: added to the
    message when a value is refused, e.g. why only one choice exists)."""
    meta = {"help": help, "min": min, "gt": gt, "normalise": normalise, "why": why}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def format_problems(where: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


class _Bad(Exception):
    pass


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f'; did you mean "{close[0]}"?' if close else ""


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(describe_type(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "object"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, *, from_cli: bool, normalise: Callable[[str], str] | None = None) -> Any:
    """``value`` as type ``tp``, or :class:`_Bad` with the reason. Strings become numbers or booleans only
    on the command line (``from_cli``); in a JSON file a value must have its JSON type already."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if from_cli and isinstance(value, str) and value.strip().lower() in ("null", "none") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message
            return coerce(value, options[0], from_cli=from_cli, normalise=normalise)
        for arg in options:
            try:
                return coerce(value, arg, from_cli=from_cli, normalise=normalise)
            except _Bad:
                continue
        raise _Bad(f"must be {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        v = value
        if isinstance(v, str):
            v = normalise(v) if normalise else v.strip().lower()
        if v not in choices:
            close = suggest(str(v), [str(c) for c in choices]) if isinstance(v, str) else ""
            raise _Bad(f"{value!r} is not one of {', '.join(map(str, choices))}{close}")
        return v
    if origin in (list, tuple):
        elem = next((a for a in get_args(tp) if a is not Ellipsis), Any)
        if isinstance(value, str):  # "q,k,v", "q k v" or MindFormers' "q_proj|v_proj"
            value = [part for part in re.split(r"[,\s|]+", value.strip()) if part]
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"must be a {describe_type(tp)}, got {value!r}")
        items = [coerce(v, elem, from_cli=from_cli) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Bad(f"must be a JSON object, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if from_cli and isinstance(value, str) and parse_bool(value) is not None:
            return parse_bool(value)
        raise _Bad(f"must be a JSON boolean (true or false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        hint = " (a JSON number, not a string)" if isinstance(value, str) and not from_cli else ""
        raise _Bad(f"must be an integer{hint}, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        hint = " (a JSON number, not a string)" if isinstance(value, str) and not from_cli else ""
        raise _Bad(f"must be a number{hint}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list, bool)) or value is None:
            raise _Bad(f"must be a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Bad(f"must be {describe_type(tp)}, got {value!r}")
    return value


@functools.cache  # resolving type hints is slow, and a mixture config checks the same class once per entry
def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def check(cls: type, data: Mapping[str, Any], *, from_cli: bool = False, ignore: tuple[str, ...] = (),
          prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """``(converted values, problems)`` for ``data`` against dataclass ``cls`` (see the module docstring). A field
    whose type is itself a dataclass (a config section) takes a JSON object, checked the same way; its values are a
    nested dict and its problems are named ``section.key`` (``prefix``). :func:`build` makes the instances."""
    known = fields_of(cls)
    names = sorted(n for n in known if n not in ignore)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in data.items():
        if name not in known or name in ignore:
            problems.append(f"unknown key {prefix + name!r}{suggest(name, names)}")
            continue
        f, tp = known[name]
        item_cls = dataclass_items(tp)
        if item_cls is not None:
            items, found = _check_items(item_cls, value, from_cli=from_cli, where=f"{prefix}{name}")
            problems += found
            if not found:
                values[name] = items
            continue
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                problems.append(f"{prefix}{name}: must be a JSON object of its keys, got {value!r}")
                continue
            values[name], found = check(tp, value, from_cli=from_cli, prefix=f"{prefix}{name}.")
            problems += found
            continue
        try:
            v = coerce(value, tp, from_cli=from_cli, normalise=f.metadata.get("normalise"))
            lo, gt = f.metadata.get("min"), f.metadata.get("gt")
            if lo is not None and isinstance(v, (int, float)) and v < lo:
                raise _Bad(f"must be >= {lo}, got {v}")
            if gt is not None and isinstance(v, (int, float)) and not v > gt:
                raise _Bad(f"must be > {gt}, got {v}")
        except _Bad as e:
            why = f.metadata.get("why")
            problems.append(f"{prefix}{name}: {e}" + (f": {why}" if why else ""))
            continue
        values[name] = v
    return values, problems


def dataclass_items(tp: Any) -> type | None:
    """``C`` when ``tp`` is ``list[C]`` of a dataclass ``C``, else None."""
    if get_origin(tp) is list:
        args = get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _check_items(cls: type, value: Any, *, from_cli: bool, where: str) -> tuple[list[Any], list[str]]:
    """A JSON list of objects as instances of dataclass ``cls``, with every problem of every item (``where[i].key``):
    unknown keys, wrong types, missing required keys. On the command line the list comes as a JSON string."""
    if from_cli and isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            return [], [f"{where}: must be a JSON list of objects, got {value!r} ({e.msg})"]
    if not isinstance(value, (list, tuple)):
        return [], [f"{where}: must be a JSON list of objects, got {value!r}"]
    required = [n for n, (f, _) in fields_of(cls).items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    items, problems = [], []
    for i, item in enumerate(value):
        if isinstance(item, cls):
            items.append(item)
            continue
        if not isinstance(item, Mapping):
            problems.append(f"{where}[{i}]: must be a JSON object of its keys ({', '.join(fields_of(cls))}), "
                            f"got {item!r}")
            continue
        vals, found = check(cls, item, from_cli=from_cli, prefix=f"{where}[{i}].")
        found += [f"{where}[{i}]: missing required key {k!r}" for k in required if k not in item]
        problems += found
        if not found:
            items.append(build(cls, vals))
    return items, problems


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of ``cls`` from :func:`check`'s values (nested dicts for sections); absent keys keep their
    defaults."""
    kw = {}
    for name, (_, tp) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            kw[name] = build(tp, values.get(name, {}))
        elif name in values:
            kw[name] = values[name]
    return cls(**kw)


def help_rows(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` per field, in declaration order (``fm train --help``, the docs table); the
    keys of a section are named ``section.key``."""
    rows = []
    for name, (f, tp) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            rows += help_rows(tp, f"{prefix}{name}.")
            continue
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + name, describe_type(tp), default, f.metadata["help"]))
    return rows


def show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value)
