"""The one grammar of a training command line: ``fm train``, every app launcher, the torchrun worker and the apps.

    [--config TRAIN.json] [--dry-run] [-h|--help] [--key value | --key=value | --flag] ...

* the train config file: ``--config X`` when X is a train config JSON (upstream also calls the *model* config
  ``config``: any other ``--config`` value is that key), or ``--train_config X`` / ``--train-config X`` /
  ``--config_file X`` / ``--config-file X``; the last one wins;
* every other ``--key value`` overrides one key: fm's (``--optim.lr 0.1``, ``--checkpoint.resume.source latest``)
  or upstream's (``--lr 0.1``); ``-`` in a name is ``_``;
* a boolean key given bare (``--lora``, ``--offload``: followed by another option or nothing) means true, so
  ``--lora`` and ``--lora true`` are one thing everywhere.

Only the standard library is imported (the launchers parse before the preflight imports torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fm.errors import ConfigError
from fm.words import parse_bool

CONFIG_FILE_FLAGS = ("train_config", "config_file")
# top-level keys that only a train config has (a model config has none of them)
_TRAIN_MARKERS = {"train_iters", "dataset_config", "model_unique", "lr", "run", "data", "optim", "schedule",
                  "checkpoint", "engine", "eval", "lora"}


@dataclass
class TrainArgs:
    config: str | None = None  # the train config file
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (key, value), in command-line order
    dry_run: bool = False
    help: bool = False

    def cli(self) -> dict[str, str]:
        """The overrides as :func:`fm.train.config.load_config`'s ``cli`` (a later value of a key wins)."""
        return dict(self.overrides)

    def argv(self) -> list[str]:
        """The overrides as arguments again (what a launcher passes to its workers)."""
        return [a for k, v in self.overrides for a in (f"--{k}", v)]

    def lora(self) -> bool:
        """Whether the command line turns LoRA on (``--lora``, ``--lora true``, ``--lora.enabled=1``...)."""
        value = None
        for k, v in self.overrides:
            if k in ("lora", "lora.enabled"):
                value = parse_bool(v)
        return bool(value)


def is_train_config_file(value: str) -> bool:
    """``--config X``: X is the *train* config when it is a JSON file holding train keys; otherwise ``config`` is the
    upstream key naming the *model* config."""
    p = Path(value)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and bool(_TRAIN_MARKERS & raw.keys())


def _boolean_keys() -> set[str]:
    from fm.compat.upstream import KEYS, NO_OP_FLAGS, REFUSED, field_type
    from fm.schema import help_rows
    from fm.train.config import TrainConfig

    fm_bools = {name for name, typ, _, _ in help_rows(TrainConfig) if typ == "bool"}
    return (fm_bools | {up for up, path in KEYS.items() if field_type(TrainConfig, path) is bool}
            | {k for k, (legal, _) in REFUSED.items() if isinstance(legal, bool)} | set(NO_OP_FLAGS))


def parse_train_args(argv: Sequence[str]) -> TrainArgs:
    """Parse a training command line (module docstring); a malformed one raises :class:`ConfigError`."""
    out = TrainArgs()
    flags = _boolean_keys()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            out.help = True
            continue
        if arg == "--dry-run":
            out.dry_run = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: unexpected argument {arg!r}; use --key value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            bare = i >= len(args) or args[i].startswith("--") or args[i] in ("-h", "--help")
            if bare and name in flags:
                value = "true"
            elif i >= len(args):
                raise ConfigError(f"command line: --{name} needs a value")
            else:
                value = args[i]
                i += 1
        if name in CONFIG_FILE_FLAGS or (name == "config" and is_train_config_file(value)):
            out.config = value
        else:
            out.overrides.append((name, value))
    return out


def choose_config(args: TrainArgs, default: str | Path | None, lora_default: str | Path | None = None,
                  env_config: str | None = None) -> str | None:
    """The train config a command line means: ``--config X.json``, else ``$TRAIN_CONFIG``, else the app's default
    (its LoRA default when the command line turns LoRA on, in any spelling). The launcher and the worker both ask
    this, so they agree."""
    if args.config:
        return args.config
    if env_config:
        return env_config
    chosen = lora_default if args.lora() and lora_default else default
    return str(chosen) if chosen else None
