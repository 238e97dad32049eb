"""Model families (single-device nn.Modules): dragonfly (FM9G 2.4B, llama-family) and spark (iFlytekSpark-13B)."""

from typing import Any

from fm.models.config import ModelConfigError
from fm.models.dragonfly import Dragonfly, DragonflyConfig
from fm.models.registry import build_model, load_model_config, mup_scaled_param_names

__all__ = [
    "Dragonfly",
    "DragonflyConfig",
    "ModelConfigError",
    "Spark",
    "SparkConfig",
    "build_model",
    "load_model_config",
    "mup_scaled_param_names",
]


def __getattr__(name: str) -> Any:
    # spark is imported on first use so that `python -m fm.models.spark` does not find it pre-imported
    if name in ("Spark", "SparkConfig"):
        from fm.models import spark

        return getattr(spark, name)
    raise AttributeError(f"module 'fm.models' has no attribute {name!r}")
