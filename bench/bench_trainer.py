"""Trainer step time vs a bare loop on the same model and batch (CPU, one process, FSDP2 world of one).

The bare loop: forward with the loss in chunks as the trainer computes it (``loss_chunk``), backward, clip, optimizer
step, zero_grad. The trainer:
``Trainer.train_step`` (per-token losses and per-task sums on the device, one all-reduce and one host copy
per step, non-finite guard, schedule)
plus ``MetricsWriter.log_step`` (console line, tensorboard, jsonl). Prints the ratio bare/trainer time
(1.0 = no overhead). Usage: ``python bench/bench_trainer.py [--steps 30] [--max-length 512] [--batch-size 4]
[--tasks 2] [--model tiny]``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from fm.constants import IGNORE_INDEX
from fm.train.config import load_config
from fm.train.metrics import MetricsWriter
from fm.train.trainer import Trainer


def synthetic_batch(batch_size: int, max_length: int, vocab: int, tasks: int, seed: int = 0) -> dict:
    """Packed rows of 8 samples each; samples cycle over ``tasks`` task ids (mixed tasks in every row)."""
    g = torch.Generator().manual_seed(seed)
    B, L = batch_size, max_length
    inputs = torch.randint(10, vocab, (B, L), generator=g)
    targets = torch.roll(inputs, -1, dims=1)
    seg = L // 8
    pos = (torch.arange(L) % seg).repeat(B, 1)
    task_ids = ((torch.arange(L) // seg) % tasks).repeat(B, 1)
    targets[:, seg - 1::seg] = IGNORE_INDEX  # no label across a sample boundary
    cu = torch.arange(0, B * L + 1, seg, dtype=torch.int32)
    return {"inputs": inputs, "targets": targets, "task_ids": task_ids, "position_ids": pos, "cu_seqlens": cu,
            "max_seqlen": seg, "lengths": torch.full((B,), L), "num_tokens": B * L,
            "num_targets": int((targets != IGNORE_INDEX).sum()),
            "task_names": [f"task{i}" for i in range(tasks)], "indexes": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_trainer_")
    cfg = load_config(None, {"config": a.model, "engine": "fsdp", "dtype": "fp32", "max_length": a.max_length,
                             "batch_size": a.batch_size, "train_iters": 10**6, "warmup_iters": 10, "inspect_iters": 0,
                             "save": f"{tmp}/ckpt", "tensorboard": f"{tmp}/tb", "model_unique": "bench"})
    tr = Trainer(cfg)
    tr.setup_engine()
    logging.getLogger("fm").setLevel(logging.WARNING)
    tr.build_model()
    e, model = tr.engine, tr.model
    batch = synthetic_batch(a.batch_size, a.max_length, tr.model_config.vocab_size, a.tasks)
    tr.loader = SimpleNamespace(task_names=batch["task_names"], state_dict=dict)
    tr.metrics = MetricsWriter(enabled=True, tensorboard_dir=f"{tmp}/tb", jsonl_path=f"{tmp}/stats.jsonl")
    tr.start(itertools.repeat(batch))  # the loop's own path: the next step's batch is taken during a step

    def bare_step() -> None:
        per_token = model(batch["inputs"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                          max_seqlen=batch["max_seqlen"], targets=batch["targets"], loss_chunk=cfg.engine.loss_chunk)
        e.backward(per_token.sum() / batch["num_targets"])
        e.clip_grad_norm(cfg.optim.clip_grad)
        e.optimizer_step()
        e.zero_grad()

    def trainer_step() -> None:
        tr.metrics.log_step(tr.train_step())

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        bare_step()
        trainer_step()
    bare, trainer = [], []
    for _ in range(a.steps):  # interleaved, so drift in machine load hits both equally
        bare.append(timed(bare_step))
        trainer.append(timed(trainer_step))
    tr.metrics.close()
    e.shutdown()
    mb, mt = statistics.median(bare), statistics.median(trainer)
    pair = statistics.median(b / t for b, t in zip(bare, trainer))  # robust to bursts of a shared machine
    print(f"model {a.model}: {tr.n_params} non-embedding params, batch {a.batch_size}x{a.max_length}, "
          f"{a.tasks} task(s), {a.steps} steps, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"bare loop     median step {1000 * mb:8.2f} ms   tokens/s {a.batch_size * a.max_length / mb:9.0f}")
    print(f"trainer       median step {1000 * mt:8.2f} ms   tokens/s {a.batch_size * a.max_length / mt:9.0f}")
    print(f"ratio bare/trainer = {mb / mt:.3f} (medians), {pair:.3f} (median of the {len(bare)} step pairs)  "
          "(1.0 = no trainer overhead; target >= 0.98)")


if __name__ == "__main__":
    main()
