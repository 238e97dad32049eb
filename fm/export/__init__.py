"""Model export/import: :mod:`fm.export.hf` (dragonfly ↔ Hugging Face ``LlamaForCausalLM``).

The Spark Megatron-DeepSpeed importer lives beside the model, in :mod:`fm.models.spark_import`.
"""

from fm.export.hf import export_checkpoint, import_hf

__all__ = ["export_checkpoint", "import_hf"]
