"""Pretrain the dragonfly model: ``torchrun … pretrain_dragonfly.py --config train_configs/X.json [--key value …]``.

The train config is the JSON given with ``--config`` (or ``--train_config``); every ``--key value`` after
it overrides one key (``--help`` lists them all; docs/training.md). Same as ``python -m fm.train``; start it
with ``fm train`` or ``pretrain_dragonfly.sh``, which check everything before torchrun starts.
"""

from __future__ import annotations

from fm.train.cli import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, prog="pretrain_dragonfly.py")


if __name__ == "__main__":
    raise SystemExit(main())
