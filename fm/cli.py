"""``fm``: one command for every step, each with its own ``--help``.

    fm demo                                   the whole workflow on a built-in corpus (CPU, minutes)
    fm txt2jsonl / fm convert / fm stats      data: text -> jsonl -> index, mixture statistics
    fm train --config TRAIN.json              training on this machine with torchrun (checked first)
    fm generate / fm eval                     use a checkpoint (any form: run, step, .pt, LoRA, HF export)
    fm merge                                  average checkpoints (the last N of a run, weighted, EMA)
    fm export / fm import / fm import-spark   Hugging Face and Megatron interop
    fm lora merge / fm lora export-hf         LoRA adapters
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from fm.errors import FmError

# name: (module with main(argv), one line for `fm --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fm.demo", "the whole workflow on a corpus built from Python's documentation (CPU, a few minutes)"),
    "txt2jsonl": ("fm.data.txt2jsonl", "plain text -> jsonl records, one per document"),
    "convert": ("fm.data.convert", "jsonl -> index directory (upstream convert_json2index.py)"),
    "stats": ("fm.data.stats", "what the training loader makes of a mixture config: tokens per task, speed"),
    "train": ("fm.cli:train", "train on this machine with torchrun: checks everything first; --help lists the keys"),
    "generate": ("fm.generate", "generate text from a checkpoint (its model config and tokenizer come with it)"),
    "eval": ("fm.eval.__main__", "C-Eval, MMLU, CMMLU, GSM8K and perplexity from local files"),
    "merge": ("fm.checkpoint.merge", "average checkpoints of one model (a run's last N, chosen steps or paths; "
              "uniform, weighted or EMA) into one .pt"),
    "export": ("fm.cli:export", "checkpoint -> Hugging Face directory of its family (Llama/Qwen2/Qwen3/Mistral; "
               "dragonfly, MiniCPM: Llama)"),
    "import": ("fm.cli:import_hf", "Hugging Face Llama/Qwen2/Qwen3/Mistral/MiniCPM/FM9G directory -> dragonfly .pt "
               "(+ its model config and tokenizer)"),
    "import-spark": ("fm.export.spark_import", "Megatron-DeepSpeed iFlytekSpark checkpoint -> spark .pt"),
    "lora": ("fm.train.lora", "LoRA adapters: merge into dense weights, convert for the Hugging Face export"),
}


def train(argv: Sequence[str]) -> int:
    """``fm train``: the app launcher with ``python -m fm.train`` as the worker and no default train config."""
    from fm.launch import app_main

    return app_main(["-m", "fm.train"], "", list(argv), prog="fm train")


def export(argv: Sequence[str]) -> int:
    from fm.export.hf import main

    return main(["export", *argv])


def import_hf(argv: Sequence[str]) -> int:
    from fm.export.hf import main

    return main(["import", *argv])


def usage() -> str:
    from fm import __version__

    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items())
    return (f"usage: fm COMMAND [--help | ARGS...]\n\nfm {__version__}: train Chinese and English LLMs (FM9G "
            f"dragonfly, iFlytekSpark-13B) on BMTrain or FSDP2.\n\ncommands:\n{rows}\n\n"
            "fm COMMAND --help describes each. Docs: docs/README.md (简体中文: docs/zh/README.md).")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fm import __version__

        print(f"fm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        print(f"fm: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[name][0].partition(":")
    run = getattr(importlib.import_module(module), func or "main")
    try:
        return int(run(rest) or 0)
    except FmError as e:  # a bad input or a state to change: the message says what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
