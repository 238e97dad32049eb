"""Pretrain iFlytekSpark-13B: ``torchrun … pretrain_spark.py --config train_configs/X.json [--key value …]``.

Same trainer, engines and mixture loader as dragonfly (``fm.train.trainer``). ``config`` may name a
file under ``apps/spark_13b/model_configs/`` (``13b``, ``tiny``) or any model config path. See docs/spark.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR.parents[1]))  # run from a checkout without installing

from fm.train.config import ConfigError, TrainConfig, config_from_argv  # noqa: E402
from fm.train.trainer import NonFiniteError, run  # noqa: E402

DEFAULT_TRAIN_CONFIG = APP_DIR / "train_configs" / "13b_pretrain.json"


def resolve_spark_model_config(cfg: TrainConfig) -> TrainConfig:
    """``config: "13b"`` names a shipped *spark* config (unqualified names mean dragonfly's elsewhere)."""
    if "/" not in cfg.config and not Path(cfg.config).is_file():
        cfg.config = f"spark/{cfg.config}"
    return cfg


def normalise_flags(argv: list[str]) -> list[str]:
    """Bare ``--lora`` (no value) means ``--lora true``, as the launcher's flag form."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--lora" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: list[str] | None = None, default_config: Path = DEFAULT_TRAIN_CONFIG) -> int:
    args = normalise_flags(list(sys.argv[1:] if argv is None else argv))
    if not any(a in ("--config", "--train_config", "--config-file", "--config_file") or
               a.startswith(("--config=", "--train_config=")) for a in args):
        args = ["--config", str(default_config), *args]
    try:
        cfg = resolve_spark_model_config(config_from_argv(args))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.lora and not cfg.load_model:
        logging.getLogger("fm.train").warning("lora is on but load_model is empty: the adapters train on a randomly "
                                              "initialised base; set load_model to the base weights (.pt)")
    try:
        return run(cfg)
    except NonFiniteError as e:
        logging.getLogger("fm.train").error("%s", e)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
