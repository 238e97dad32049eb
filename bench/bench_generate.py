"""Generation throughput: KV-cache incremental decoding versus full recomputation every step.

    python bench/bench_generate.py                       # small dragonfly, 256 new tokens, CPU
    python bench/bench_generate.py --family spark --sliding-window 64 --batch 4
    python bench/bench_generate.py --device cuda --dtype bf16 --dim 1024 --layers 12

Prints new tokens per second for both paths (same model, same prompts, greedy, measured in this
run) and their ratio, and checks that both produced the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from fm.generate import generate
from fm.models.registry import build_model, load_model_config


def build(args: argparse.Namespace) -> torch.nn.Module:
    common = {"vocab_size": args.vocab, "dim_model": args.dim, "dim_ff": args.dim * 8 // 3 // 8 * 8,
              "dim_head": 64, "num_heads": args.dim // 64, "num_layers": args.layers, "dtype": args.dtype}
    if args.family == "dragonfly":
        cfg = {**common, "num_kv_heads": max(1, args.dim // 64 // args.gqa), "scale": True, "scale_emb": 12.0,
               "scale_depth": 1.4, "dim_model_base": 64, "tie_lm_head": True, "init_std": 0.1}
    else:
        cfg = {**common, "num_kv_heads": args.dim // 64, "sliding_window": args.sliding_window}
    config = load_model_config(cfg, args.family)
    torch.manual_seed(0)
    return build_model(config, device=args.device).eval()


def timed(model, prompts, args, use_cache: bool) -> tuple[float, list[list[int]]]:
    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    generate(model, prompts, max_new_tokens=4, use_cache=use_cache)  # warm-up
    best, out = float("inf"), []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=args.new_tokens, use_cache=use_cache)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["dragonfly", "spark"], default="dragonfly")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--gqa", type=int, default=2, help="query heads per kv head (dragonfly)")
    p.add_argument("--sliding-window", type=int, default=128, help="spark's window (rolling cache)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(10, args.vocab, (args.prompt_len - 1,), generator=g).tolist()
               for _ in range(args.batch)]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.family} dim={args.dim} layers={args.layers} vocab={args.vocab} "
          f"({n_params / 1e6:.1f} M params, {args.dtype}, {args.device}, {torch.get_num_threads()} threads)")
    print(f"batch={args.batch} prompt={args.prompt_len} new_tokens={args.new_tokens} (greedy, best of {args.repeats})")
    t_cache, out_cache = timed(model, prompts, args, use_cache=True)
    t_full, out_full = timed(model, prompts, args, use_cache=False)
    new = args.batch * args.new_tokens
    print(f"with KV cache   : {new / t_cache:9.1f} tokens/s  ({t_cache:.2f} s)")
    print(f"full recompute  : {new / t_full:9.1f} tokens/s  ({t_full:.2f} s)")
    print(f"speed-up        : {t_full / t_cache:.1f}x")
    print(f"same tokens     : {out_cache == out_full}")


if __name__ == "__main__":
    main()
