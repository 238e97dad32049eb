"""Peak memory and speed of a training step with the LM head and loss in chunks (``loss_chunk``) against the full
logits (``loss_chunk 0``), at the 2.4B model's vocabulary (122,753) and 4,096 tokens per micro-batch.

Each variant runs in its own process (a fresh high-water mark): a tiny dragonfly body (the head dominates), one
packed micro-batch, forward + backward + AdamW step, as the trainer computes the per-token loss. Prints the peak RSS
of each process, tokens/s (median of the timed steps) and the ratios chunked / full. Targets (issue 24): peak
≤ 0.35×, tokens/s ≥ 0.9×. Usage: ``python bench/bench_loss.py [--tokens 4096] [--vocab 122753] [--chunk 1024]
[--steps 4] [--dim 256]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from fm.models.registry import build_model, load_model_config

    torch.manual_seed(0)
    cfg = load_model_config({"vocab_size": args.vocab, "dim_model": args.dim, "dim_ff": 2 * args.dim, "dim_head": 32,
                             "num_heads": args.dim // 32, "num_kv_heads": args.dim // 64, "num_layers": 2,
                             "scale": True, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 64,
                             "tie_lm_head": True, "dtype": "fp32", "max_length": args.tokens})
    model = build_model(cfg, device="cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    targets = torch.roll(ids, -1, 1)
    cu = torch.arange(0, args.tokens + 1, args.tokens // 8, dtype=torch.int32)  # 8 documents in the row
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        if args.chunk:
            per_token = model(ids, cu_seqlens=cu, max_seqlen=args.tokens // 8, targets=targets, loss_chunk=args.chunk)
        else:
            logits = model(ids, cu_seqlens=cu, max_seqlen=args.tokens // 8)
            per_token = F.cross_entropy(logits.reshape(-1, args.vocab).float(), targets.reshape(-1),
                                        reduction="none")
        (per_token.sum() / args.tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del per_token
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_s": args.tokens / statistics.median(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=122_753)
    p.add_argument("--chunk", type=int, default=1024, help="loss_chunk of the chunked variant")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(step_worker(args)))
        return 0
    res = {}
    for name, chunk in (("full logits", 0), (f"chunks of {args.chunk}", args.chunk)):
        cmd = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--chunk", str(chunk), "--dim", str(args.dim), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<18} peak RSS {res[name]['peak_rss_mb']:>8.0f} MB   {res[name]['tokens_per_s']:>8.0f} tokens/s")
    full, chunked = res["full logits"], res[f"chunks of {args.chunk}"]
    print(f"chunked / full: peak memory {chunked['peak_rss_mb'] / full['peak_rss_mb']:.3f}x (target <= 0.35), "
          f"tokens/s {chunked['tokens_per_s'] / full['tokens_per_s']:.3f}x (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
