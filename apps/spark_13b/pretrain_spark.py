"""Pretrain iFlytekSpark-13B: ``torchrun … pretrain_spark.py --config train_configs/X.json [--key value …]``.

Same trainer, engines and mixture loader as dragonfly (``fm.train``). ``config`` may name a shipped Spark
config (``13b``, ``tiny``: here unqualified names are Spark's) or any model config path. See docs/spark.md.
"""

from __future__ import annotations

from pathlib import Path

from fm.train.cli import main as train_main
from fm.train.config import TrainConfig, qualify_model_config

APP_DIR = Path(__file__).resolve().parent

DEFAULT_TRAIN_CONFIG = APP_DIR / "train_configs" / "13b_pretrain.json"


def resolve_spark_model_config(cfg: TrainConfig) -> TrainConfig:
    """``config: "13b"`` names a shipped *spark* config (unqualified names mean dragonfly's elsewhere)."""
    return qualify_model_config(cfg, "spark")


def main(argv: list[str] | None = None, default_config: Path = DEFAULT_TRAIN_CONFIG) -> int:
    return train_main(argv, default_config=default_config, family="spark", prog="pretrain_spark.py")


if __name__ == "__main__":
    raise SystemExit(main())
