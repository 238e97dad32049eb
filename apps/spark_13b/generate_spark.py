"""iFlytekSpark-13B inference with the released options (MindFormers ``run_iflytekspark.py --run_mode predict``).

    python apps/spark_13b/generate_spark.py --config 13b --load_checkpoint spark13b.pt \\
        --tokenizer_file tokenizer.model --predict_data '[为什么地球是独一无二的？##请问生抽和老抽有什么区别？]' \\
        --predict_length 512 --predict_batch 2 --prompt '<User> {}<end><Bot> ' --streamer False

A thin layer over :func:`fm.generate.generate` (KV cache, rolling window, sampling, Spark's subtractive
repetition penalty, whole-character streaming). Option semantics follow Spark's:

* ``--predict_data``: ``'[q1##q2…]'`` (brackets optional), or a ``.json``/``.jsonl`` file whose records
  have an ``input`` field; ``--json-output-path`` writes every record plus a ``generate`` field (jsonl).
* ``--prompt``: a template with ``{}`` where each question goes (default Spark's chat template).
* ``--predict_length``: the most new tokens per question; ``--predict_batch``: questions per batch.
* ``--do_sample False`` is greedy decoding, where, as in Spark, ``top_k``/``top_p``/``temperature``/
  ``repetition_penalty`` have no effect. With ``--do_sample True`` a token generated n times loses
  ``repetition_penalty + repetition_penalty_increase·(n−1)`` (defaults 1.0 and 0.1, Spark's yaml);
  ``top_k 1`` (Spark's default) keeps sampling deterministic.
* ``--streamer True`` prints text as it is generated, never splitting a multi-byte character.
* ``--lora_checkpoint DIR`` folds a PEFT adapter (a LoRA checkpoint directory) into the weights first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fm.chat import from_spark_text, spark_text
from fm.generate import GenerationConfig, generate
from fm.io import atomic_write_bytes
from fm.words import parse_bool

SPARK_PROMPT = "<User> {}<end><Bot> "
log = logging.getLogger("spark.generate")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    flag = parse_bool(value)
    if flag is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
    return flag


def parse_predict_data(spec: str) -> list[dict[str, Any]]:
    """``'[q1##q2]'`` → two records; a json/jsonl path → its records (each needs a string ``input``)."""
    p = Path(spec)
    if spec.endswith((".json", ".jsonl")) and p.is_file():
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        for n, item in enumerate(items, 1):
            if not isinstance(item, dict) or not isinstance(item.get("input"), str):
                raise ValueError(f"{spec}: record {n} has no string 'input' field")
        return [dict(i) for i in items]
    s = spec.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    return [{"input": q} for q in s.split("##") if q.strip()]


def format_prompt(template: str, question: str) -> str:
    if "{}" not in template:
        raise ValueError(f"--prompt {template!r} must contain '{{}}' where the question goes")
    return spark_text(template.replace("{}", question, 1))


def generation_config(args: argparse.Namespace, stop_ids: Sequence[int]) -> GenerationConfig:
    sample = bool(args.do_sample)
    return GenerationConfig(
        max_new_tokens=args.predict_length, do_sample=sample, temperature=args.temperature if sample else 1.0,
        top_k=args.top_k if sample else 0, top_p=args.top_p if sample else 1.0,
        repetition_penalty=args.repetition_penalty if sample else None, repetition_penalty_mode="subtractive",
        repetition_penalty_increase=args.repetition_penalty_increase, stop_token_ids=tuple(stop_ids),
        seed=args.seed, use_cache=bool(args.use_past))


def open_model(args: argparse.Namespace) -> Any:
    """The checkpoint to generate from (any form fm.checkpoint.open opens; a LoRA adapter folded into
    ``--load_checkpoint``), or None for random weights."""
    from fm.checkpoint.open import open_checkpoint

    if args.lora_checkpoint:
        if not args.load_checkpoint:
            raise ValueError("--lora_checkpoint needs --load_checkpoint (the base weights)")
        return open_checkpoint(args.lora_checkpoint, model_config=args.config, family="spark",
                               base=args.load_checkpoint)
    if args.load_checkpoint:
        return open_checkpoint(args.load_checkpoint, model_config=args.config, family="spark")
    return None


def load_model(args: argparse.Namespace, ck: Any = None) -> torch.nn.Module:
    from fm.checkpoint.open import CheckpointFormError
    from fm.models.config import resolve_dtype
    from fm.models.registry import build_model, load_model_config

    dtype = resolve_dtype(args.dtype) if args.dtype else None
    ck = ck if ck is not None else open_model(args)
    if ck is None:
        log.warning("no --load_checkpoint: generating with random weights")
        return build_model(load_model_config(args.config or "spark/13b", "spark"), device=args.device,
                           dtype=dtype).eval()
    try:
        ck.model_config  # noqa: B018 - the checkpoint's own config, when it has one
    except CheckpointFormError:  # a released Spark .pt carries none: the 13B config, as Spark's own script
        ck.config_hint = "spark/13b"
        log.info("%s has no model config: using spark/13b (give --config otherwise)", ck.describe())
    return ck.build_model(device=args.device, dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_spark.py", description="iFlytekSpark-13B text generation")
    a = p.add_argument
    a("--config", help="model config: a json path or a shipped name such as spark/13b (default: the checkpoint's "
      "own, else spark/13b)")
    a("--load_checkpoint", "--load-checkpoint", "--checkpoint",
      help="weights: a .pt state dict, a checkpoint or run directory (or the base of --lora_checkpoint)")
    a("--lora_checkpoint", "--lora-checkpoint", help="PEFT adapter directory folded into the weights")
    a("--tokenizer_file", "--tokenizer-file", "--tokenizer",
      help="SentencePiece tokenizer.model (default: the checkpoint's own)")
    a("--predict_data", "--predict-data", required=True, help="'[q1##q2]' or a json/jsonl file with 'input'")
    a("--json-output-path", "--json_output_path", dest="json_output_path", help="jsonl with a 'generate' field")
    a("--predict_length", "--predict-length", type=int, default=512, help="most new tokens per question")
    a("--predict_batch", "--predict-batch", type=int, default=1, help="questions decoded together")
    a("--prompt", default=SPARK_PROMPT, help="template with {} for the question (default Spark's chat template)")
    a("--do_sample", "--do-sample", type=str2bool, default=False)
    a("--top_k", "--top-k", type=int, default=1)
    a("--top_p", "--top-p", type=float, default=1.0)
    a("--temperature", type=float, default=1.0)
    a("--repetition_penalty", "--repetition-penalty", type=float, default=1.0)
    a("--repetition_penalty_increase", "--repetition-penalty-increase", type=float, default=0.1)
    a("--streamer", type=str2bool, default=False, help="print text as it is generated")
    a("--use_past", "--use-past", type=str2bool, default=True, help="KV cache (False: recompute every step)")
    a("--seed", type=int)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", help="bf16 | fp16 | fp32 (default: the model config's)")
    return p


def run(args: argparse.Namespace, out=sys.stdout) -> list[dict[str, Any]]:
    from fm.tokenizer import Tokenizer

    records = parse_predict_data(args.predict_data)
    if not records:
        raise ValueError("--predict_data holds no question")
    ck = open_model(args)
    tok_path = args.tokenizer_file or (ck.tokenizer if ck is not None else None)
    if tok_path is None:
        raise ValueError("no tokenizer: the checkpoint has no tokenizer.model; give --tokenizer_file")
    tok = Tokenizer(tok_path)
    stops = [tok.eos_id]
    end = tok.piece_to_id("<end>")
    if end is not None:
        stops.append(end)
    cfg = generation_config(args, stops)
    model = load_model(args, ck)
    batch = 1 if args.streamer else max(1, args.predict_batch)
    results: list[dict[str, Any]] = []

    def stream(row: int, tid: int | None, text: str) -> None:
        out.write(from_spark_text(text))
        out.flush()

    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        texts = [format_prompt(args.prompt, r["input"]) for r in chunk]
        ids = generate(model, texts, tokenizer=tok, config=cfg, stream=stream if args.streamer else None)
        for rec, new in zip(chunk, ids):
            rec = {**rec, "generate": from_spark_text(tok.decode(new))}
            results.append(rec)
            out.write("\n" if args.streamer else json.dumps(rec, ensure_ascii=False) + "\n")
    if args.json_output_path:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        atomic_write_bytes(text.encode("utf-8"), args.json_output_path)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
