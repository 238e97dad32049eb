"""Forward+backward throughput of our dragonfly vs transformers' LlamaForCausalLM (same dims, same run).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_model.py            # tiny + ~100M, CPU fp32
    .venv/bin/python bench/bench_model.py --models 100m --batch 2 --seqlen 512 --steps 4

Prints tokens/s for each model and the ratio ours / HF. Time is the process's CPU time
(``time.process_time``: robust to other processes competing for the cores; with N threads it sums
them, so tokens/s is per CPU-second). Measurements alternate between the implementations
(A B C A B C …) and report the best step of each and the median of the per-round ratios.
"ours packed" feeds each row as 4 packed samples (cu_seqlens → block-diagonal mask), the training
path; "ours" and "HF" feed plain causal rows.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fm.models.dragonfly import Dragonfly, DragonflyConfig

SIZES = {
    # name: (dim, layers, heads, kv_heads, dim_ff, vocab, muP)
    "tiny": (128, 4, 4, 2, 352, 8000, True),
    "100m": (768, 12, 12, 12, 2048, 8000, False),
}


def dragonfly_config(name: str) -> DragonflyConfig:
    dim, layers, heads, kv, ff, vocab, mup = SIZES[name]
    return DragonflyConfig(
        vocab_size=vocab, dim_model=dim, dim_ff=ff, dim_head=dim // heads, num_heads=heads, num_kv_heads=kv,
        num_layers=layers, scale=mup, scale_emb=12 if mup else 1.0, scale_depth=1.4 if mup else -1,
        dim_model_base=32, tie_lm_head=mup, init_std=0.02, eps=1e-6, dtype="fp32",
    )  # fmt: skip


def hf_llama(config: DragonflyConfig):
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim_model, intermediate_size=config.dim_ff,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.dim_head, rms_norm_eps=config.eps,
        rope_theta=config.base, tie_word_embeddings=config.tie_lm_head, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(hf_config)


def train_step(model, ids, targets, kwargs, is_hf: bool) -> float:
    start = time.process_time()
    out = model(ids, **kwargs)
    logits = out.logits if is_hf else out
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.process_time() - start


def bench(name: str, batch: int, seqlen: int, steps: int) -> None:
    torch.manual_seed(0)
    config = dragonfly_config(name)
    ours = Dragonfly(config, device="cpu", dtype=torch.float32).train()
    hf = hf_llama(config).train()
    n_ours = ours.num_parameters()
    n_hf = sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, config.vocab_size, (batch, seqlen))
    targets = torch.randint(0, config.vocab_size, (batch, seqlen))
    seg = seqlen // 4
    cu = torch.arange(0, batch * seqlen + 1, seg, dtype=torch.int32)
    pos = (torch.arange(seqlen) % seg).expand(batch, seqlen)
    runs = {
        "ours": (ours, {}, False),
        "ours packed": (ours, {"position_ids": pos, "cu_seqlens": cu, "max_seqlen": seg}, False),
        "HF Llama": (hf, {}, True),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for model, kw, is_hf in runs.values():  # warm-up
        train_step(model, ids, targets, kw, is_hf)
    for _ in range(steps):
        for name_run, (model, kw, is_hf) in runs.items():
            times[name_run].append(train_step(model, ids, targets, kw, is_hf))
    tokens = batch * seqlen
    print(f"\n{name}: {n_ours / 1e6:.1f}M params (HF {n_hf / 1e6:.1f}M), batch {batch}x{seqlen}, "
          f"{torch.get_num_threads()} threads, {steps} rounds")  # fmt: skip
    for name_run, ts in times.items():
        print(f"  {name_run:12s} {tokens / min(ts):10.0f} tokens/CPU-s  (best {min(ts) * 1000:.0f} CPU-ms/step)")
    for name_run in ("ours", "ours packed"):
        # per-round ratios (the two ran back to back under the same load); median is robust to bursts
        ratios = sorted(h / o for h, o in zip(times["HF Llama"], times[name_run]))
        median = ratios[len(ratios) // 2]
        best = min(times["HF Llama"]) / min(times[name_run])
        print(f"  {name_run + ' / HF':18s} median round ratio {median:.3f}, best/best {best:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4, help="rows for tiny (100m uses a quarter)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU fp32")
    for name in args.models:
        batch = args.batch if name == "tiny" else max(1, args.batch // 4)
        bench(name, batch, args.seqlen, args.steps)


if __name__ == "__main__":
    main()
