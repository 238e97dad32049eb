"""Checkpoint converters: :mod:`fm.export.hf` (dragonfly ↔ Hugging Face ``LlamaForCausalLM``) and
:mod:`fm.export.spark_import` (the released iFlytekSpark-13B Megatron-DeepSpeed shards → spark).

Names are resolved lazily so ``python -m fm.export.hf`` does not import the module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_checkpoint", "import_hf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fm.export import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'fm.export' has no attribute {name!r}")
