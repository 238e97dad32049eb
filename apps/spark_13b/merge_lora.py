"""Fold a LoRA adapter into dense weights (the counterpart of Spark's ``sft_iFlytekSpark_lora_merge.py``).

    python apps/spark_13b/merge_lora.py --base spark13b_base.pt --lora data/checkpoints/spark13b_lora/2000 \\
        --output spark13b_sft_merged.pt [--dtype bf16]

``--lora``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``: every LoRA
checkpoint directory is one); ``--base``: the base weights in any checkpoint form (default: the adapter's
``base_model_name_or_path``, which the trainer records). Same as ``fm lora merge``. Each adapted weight
becomes ``W + (B @ A)·alpha/r`` (computed in fp32, stored in the base's dtype, or ``--dtype``); adapter
keys are dropped. The output is written atomically and loads into the plain model with ``strict=True``, with
its model config beside it (``<output stem>.json``), so generation, export and further training use it like
any checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fm.models.config import DTYPES
from fm.train import lora, lora_adapter

log = logging.getLogger("spark.merge_lora")


def merge(base: str | Path | None, adapter_dir: str | Path, output: str | Path, dtype: str | None = None) -> Path:
    cfg, adapter = lora_adapter.load_adapter(adapter_dir)
    out = Path(output)
    lora.merge_adapter(adapter_dir, base, out, DTYPES[dtype] if dtype else None)
    log.info("merged %d adapted weights (r=%s, alpha=%s, scale %.4g) into %s", len(adapter) // 2, cfg["r"],
             cfg["lora_alpha"], lora_adapter.scaling(cfg), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="merge_lora.py", description="fold a PEFT LoRA adapter into dense weights")
    p.add_argument("--base", help="base weights: .pt, checkpoint or run directory, Hugging Face export (default: the "
                   "adapter's base_model_name_or_path)")
    p.add_argument("--lora", required=True, help="PEFT adapter directory (a LoRA checkpoint directory)")
    p.add_argument("--output", required=True, help="merged state dict .pt to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the merged weights (default: the base's dtype)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        merge(args.base, args.lora, args.output, args.dtype)
    except (lora.LoraError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
