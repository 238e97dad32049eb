"""Pretrain the dragonfly model: ``torchrun … pretrain_dragonfly.py --config train_configs/X.json [--key value …]``.

The train config is the JSON given with ``--config`` (or ``--train_config``); every ``--key value`` after
it overrides one key. See docs/training.md for every key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from fm.train.config import ConfigError, config_from_argv  # noqa: E402
from fm.train.trainer import NonFiniteError, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_argv(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except NonFiniteError as e:
        logging.getLogger("fm.train").error("%s", e)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
