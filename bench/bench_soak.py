"""Soak: does a long run's memory stay flat? A tiny dragonfly trains N steps in one process (fsdp, a world of one,
the real loader, tensorboard, jsonl and checkpoints every ``--save-iters``) and the resident set size the trainer
logs each step (``memory.rss``, the current RSS, not the high-water mark) is read back.

    python bench/bench_soak.py [--steps 5000] [--warmup 500]

Prints RSS after warm-up and at the end, the slope of a least-squares line through the steps after warm-up
(MiB per 1,000 steps), and the median RSS of every half checkpoint interval: growth would show as medians that
keep rising; a one-time step at the first checkpoint (its staging buffers) and noise are no growth.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

from fm.data.convert import Options, convert
from fm.train.config import load_config
from fm.train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_data(d: Path) -> Path:
    rng = random.Random(0)
    (d / "raw").mkdir(parents=True)
    with open(d / "raw" / "a.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"input": "", "output": f"doc {i} " + " ".join(rng.choices(WORDS, k=40))}) + "\n")
    convert(str(d / "raw"), str(d / "idx"), Options(language="en", progress=False))
    mix = d / "mix.json"
    mix.write_text(json.dumps([{"task_name": "a", "abs_weight": 1.0, "path": str(d / "idx"), "allow_repeat": True}]))
    return mix


def slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--save-iters", type=int, default=1000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    d = Path(tempfile.mkdtemp(prefix="fm_soak_"))
    cfg = load_config(None, {
        "config": str(ROOT / "apps/fm9g_2b/model_configs/tiny.json"), "dataset_config": str(make_data(d)),
        "engine": "fsdp", "dtype": "fp32", "max_length": 64, "batch_size": 2, "train_iters": a.steps,
        "save_iters": a.save_iters, "keep_last_n": 1, "warmup_iters": 10, "inspect_iters": 0, "log_iters": 10**9,
        "save": str(d / "ckpt"), "tensorboard": str(d / "tb"), "model_unique": "soak"})
    t0 = time.perf_counter()
    assert run(cfg) == 0
    dt = time.perf_counter() - t0
    rows = [json.loads(x) for x in (d / "ckpt" / "soak" / "train_stats.jsonl").read_text().splitlines()]
    rss = [(r["iter"], r["memory"]["rss"] * 1024) for r in rows if "rss" in r.get("memory", {})]
    after = [p for p in rss if p[0] > a.warmup]
    print(f"{a.steps} steps in {dt:.0f} s ({1000 * dt / a.steps:.1f} ms/step), checkpoints every {a.save_iters}")
    print(f"RSS at step {after[0][0]}: {after[0][1]:.1f} MiB; at step {after[-1][0]}: {after[-1][1]:.1f} MiB; "
          f"min {min(v for _, v in after):.1f}, max {max(v for _, v in after):.1f} MiB after warm-up")
    print(f"slope after warm-up: {1000 * slope(after):+.2f} MiB per 1,000 steps; peak RSS (high-water mark) "
          f"{rows[-1]['memory'].get('max_rss', 0) * 1024:.1f} MiB")
    span = max(a.save_iters // 2, 1)
    for lo in range(0, a.steps, span):
        seg = sorted(v for s, v in rss if lo < s <= lo + span)
        if seg:
            print(f"  steps {lo + 1:6d}-{lo + span:6d}: median {seg[len(seg) // 2]:6.1f} MiB "
                  f"(min {seg[0]:6.1f}, max {seg[-1]:6.1f})")


if __name__ == "__main__":
    main()
