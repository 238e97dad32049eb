"""The training worker that torchrun starts on every process: ``python -m fm.train --config TRAIN.json [--key value]``.

The upstream-named scripts (``apps/fm9g_2b/pretrain_dragonfly.py``, ``apps/spark_13b/pretrain_spark.py``,
``sft_spark.py``) are this with their app's defaults. Start it through ``fm train`` or a launcher, which check
everything first (:mod:`fm.train.preflight`) and run torchrun.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fm.train.config import ConfigError, config_from_argv, qualify_model_config

TRAIN_CONFIG_FLAGS = ("--config", "--train_config", "--config-file", "--config_file")


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """Bare ``--lora`` (no value) means ``--lora true``, as the launchers' flag form."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--lora" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: Sequence[str] | None = None, *, default_config: str | Path | None = None,
         family: str | None = None, prog: str = "python -m fm.train") -> int:
    from fm.train.trainer import NonFiniteError, run

    args = normalise_flags(list(sys.argv[1:] if argv is None else argv))
    if "-h" in args or "--help" in args:
        from fm.launch import app_help

        print(app_help(prog, str(default_config or "(none: give --config)")))
        return 0
    if default_config is not None and not any(a in TRAIN_CONFIG_FLAGS or a.startswith(("--config=", "--train_config="))
                                              for a in args):
        args = ["--config", str(default_config), *args]
    try:
        cfg = qualify_model_config(config_from_argv(args), family)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.lora and not cfg.load_model:
        logging.getLogger("fm.train").warning("lora is on but load_model is empty: the adapters train on a randomly "
                                              "initialised base; set load_model to the base weights (.pt)")
    from fm.checkpoints import CheckpointFormError
    from fm.data.mixture import MixtureConfigError
    from fm.models.config import ModelConfigError

    try:
        return run(cfg)
    except NonFiniteError as e:
        logging.getLogger("fm.train").error("%s", e)
        return 3
    except (ModelConfigError, MixtureConfigError, CheckpointFormError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)  # a bad input: its message says what to fix, no traceback
        return 2
