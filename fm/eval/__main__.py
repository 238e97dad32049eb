"""``fm eval`` (``python -m fm.eval``): evaluate a checkpoint on local benchmark files; see docs/evaluation.md."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch

from fm.models.config import DTYPES

log = logging.getLogger("fm.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm eval", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", required=True,
                   help="a run dir <save>/<model_unique>/ (latest step), a step dir, a .pt state dict, a LoRA "
                        "adapter dir (folded into its base), or a Hugging Face directory")
    m.add_argument("--model-config", default=None, help="model config json or shipped name (default: the "
                   "checkpoint's own)")
    m.add_argument("--model-family", default=None, help="dragonfly or spark, if the config does not say")
    m.add_argument("--tokenizer", default=None, help="SentencePiece .model, tokenizer.json or HF tokenizer directory "
                   "(default: the checkpoint's own)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    m.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: the model "
                   "config's max_length, else 4096)")
    m.add_argument("--batch-size", type=int, default=8)
    t = p.add_argument_group("tasks (give at least one)")
    t.add_argument("--ceval-dir", help="C-Eval directory with dev/ val/ test/ ({subject}_{split}.csv)")
    t.add_argument("--ceval-split", default="val", choices=["val", "test", "dev"],
                   help="test has no answers: predictions are written, no accuracy")
    t.add_argument("--mmlu-dir", help="MMLU data/ directory with dev/ test/ ({subject}_{split}.csv, no header)")
    t.add_argument("--cmmlu-dir", help="CMMLU directory with dev/ test/ ({subject}.csv)")
    t.add_argument("--shots", type=int, default=0, help="few-shot examples per question for the multiple-choice "
                   "tasks, the first K of the subject's dev split")
    t.add_argument("--subjects", default=None, help="comma-separated subjects to evaluate (default: all)")
    t.add_argument("--gsm8k", help="GSM8K-style jsonl {question, answer '... #### n'}, or a directory with "
                   "test.jsonl (+ train.jsonl for few-shot examples)")
    t.add_argument("--gsm8k-shots", type=int, default=0, help="few-shot examples (first K of train.jsonl or "
                   "--gsm8k-shots-file)")
    t.add_argument("--gsm8k-shots-file", default=None, help="jsonl the few-shot examples come from")
    t.add_argument("--max-new-tokens", type=int, default=256, help="generation length for GSM8K")
    t.add_argument("--ppl-data", action="append", default=[], help="index directory (from convert_json2index.py) "
                   "to compute perplexity on; repeatable")
    t.add_argument("--ppl-max-lines", type=int, default=None, help="use only the first N lines of each --ppl-data")
    o = p.add_argument_group("output")
    o.add_argument("--limit", type=int, default=None, help="only the first N questions per subject / examples "
                   "(quick checks)")
    o.add_argument("--output", default=None, help="write the results as JSON to this file")
    o.add_argument("--save-predictions", action="store_true", help="include per-question predictions in the JSON")
    o.add_argument("--per-subject", action="store_true", help="print per-subject accuracy too")
    return p


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def format_table(results: dict[str, Any], per_subject: bool = False) -> str:
    lines = [f"{'task':<28} {'split':<6} {'shots':>5} {'n':>7} {'micro%':>8} {'macro%':>8}"]
    for name, r in results["tasks"].items():
        if name.startswith("ppl:"):
            continue
        macro = r.get("macro_accuracy")
        micro = r.get("micro_accuracy", r.get("accuracy"))
        lines.append(f"{name:<28} {r.get('split', ''):<6} {r.get('shots', 0):>5} {r.get('total', 0):>7} "
                     f"{_fmt(micro):>8} {_fmt(macro):>8}")
        if per_subject:
            for subject, s in r.get("subjects", {}).items():
                lines.append(f"  {subject:<26} {'':<6} {'':>5} {s['total']:>7} {_fmt(s['accuracy']):>8}")
    ppl = [(n, r) for n, r in results["tasks"].items() if n.startswith("ppl:")]
    if ppl:
        lines.append(f"{'perplexity data':<40} {'lines':>8} {'tokens':>10} {'loss':>8} {'ppl':>10}")
        for name, r in ppl:
            lines.append(f"{name[4:]:<40} {r['lines']:>8} {r['tokens']:>10} {_fmt(r['loss'], False):>8} "
                         f"{r['ppl']:>10.3f}")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. the loss of empty data) become null: strict JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj: Any) -> None:
    from fm.io import atomic_write_bytes

    text = json.dumps(_json_safe(obj), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(text.encode(), path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fm.eval import scoring, tasks
    from fm.eval.loading import load_model
    from fm.tokenizer import load_tokenizer

    if not (args.ceval_dir or args.mmlu_dir or args.cmmlu_dir or args.gsm8k or args.ppl_data):
        raise SystemExit("error: nothing to evaluate: give --ceval-dir, --mmlu-dir, --cmmlu-dir, --gsm8k "
                         "and/or --ppl-data")
    if args.shots < 0 or args.gsm8k_shots < 0:
        raise SystemExit("error: --shots and --gsm8k-shots must be >= 0")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda")
                                                   else torch.float32)
    # Read every benchmark file before loading the model: a typo in a path fails in a second, not after minutes.
    subjects = args.subjects.split(",") if args.subjects else None
    mc = {}
    for name, path in (("ceval", args.ceval_dir), ("mmlu", args.mmlu_dir), ("cmmlu", args.cmmlu_dir)):
        if path:
            split = args.ceval_split if name == "ceval" else None
            mc[name] = tasks.load_mc(name, path, shots=args.shots, split=split, subjects=subjects, limit=args.limit)
    gsm = None
    if args.gsm8k:
        test_file, train_file = tasks.gsm8k_files(args.gsm8k)
        examples = tasks.read_gsm8k(test_file)[: args.limit]
        shots_file = args.gsm8k_shots_file or train_file
        shots: list[tasks.GenExample] = []
        if args.gsm8k_shots:
            if shots_file is None:
                raise SystemExit("error: --gsm8k-shots needs train.jsonl next to test.jsonl or --gsm8k-shots-file")
            shots = tasks.read_gsm8k(shots_file)[: args.gsm8k_shots]
            if len(shots) < args.gsm8k_shots:
                raise SystemExit(f"error: {shots_file} has {len(shots)} examples, fewer than --gsm8k-shots")
        gsm = (test_file, examples, shots)

    model, ck, config_source = load_model(args.checkpoint, model_config=args.model_config, family=args.model_family,
                                          device=args.device, dtype=dtype)
    tok_path = args.tokenizer or (str(ck.tokenizer) if ck.tokenizer else None)
    if tok_path is None:
        raise SystemExit(f"error: {ck.describe()} carries no tokenizer (tokenizer.model or tokenizer/): give "
                         "--tokenizer")
    tokenizer = load_tokenizer(tok_path)
    max_length = args.max_length or getattr(model.config, "max_length", None) or 4096

    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(args.checkpoint), "weights": os.path.abspath(ck.weights or ck.path),
        "model_config": config_source, "tokenizer": os.path.abspath(tok_path),
        "settings": {"device": str(args.device), "dtype": str(dtype).removeprefix("torch."),
                     "max_length": max_length, "batch_size": args.batch_size, "shots": args.shots,
                     "limit": args.limit},
        "tasks": {},
    }
    started = time.time()
    for name, (task, subs) in mc.items():
        results["tasks"][name] = scoring.evaluate_mc(model, tokenizer, task, subs, batch_size=args.batch_size,
                                                     max_length=max_length, save_predictions=args.save_predictions,
                                                     progress=log.info)
    if gsm is not None:
        test_file, examples, shots = gsm
        r = scoring.evaluate_gsm8k(model, tokenizer, examples, shots, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, max_length=max_length,
                                   save_predictions=args.save_predictions)
        results["tasks"]["gsm8k"] = {"file": os.path.abspath(test_file), "split": "test", **r}
    for path in args.ppl_data:
        results["tasks"][f"ppl:{path}"] = scoring.evaluate_perplexity(
            model, tokenizer, path, max_length=max_length, batch_size=args.batch_size, max_lines=args.ppl_max_lines)
    results["seconds"] = round(time.time() - started, 3)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from fm.eval.loading import CheckpointError
    from fm.eval.tasks import EvalDataError

    try:
        results = run(args)
    except (EvalDataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results, per_subject=args.per_subject))
    if args.output:
        write_json_atomic(args.output, results)
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
