"""``fm export`` / ``fm import``: dragonfly checkpoints ↔ Hugging Face directories of the open families
(Llama incl. Llama-3 rope scaling, Qwen2/2.5, Qwen3, Mistral, MiniCPM: :mod:`fm.export.families`). An imported
checkpoint exports back to its own family; dragonfly's own (and MiniCPM) export as stock ``LlamaForCausalLM`` with
the muP factors folded into the weights (:mod:`fm.export.llama`).

CLI::

    python -m fm.export.hf export --checkpoint CKPT --output OUT_DIR [--config MODEL.json]
                                  [--tokenizer tokenizer.model] [--dtype bf16] [--max-shard-size 5GB]
    python -m fm.export.hf --checkpoint CKPT --output OUT_DIR        # same ("export" is the default)
    python -m fm.export.hf import --hf-dir HF_DIR --output OUT.pt [--config-output OUT.json]

``CKPT`` is any form :func:`fm.checkpoint.open.open_checkpoint` opens: a run or step directory, a ``.pt`` state dict,
or a LoRA adapter directory (exported merged into its base). Its model config and tokenizer come from the
checkpoint itself unless ``--config``/``--tokenizer`` are given.

Import takes the tokenizer along: ``OUT.tokenizer/`` (the Hugging Face tokenizer files, copied) when HF_DIR has a
``tokenizer.json``, else ``OUT.tokenizer.model`` when it has a SentencePiece ``tokenizer.model``. Export ships such
a directory's files unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fm.chat import FORMATS
from fm.checkpoint.open import open_checkpoint
from fm.export.families import hf_config_from_dragonfly, hf_to_dragonfly, tied_export
from fm.export.llama import (
    dragonfly_to_hf,
    load_hf_state_dict,
    parse_size,
    save_safetensors_sharded,
    special_ids,
    write_tokenizer_files,
)
from fm.io import atomic_dir, atomic_write
from fm.models.config import resolve_dtype
from fm.models.dragonfly import DragonflyConfig
from fm.tokenizer import GENERATION_CONFIG, load_tokenizer, tokenizer_files

log = logging.getLogger("fm.export.hf")


def _parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else resolve_dtype(name, "--dtype")


# ------------------------------------------------------------------------------- entry points


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                      config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                      dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
                      overwrite: bool = False, chat_template: str = "fm9g") -> Path:
    """Write a Hugging Face directory for a dragonfly checkpoint (its source family's, or stock Llama); returns it.

    ``tokenizer``: a SentencePiece model (with tokenizer files written for it) or a Hugging Face tokenizer directory
    (its files copied as they are). ``chat_template``: the fm.chat format a SentencePiece tokenizer's
    ``chat_template`` renders (``none``: no template).
    """
    tok_dir = Path(tokenizer) if tokenizer is not None and Path(tokenizer).is_dir() else None
    ck = open_checkpoint(checkpoint, model_config=config, tokenizer=None if tok_dir else tokenizer)
    cfg = ck.model_config
    if not isinstance(cfg, DragonflyConfig):
        raise ValueError(f"{ck.describe()}: a {cfg.model_family} model; only dragonfly exports to Hugging Face "
                         "(Spark's sliding-window attention has no stock transformers architecture)")
    tok = tok_dir or ck.tokenizer
    hf_tok = tok if tok is not None and Path(tok).is_dir() else None
    bos, eos, pad = _hf_special_ids(hf_tok) if hf_tok else special_ids(tok)
    stop = list(load_tokenizer(hf_tok).stop_ids) if hf_tok else []  # a generation_config.json taken along
    target_dtype = dtype if isinstance(dtype, torch.dtype) else _parse_dtype(dtype)
    out_dtype = target_dtype or cfg.torch_dtype
    hf_cfg = hf_config_from_dragonfly(cfg, out_dtype, bos, eos, pad)  # refuses what the family cannot hold
    state = ck.state_dict()
    hf_state = dragonfly_to_hf(state, cfg, target_dtype, tied=tied_export(cfg),
                               o_bias=bool(hf_cfg.get("attention_bias")))
    out_dtype = next(iter(hf_state.values())).dtype
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(out_dtype).removeprefix("torch.")
    gen_cfg = {"bos_token_id": bos, "eos_token_id": stop if len(stop) > 1 else eos, "pad_token_id": pad,
               "do_sample": False}
    output = Path(output)
    with atomic_dir(output, overwrite) as tmp:
        files = save_safetensors_sharded(hf_state, tmp, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        if hf_tok is not None:  # shipped as it is
            for f, name in tokenizer_files(hf_tok):
                if name != GENERATION_CONFIG:  # the export writes its own (its stop ids above)
                    shutil.copyfile(f, tmp / name)
        elif tok is not None:
            write_tokenizer_files(tok, tmp, chat_format=None if chat_template == "none" else chat_template)
        else:
            log.warning("no tokenizer given (--tokenizer): the export has weights and config only")
    log.info("exported %s → %s (%s, %d weight file(s), %s)", ck.describe(), output, hf_cfg["architectures"][0],
             len(files), out_dtype)
    return output


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, *, config_output: str | os.PathLike | None = None,
              dtype: str | torch.dtype | None = None) -> tuple[Path, Path]:
    """A family's Hugging Face directory → our state dict ``.pt`` + model config json (default: ``<output
    stem>.json``) + its tokenizer beside them (``<stem>.tokenizer/`` or ``<stem>.tokenizer.model``). Everything is
    checked before the first file is written; each file is written atomically."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    hf_cfg = json.loads(cfg_path.read_text())
    target_dtype = dtype if isinstance(dtype, torch.dtype) else _parse_dtype(dtype)
    sources: dict[str, str] = {}
    state, cfg = hf_to_dragonfly(load_hf_state_dict(hf_dir, sources), hf_cfg, target_dtype, where=str(cfg_path),
                                 sources=sources)
    output = Path(output)
    config_output = Path(config_output) if config_output else output.with_suffix(".json")
    atomic_write(output, lambda f: torch.save(state, f))
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    atomic_write(config_output, lambda f: f.write(text.encode()))
    tok = _import_tokenizer(hf_dir, output)
    log.info("imported %s (%s) → %s + %s%s", hf_dir, hf_cfg.get("model_type"), output, config_output,
             f" + {tok}" if tok else "")
    return output, config_output


def _hf_special_ids(tok_dir: Path) -> tuple[int | None, int | None, int | None]:
    """``(bos, eos, pad)`` of a Hugging Face tokenizer directory, as fm reads it."""
    tok = load_tokenizer(tok_dir)
    return tok.bos_id, tok.eos_id, tok.pad_id


def _import_tokenizer(hf_dir: Path, output: Path) -> Path | None:
    """``<stem>.tokenizer/`` (a copy of the Hugging Face tokenizer files, ``generation_config.json`` among them: its
    ``eos_token_id`` stop fm generate) or ``<stem>.tokenizer.model``; a tokenizer of the other kind left there from
    an earlier import is removed."""
    from fm.checkpoint.open import write_tokenizer_beside

    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer.model").is_file():
        return write_tokenizer_beside(output, hf_dir)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    text = ("dragonfly checkpoint → Hugging Face directory: the family it was imported from (Llama, Qwen2, Qwen3, "
            "Mistral), else stock Llama with muP folded in (dragonfly, MiniCPM); transformers and vLLM load it with no "
            "remote code")
    ex = sub.add_parser("export", help=text, description=text)
    ex.add_argument("--checkpoint", required=True,
                    help="run or step directory, .pt state dict, or LoRA adapter directory (merged into its base)")
    ex.add_argument("--output", required=True, help="output directory (created atomically)")
    ex.add_argument("--config", help="model config json or shipped name (default: the checkpoint's own)")
    ex.add_argument("--tokenizer", help="SentencePiece tokenizer.model, or Hugging Face tokenizer directory (copied "
                    "as is), to ship (default: the checkpoint's own)")
    ex.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: the checkpoint's dtype)")
    ex.add_argument("--max-shard-size", default="5GB", help="split weights above this size (default 5GB)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ex.add_argument("--chat-template", choices=FORMATS, default="fm9g",
                    help="the conversation format the tokenizer's chat_template renders, as fm generate --template "
                         "does (default fm9g: <用户>…<AI>; none: no chat_template)")
    text = ("Hugging Face directory (Llama incl. Llama-3 rope scaling and tied heads, Qwen2/2.5, Qwen3, Mistral, "
            "MiniCPM, upstream FM9G's fm9g/fm9g7b) → our state dict .pt + model config json + its tokenizer "
            "(OUTPUT stem + .tokenizer/ or .tokenizer.model); anything else (other model types and rope types, MoE, "
            "mlp_bias, sliding windows on some layers only, weights that do not fit the config) is refused, naming "
            "the file and the key, before anything is written")
    im = sub.add_parser("import", help=text, description=text)
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
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission: nothing half-written is left under the output's name
        print(f"error: {args.output}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; nothing was "
              "written under that name", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
