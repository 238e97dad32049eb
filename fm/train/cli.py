"""The training worker that torchrun starts on every process: ``python -m fm.train --config TRAIN.json [--key value]``.

The upstream-named scripts (``apps/fm9g_2b/pretrain_dragonfly.py``, ``apps/spark_13b/pretrain_spark.py``,
``sft_spark.py``) are this with their app's defaults. Start it through ``fm train`` or a launcher, which check
everything first (:mod:`fm.train.preflight`) and run torchrun. The command line is :mod:`fm.compat.argv`'s.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fm.compat.argv import choose_config, parse_train_args
from fm.errors import FmError


def main(argv: Sequence[str] | None = None, *, default_config: str | Path | None = None,
         lora_default: str | Path | None = None, family: str | None = None, prog: str = "python -m fm.train") -> int:
    from fm.train.config import load_config, qualify_model_config
    from fm.train.trainer import run

    log = logging.getLogger("fm.train")
    try:
        args = parse_train_args(list(sys.argv[1:] if argv is None else argv))
        if args.help:
            from fm.launch import app_help

            print(app_help(prog, str(default_config or "(none: give --config)")))
            return 0
        if args.dry_run:
            raise FmError("--dry-run is the launcher's option (fm train, the apps' .sh scripts): the worker trains")
        cfg = qualify_model_config(load_config(choose_config(args, default_config, lora_default), cli=args.cli()),
                                   family)
        if cfg.lora.enabled and not cfg.model.init_from:
            log.warning("lora is on but model.init_from (load_model) is empty: the adapters train on a randomly "
                        "initialised base; set it to the base weights (.pt)")
        return run(cfg)
    except FmError as e:  # a bad input or a refused state: the message says what to fix, no traceback
        if e.exit_code == 2:
            print(f"error: {e}", file=sys.stderr)
        else:
            log.error("%s", e)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
