"""Model families (single-device nn.Modules): dragonfly (FM9G 2.4B, llama-family) and spark (iFlytekSpark-13B)."""

from fm.models.config import ModelConfigError
from fm.models.dragonfly import Dragonfly, DragonflyConfig
from fm.models.registry import build_model, load_model_config, mup_scaled_param_names
from fm.models.spark import Spark, SparkConfig

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
