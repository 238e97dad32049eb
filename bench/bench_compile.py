"""Training tokens/s with compiled transformer layers (``compile: true``) against eager, on the CPU.

Each variant runs in its own process: the fsdp engine (a world of one) shards a dragonfly model with
``shard(compile=...)`` as the trainer does, then times forward (loss in chunks) + backward + clip + AdamW on packed
rows, after warm-up steps (which include the compilation). Prints tokens/s of each and the ratio compiled / eager
(issue 24's CPU target: >= 1.1x). Usage: ``python bench/bench_compile.py [--config tiny] [--batch-size 4]
[--max-length 512] [--steps 10] [--warmup 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> dict:
    import torch

    from fm.distributed import build_engine
    from fm.models.registry import build_model, load_model_config

    engine = build_engine("fsdp", seed=0)
    engine.init()
    cfg = load_model_config(args.config)
    model = engine.shard(build_model(cfg, device="meta"), compile=args.compile)
    opt = engine.build_optimizer([{"params": [p for p in model.parameters()]}], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    B, L = args.batch_size, args.max_length
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    targets = torch.roll(ids, -1, 1)
    cu = torch.arange(0, B * L + 1, L // 4, dtype=torch.int32)  # 4 documents per row
    times, t_compile = [], time.perf_counter()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        per_token = model(ids, cu_seqlens=cu, max_seqlen=L // 4, targets=targets, loss_chunk=1024)
        engine.backward(per_token.sum() / per_token.numel())
        engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        engine.zero_grad()
        if i == args.warmup - 1:
            t_compile = time.perf_counter() - t_compile
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    engine.shutdown()
    del opt
    return {"tokens_per_s": B * L / statistics.median(times), "warmup_s": t_compile}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    res = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in ("eager", "compiled"):
        cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--compile"] if name == "compiled" else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<9} {res[name]['tokens_per_s']:>9.0f} tokens/s   (warm-up {res[name]['warmup_s']:.1f} s)")
    print(f"compiled / eager: {res['compiled']['tokens_per_s'] / res['eager']['tokens_per_s']:.3f}x "
          "(CPU target >= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
