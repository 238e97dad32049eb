"""Loader statistics for a mixture config: what the training loader would produce, and how fast.

    fm stats --dataset-config dataset_configs/demo.json --tokenizer demo \\
        --batch-size 4 --max-length 512 --rows 2000 [--workers 2] [--seed 0] [--json]

Prints rows produced, tokens per task and their share against the configured weight, lines used, samples
dropped (and why), truncated / segmented lines, padding, and packed tokens per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from fm.data.loader import build_train_loader
from fm.data.mixture import MixtureConfigError


def collect(args: argparse.Namespace) -> dict:
    from fm.tokenizer import load_tokenizer

    loader = build_train_loader(args.dataset_config, load_tokenizer(args.tokenizer), batch_size=args.batch_size,
                                max_length=args.max_length, num_workers=args.workers, seed=args.seed)
    rows = tokens = batches = 0
    start = time.perf_counter()
    for batch in loader:
        batches += 1
        rows += args.batch_size
        tokens += batch["num_tokens"]
        if rows >= args.rows:
            break
    seconds = time.perf_counter() - start
    return {"rows": rows, "batches": batches, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "padding": 1.0 - tokens / (rows * args.max_length) if rows else 0.0,
            "stop_reason": loader.stop_reason, "tasks": loader.stats()}


def render(r: dict) -> str:
    lines = [f"rows: {r['rows']} ({r['batches']} batches), tokens: {r['tokens']:,} "
             f"(padding {100 * r['padding']:.1f}%), {r['tokens_per_s']:,.0f} tokens/s over {r['seconds']:.1f} s"]
    if r["stop_reason"]:
        lines.append(f"ended early: {r['stop_reason']}")
    head = (f"{'task':<24} {'weight':>7} {'share':>7} {'tokens':>12} {'samples':>8} {'lines':>8} "
            f"{'dropped: input too long':>24} {'oversize':>8} {'truncated':>9} {'segmented':>9}")
    lines += [head, "-" * len(head)]
    for name, s in r["tasks"].items():
        lines.append(f"{name:<24} {100 * s['weight']:>6.2f}% {100 * s['share']:>6.2f}% {s['tokens']:>12,} "
                     f"{s['samples']:>8} {s['lines']:>8} {s['input_too_long']:>24} {s['oversize_dropped']:>8} "
                     f"{s['truncated']:>9} {s['segmented']:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fm stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-config", "--dataset_config", required=True, help="mixture config (JSON list)")
    p.add_argument("--tokenizer", "--tokenizer_path", required=True,
                   help="SentencePiece .model, tokenizer.json or HF tokenizer directory (or 'demo', the shipped one): "
                        "the one training will use")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1)
    p.add_argument("--max-length", "--max_length", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1000, help="stop after this many rows (default 1000)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = collect(args)
    except (MixtureConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
