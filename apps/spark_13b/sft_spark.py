"""Fine-tune iFlytekSpark-13B (full, or LoRA with ``--lora``):
``torchrun … sft_spark.py --config train_configs/13b_sft.json [--lora] [--key value …]``.

SFT data: jsonl ``{"input", "target"}`` (Spark) or ``{"input", "output"}`` indexed by
``apps/spark_13b/preprocess_sft_data.py``; the mixture config applies ``dataset_configs/transforms/spark_chat.py``
(``<User> {input}<end><Bot> `` + target, loss on the target and ``<end>`` only). ``load_model`` names the
base weights. With ``--lora`` (``lora: true``) only PEFT adapters train and every checkpoint directory is a
PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``). See docs/spark.md.
"""

from __future__ import annotations

from pathlib import Path

from fm.train.cli import main as train_main

CONFIGS = Path(__file__).resolve().parent / "train_configs"


def main(argv: list[str] | None = None) -> int:
    """``--lora`` (bare, ``true``, ``1``, ``--lora=yes``...) picks the LoRA train config when no ``--config`` is
    given: the command line is parsed once, by :mod:`fm.compat.argv`, as the launcher parses it."""
    return train_main(argv, default_config=CONFIGS / "13b_sft.json", lora_default=CONFIGS / "13b_lora.json",
                      family="spark", prog="sft_spark.py")


if __name__ == "__main__":
    raise SystemExit(main())
