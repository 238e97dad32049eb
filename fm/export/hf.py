"""``fm export`` / ``fm import``: dragonfly checkpoints ↔ Hugging Face Llama directories (stock
``LlamaForCausalLM``: the format, with the muP factors folded into the weights, is :mod:`fm.export.llama`).

CLI::

    python -m fm.export.hf export --checkpoint CKPT --output OUT_DIR [--config MODEL.json]
                                  [--tokenizer tokenizer.model] [--dtype bf16] [--max-shard-size 5GB]
    python -m fm.export.hf --checkpoint CKPT --output OUT_DIR        # same ("export" is the default)
    python -m fm.export.hf import --hf-dir HF_DIR --output OUT.pt [--config-output OUT.json]

``CKPT`` is any form :func:`fm.checkpoint.open.open_checkpoint` opens: a run or step directory, a ``.pt`` state dict,
or a LoRA adapter directory (exported merged into its base). Its model config and tokenizer come from the
checkpoint itself unless ``--config``/``--tokenizer`` are given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fm.chat import FORMATS
from fm.checkpoint.open import open_checkpoint
from fm.export.llama import (
    dragonfly_to_hf,
    hf_config_from_dragonfly,
    hf_to_dragonfly,
    load_hf_state_dict,
    parse_size,
    save_safetensors_sharded,
    special_ids,
    write_tokenizer_files,
)
from fm.io import atomic_dir, atomic_write
from fm.models.config import resolve_dtype
from fm.models.dragonfly import DragonflyConfig

log = logging.getLogger("fm.export.hf")


def _parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else resolve_dtype(name, "--dtype")


# ------------------------------------------------------------------------------- entry points


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                      config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                      dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
                      overwrite: bool = False, chat_template: str = "fm9g") -> Path:
    """Write a Hugging Face Llama directory for a dragonfly checkpoint; returns the directory.

    ``chat_template``: the fm.chat format the tokenizer's ``chat_template`` renders (``none``: no template).
    """
    ck = open_checkpoint(checkpoint, model_config=config, tokenizer=tokenizer)
    cfg = ck.model_config
    if not isinstance(cfg, DragonflyConfig):
        raise ValueError(f"{ck.describe()}: a {cfg.model_family} model; only dragonfly exports to Hugging Face Llama "
                         "(Spark's sliding-window attention has no stock transformers architecture)")
    state = ck.state_dict()
    target_dtype = dtype if isinstance(dtype, torch.dtype) else _parse_dtype(dtype)
    hf_state = dragonfly_to_hf(state, cfg, target_dtype)
    out_dtype = next(iter(hf_state.values())).dtype
    sp_model = ck.tokenizer
    bos, eos, pad = special_ids(sp_model)
    hf_cfg = hf_config_from_dragonfly(cfg, out_dtype, bos, eos, pad)
    gen_cfg = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    output = Path(output)
    with atomic_dir(output, overwrite) as tmp:
        files = save_safetensors_sharded(hf_state, tmp, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        if sp_model is not None:
            write_tokenizer_files(sp_model, tmp, chat_format=None if chat_template == "none" else chat_template)
        else:
            log.warning("no tokenizer given (--tokenizer): the export has weights and config only")
    log.info("exported %s → %s (%d weight file(s), %s)", ck.describe(), output, len(files), out_dtype)
    return output


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, *, config_output: str | os.PathLike | None = None,
              dtype: str | torch.dtype | None = None) -> tuple[Path, Path]:
    """Llama directory → our state dict ``.pt`` + model config json (default: ``<output stem>.json``)."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    hf_cfg = json.loads(cfg_path.read_text())
    target_dtype = dtype if isinstance(dtype, torch.dtype) else _parse_dtype(dtype)
    state, cfg = hf_to_dragonfly(load_hf_state_dict(hf_dir), hf_cfg, target_dtype)
    output = Path(output)
    config_output = Path(config_output) if config_output else output.with_suffix(".json")
    atomic_write(output, lambda f: torch.save(state, f))
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    atomic_write(config_output, lambda f: f.write(text.encode()))
    log.info("imported %s → %s + %s", hf_dir, output, config_output)
    return output, config_output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="dragonfly checkpoint → Hugging Face Llama directory")
    ex.add_argument("--checkpoint", required=True,
                    help="run or step directory, .pt state dict, or LoRA adapter directory (merged into its base)")
    ex.add_argument("--output", required=True, help="output directory (created atomically)")
    ex.add_argument("--config", help="model config json or shipped name (default: the checkpoint's own)")
    ex.add_argument("--tokenizer", help="SentencePiece tokenizer.model to ship (default: the checkpoint's own)")
    ex.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: the checkpoint's dtype)")
    ex.add_argument("--max-shard-size", default="5GB", help="split weights above this size (default 5GB)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ex.add_argument("--chat-template", choices=FORMATS, default="fm9g",
                    help="the conversation format the tokenizer's chat_template renders, as fm generate --template "
                         "does (default fm9g: <用户>…<AI>; none: no chat_template)")
    im = sub.add_parser("import", help="Hugging Face Llama directory → our state dict .pt + model config json")
    im.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors/bin weights")
    im.add_argument("--output", required=True, help="state dict .pt to write")
    im.add_argument("--config-output", help="model config json to write (default: OUTPUT with .json suffix)")
    im.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: the weights' dtype)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["export", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            print(export_checkpoint(args.checkpoint, args.output, config=args.config, tokenizer=args.tokenizer,
                                    dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                    chat_template=args.chat_template))
        else:
            pt, cfg = import_hf(args.hf_dir, args.output, config_output=args.config_output, dtype=args.dtype)
            print(pt)
            print(cfg)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:  # bad input: the message says how
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission: nothing half-written is left under the output's name
        print(f"error: {args.output}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; nothing was "
              "written under that name", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
