"""Fine-tune iFlytekSpark-13B (full, or LoRA with ``--lora``):
``torchrun … sft_spark.py --config train_configs/13b_sft.json [--lora] [--key value …]``.

SFT data: jsonl ``{"input", "target"}`` (Spark) or ``{"input", "output"}`` indexed by
``apps/spark_13b/preprocess_sft_data.py``; the mixture config applies ``dataset_configs/transforms/spark_chat.py``
(``<User> {input}<end><Bot> `` + target, loss on the target and ``<end>`` only). ``load_model`` names the
base weights. With ``--lora`` (``lora: true``) only PEFT adapters train and every checkpoint directory is a
PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``). See docs/spark.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent

sys.path.insert(0, str(APP_DIR.parents[1]))  # run from a checkout without installing

from fm.train.cli import main as train_main  # noqa: E402
from fm.train.cli import normalise_flags  # noqa: E402

_TRUE = ("true", "1", "yes", "on")


def wants_lora(args: list[str]) -> bool:
    for i, a in enumerate(args):
        if a == "--lora" and i + 1 < len(args) and args[i + 1].lower() in _TRUE:
            return True
        if a.startswith("--lora=") and a.split("=", 1)[1].lower() in _TRUE:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = normalise_flags(list(sys.argv[1:] if argv is None else argv))
    default = APP_DIR / "train_configs" / ("13b_lora.json" if wants_lora(args) else "13b_sft.json")
    return train_main(args, default_config=default, family="spark", prog="sft_spark.py")


if __name__ == "__main__":
    raise SystemExit(main())
