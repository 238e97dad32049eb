"""Checkpoint save cost: synchronous save vs the training-loop stall of ``async_save``.

    OMP_NUM_THREADS=1 python bench/bench_checkpoint.py [--out /tmp/fm-bench-ckpt] [--repeats 3]

For the tiny dragonfly (apps/fm9g_2b/model_configs/tiny.json) and a ~100M-parameter dragonfly,
under the FSDP engine (world size 1, CPU), with the full upstream layout (model .pt, DCP optimizer,
RNG, .log_ckpt, dataset state, config), it prints:
  * step   — one training step of the simulated loop (forward, backward, AdamW) without a save
  * sync   — wall time of ``CheckpointManager.save`` with ``async_save=False`` (snapshot + write + commit)
  * call   — wall time of ``save`` with ``async_save=True`` (gather + deferred snapshot registration)
  * wait   — what the loop blocks on: the save call + the next optimizer step's wait for what is
             left of the snapshot's CPU copy (``engine.snapshot_wait_s``); wait % = wait / sync,
             the figure the design targets (≤ 10 %)
  * stall  — everything async saving adds to the loop: (save call + the next training step) − step,
             i.e. wait plus the slowdown of that step while the writer thread shares the CPU
             (large on a 2-core CPU box, small when the step runs on a GPU)
  * total  — time until the async save is committed (``close``)
Best of ``--repeats`` runs each, after one warm-up save (steady state: the snapshot copies into
staging buffers mapped by the previous save). Figures depend on the disk and on the machine's load.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from fm.checkpoint.commit import CheckpointManager, standard_parts
from fm.distributed import build_engine
from fm.models.registry import build_model, load_model_config

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "apps/fm9g_2b/model_configs/tiny.json")
M100 = {  # dragonfly, ~100M parameters
    "vocab_size": 32000, "dim_model": 768, "dim_ff": 2048, "dim_head": 64, "num_heads": 12, "num_kv_heads": 12,
    "num_layers": 12, "scale": True, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256,
    "tie_lm_head": True, "dtype": "fp32",
}


def parts(engine, step: int) -> list:
    return standard_parts(engine, step, log_ckpt={"iteration": step, "consumed_tokens": step * 4096},
                          dataset_state={"tasks": {"a": {"pos": step}}}, config={"model": "bench"},
                          scheduler_state={"num_iters": step})


def one_model(engine, name: str, config, out: Path, repeats: int, seq: int) -> dict[str, float]:
    cfg = load_model_config(config)
    model = engine.shard(build_model(cfg, device="meta"))
    n_params = sum(p.numel() for p in model.parameters())
    engine.build_optimizer([{"params": list(model.parameters())}], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))

    def train_step() -> None:
        engine.backward(engine.loss(model(ids), ids).mean())
        engine.optimizer_step()  # waits for a deferred snapshot copy, if any is left
        engine.zero_grad()

    train_step()  # optimizer state exists (2 fp32 moments per parameter)
    warm = CheckpointManager(out / f"{name}-warmup", comm=engine)  # first save maps the staging buffers
    warm.save(1, parts(engine, 1))
    shutil.rmtree(out / f"{name}-warmup", ignore_errors=True)
    step_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        train_step()
        step_s = min(step_s, time.perf_counter() - t0)
    res = {"sync": float("inf"), "stall": float("inf"), "call": float("inf"), "total": float("inf"), "step": step_s}
    size = 0
    for r in range(repeats):
        for mode in ("sync", "async"):
            root = out / f"{name}-{mode}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            m = CheckpointManager(root, async_save=mode == "async", comm=engine)
            t0 = time.perf_counter()
            m.save(1, parts(engine, 1))
            t1 = time.perf_counter()
            engine.snapshot_wait_s = 0.0
            train_step()  # the loop goes on; only the optimizer step may wait for the snapshot copy
            t2 = time.perf_counter()
            m.close()
            t3 = time.perf_counter()
            if mode == "sync":
                res["sync"] = min(res["sync"], t1 - t0)
            else:
                res["call"] = min(res["call"], t1 - t0)
                res["wait"] = min(res.get("wait", float("inf")), t1 - t0 + engine.snapshot_wait_s)
                res["stall"] = min(res["stall"], max(t2 - t0 - step_s, 0.0))
                res["total"] = min(res["total"], t3 - t0)
            size = sum(p.stat().st_size for p in (root / "1").rglob("*") if p.is_file())
            shutil.rmtree(root, ignore_errors=True)
    res["params_m"] = n_params / 1e6
    res["size_mb"] = size / 1e6
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/fm-bench-ckpt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256, help="tokens per training step of the simulated loop")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = build_engine("fsdp", seed=0)
    engine.init()
    try:
        head = ("model", "params", "ckpt MB", "step s", "sync s", "call s", "wait s", "wait %", "stall s", "stall %")
        print(" ".join(f"{h:>8}" for h in head), f"{'async total s':>14}")
        for name, config in (("tiny", TINY), ("100M", M100)):
            r = one_model(engine, name, config, out, args.repeats, args.seq)
            print(f"{name:>8} {r['params_m']:>7.1f}M {r['size_mb']:>8.1f} {r['step']:>8.3f} {r['sync']:>8.3f} "
                  f"{r['call']:>8.3f} {r['wait']:>8.3f} {100 * r['wait'] / r['sync']:>7.1f}% "
                  f"{r['stall']:>8.3f} {100 * r['stall'] / r['sync']:>7.1f}% {r['total']:>14.3f}",
                  flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
