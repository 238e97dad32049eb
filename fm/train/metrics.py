"""Step logging: console line, tensorboardX scalars (upstream tags), jsonl stats, MFU, inspect table, loss PNG.

Only rank 0 writes. Tensorboard tags (upstream names first): ``Loss/train``, ``Loss/train/<task>``,
``Optimizer/lr``, ``Optimizer/scale``, ``Optimizer/grad_norm``; ours: ``Optimizer/skipped_steps``,
``Throughput/tokens_per_sec``, ``Throughput/tokens_per_sec_per_device``, ``Throughput/mfu``,
``Throughput/step_time``, ``Memory/<stat>_gib``, ``Data/stage`` (runs with ``data.stages``: the data stage of
the step's batches, 0 = ``data.mixture``), ``Loss/z_loss`` (``optim.z_loss``), ``Stability/spikes`` (loss spikes
so far) and ``Stability/loss_z`` (the step's z-score, once the window is full; ``stability.*``); validation
(:meth:`MetricsWriter.log_validation`):
``Loss/valid``, ``Loss/valid/<task>``, ``Perplexity/valid``, ``Perplexity/valid/<task>``; downstream
(:meth:`MetricsWriter.log_downstream`): ``Eval/<task>/accuracy`` (micro) and ``Eval/<task>/macro_accuracy``.

The jsonl file has one row per iteration; each validation adds a row ``{"iter", "kind": "valid",
"valid_loss", "valid_ppl", "valid_tokens", "valid_task_loss", "valid_task_ppl"}`` after that
iteration's row (``read_stats`` merges it into the iteration's row).

MFU = achieved FLOP/s / (peak FLOP/s × devices) with FLOPs per token = ``6·N + 12·L·d·S`` (N non-embedding
parameters, L layers, d hidden size, S sequence length; the attention term is not halved for causal
masking, as in the PaLM/Megatron convention). The peak is ``peak_tflops`` from the config, else a
table of bf16 dense peaks by GPU name; on CPU (no known peak) MFU is not reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm.io import atomic_write

log = logging.getLogger("fm.train")

# bf16 dense tensor-core peaks (TFLOP/s) by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40": 181.0,
               "A40": 150.0, "4090": 165.0, "3090": 71.0, "V100": 125.0}


def guess_peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return 0.0


def flops_per_token(non_embedding_params: int, num_layers: int, dim_model: int, seq_len: int,
                    vocab_size: int = 0) -> float:
    """Training FLOPs per token (forward + backward): ``6·N + 12·L·d·S``, plus the LM head's ``6·d·V`` (its matmul
    is work the GPU does whether or not the head shares the embedding's weights; ``N`` counts neither)."""
    return 6.0 * non_embedding_params + 12.0 * num_layers * dim_model * seq_len + 6.0 * dim_model * vocab_size


def count_non_embedding_params(model: nn.Module, shapes: dict[str, Any] | None = None) -> int:
    """Parameters outside the embedding/head. ``shapes``: full shapes by name (``Engine.param_shapes``), needed
    when the module holds flat shards (bmtrain)."""
    if not shapes:
        shapes = {n: getattr(p, "_original_shape", None) or p.shape for n, p in model.named_parameters()}
    return sum(math.prod(shape) for name, shape in shapes.items() if "embedding" not in name and "lm_head" not in name)


def format_step_line(s: dict[str, Any]) -> str:
    parts = [
        f"| iter {s['iter']:>6d}/{s['train_iters']}",
        f"loss {s['loss']:.4f}",
        f"lr {s['lr']:.3e}",
        f"grad_norm {s['grad_norm']:.4f}",
        f"tokens/s {s['tokens_per_sec']:.0f}",
        f"time {s['step_time']:.3f}s",
    ]
    if s.get("mfu") is not None:
        parts.append(f"mfu {100 * s['mfu']:.1f}%")
    mem = s.get("memory") or {}
    if mem:
        key = "max_allocated" if "max_allocated" in mem else next(iter(mem))
        parts.append(f"mem {mem[key]:.2f}GiB")
    if s.get("z_loss") is not None:
        parts.insert(2, f"z_loss {s['z_loss']:.4g}")
    if s.get("stage") is not None:
        parts.append(f"stage {s['stage']}")
    parts.append(f"skipped {s['skipped_steps']}")
    if s.get("spike"):
        parts.append(f"SPIKE(z {s['loss_z']:.1f})")
    if s.get("skipped"):
        parts.append(f"SKIPPED({s.get('skip_reason') or 'non-finite'})")
    tasks = s.get("task_loss") or {}
    if tasks:
        parts.append("tasks " + " ".join(f"{k}={v:.4f}" for k, v in tasks.items()))
    return " | ".join(parts) + " |"


def format_valid_line(step: int, res: dict[str, Any]) -> str:
    """Console line of one validation (``res`` from ``fm.eval.validation``: loss, ppl, tokens, per_task)."""
    parts = [f"| valid at iter {step:>6d}", f"loss {res['loss']:.4f}", f"ppl {res['ppl']:.3f}",
             f"tokens {res['tokens']}"]
    if res.get("time") is not None:
        parts.append(f"time {res['time']:.3f}s")
    per = res.get("per_task") or {}
    if per:
        parts.append("tasks " + " ".join(f"{k}={v['loss']:.4f} (ppl {v['ppl']:.3f})" for k, v in per.items()))
    return " | ".join(parts) + " |"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


class MetricsWriter:
    """Console + tensorboard + jsonl for one run (no-op on ranks other than 0)."""

    def __init__(self, *, enabled: bool, tensorboard_dir: str | os.PathLike | None,
                 jsonl_path: str | os.PathLike | None, all_tasks: bool = True, log_iters: int = 1,
                 purge_step: int | None = None):
        """``purge_step``: after a resume, the first step this writer logs; tensorboard then drops what an earlier
        writer of the run logged from that step on (a crashed run logs steps past its last checkpoint)."""
        self.enabled = enabled
        self.all_tasks = all_tasks
        self.log_iters = max(1, log_iters)
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            # tensorboardX names event files by the second; a resume within the same second would
            # truncate the previous run's file, so make each writer's file name unique.
            suffix = f".{os.getpid()}.{time.time_ns() % 1_000_000_000:09d}"
            self.tb = SummaryWriter(logdir=str(tensorboard_dir), filename_suffix=suffix, purge_step=purge_step)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def log_step(self, s: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(s["iter"])
        if step % self.log_iters == 0 or s.get("skipped") or s.get("spike"):
            log.info(format_step_line(s))
        if self.jsonl is not None:
            row = {k: v for k, v in s.items() if k != "train_iters"}
            row["wall_time"] = time.time()
            self.jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            add = self.tb.add_scalar
            if math.isfinite(s["loss"]):
                add("Loss/train", s["loss"], step)
            if self.all_tasks:
                for task, val in (s.get("task_loss") or {}).items():
                    add(f"Loss/train/{task}", val, step)
            add("Optimizer/lr", s["lr"], step)
            add("Optimizer/scale", s.get("loss_scale", 1.0), step)
            if math.isfinite(s["grad_norm"]):
                add("Optimizer/grad_norm", s["grad_norm"], step)
            add("Optimizer/skipped_steps", s["skipped_steps"], step)
            if s.get("z_loss") is not None and math.isfinite(s["z_loss"]):
                add("Loss/z_loss", s["z_loss"], step)
            if "spikes" in s:
                add("Stability/spikes", s["spikes"], step)
            if s.get("loss_z") is not None and math.isfinite(s["loss_z"]):
                add("Stability/loss_z", s["loss_z"], step)
            add("Throughput/tokens_per_sec", s["tokens_per_sec"], step)
            add("Throughput/tokens_per_sec_per_device", s["tokens_per_sec"] / max(1, s.get("world_size", 1)), step)
            add("Throughput/step_time", s["step_time"], step)
            if s.get("mfu") is not None:
                add("Throughput/mfu", s["mfu"], step)
            for k, v in (s.get("memory") or {}).items():
                add(f"Memory/{k}_gib", v, step)
            if s.get("stage") is not None:
                add("Data/stage", s["stage"], step)

    def log_validation(self, step: int, res: dict[str, Any]) -> None:
        """Console line, ``Loss/valid[/<task>]`` and ``Perplexity/valid[/<task>]`` scalars, a jsonl row."""
        if not self.enabled:
            return
        log.info(format_valid_line(step, res))
        per = res.get("per_task") or {}
        if self.jsonl is not None:
            row = {"iter": step, "kind": "valid", "valid_loss": res["loss"], "valid_ppl": res["ppl"],
                   "valid_tokens": res["tokens"], "valid_task_loss": {k: v["loss"] for k, v in per.items()},
                   "valid_task_ppl": {k: v["ppl"] for k, v in per.items()}, "wall_time": time.time()}
            self.jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.add_scalar("Loss/valid", res["loss"], step)
            self.tb.add_scalar("Perplexity/valid", res["ppl"], step)
            for task, v in per.items():
                self.tb.add_scalar(f"Loss/valid/{task}", v["loss"], step)
                self.tb.add_scalar(f"Perplexity/valid/{task}", v["ppl"], step)
            self.tb.flush()

    def log_downstream(self, step: int, res: dict[str, Any]) -> None:
        """In-loop downstream accuracy (``res``: task → :func:`fm.eval.scoring.summarize_mc`'s dict, plus ``time``):
        a console line, ``Eval/<task>/accuracy`` and ``Eval/<task>/macro_accuracy``, a jsonl row ``{"iter", "kind":
        "downstream", "downstream": {task: {"accuracy", "macro_accuracy", "correct", "total"}}}``."""
        if not self.enabled:
            return
        tasks = {k: v for k, v in res.items() if isinstance(v, dict)}
        log.info("| downstream at iter %6d | %s | time %.3fs |", step, " | ".join(
            f"{name} {_pct(r['micro_accuracy'])} ({r['correct']}/{r['total']}, macro {_pct(r['macro_accuracy'])})"
            for name, r in tasks.items()), res.get("time", 0.0))
        if self.jsonl is not None:
            row = {"iter": step, "kind": "downstream", "wall_time": time.time(),
                   "downstream": {k: {"accuracy": r["micro_accuracy"], "macro_accuracy": r["macro_accuracy"],
                                      "correct": r["correct"], "total": r["total"]} for k, r in tasks.items()}}
            self.jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for name, r in tasks.items():
                if r["micro_accuracy"] is not None:
                    self.tb.add_scalar(f"Eval/{name}/accuracy", r["micro_accuracy"], step)
                if r["macro_accuracy"] is not None:
                    self.tb.add_scalar(f"Eval/{name}/macro_accuracy", r["macro_accuracy"], step)
            self.tb.flush()

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


# ------------------------------------------------------------------------------------------ inspect
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def inspect_stats(model: nn.Module, all_reduce, shapes: dict[str, Any] | None = None,
                  to_host=None) -> list[dict[str, Any]]:
    """Per-parameter statistics over the FULL (all-ranks) tensor, from local shards + two all-reduces.

    ``all_reduce(tensor, op)`` is the engine's; ``shapes`` the full shapes by name (``Engine.param_shapes``).
    Whether a parameter has a gradient is decided across ranks too: under ZeRO a rank whose shard of it is empty
    holds no ``.grad``. Gradient statistics are over the elements that have one; ``has_grad`` is False (and they
    are NaN) only for a parameter with no gradient on any rank (frozen). Everything stays on the parameters' device
    until the one copy of the two reduced tables to the host (``to_host``, default ``Tensor.cpu``). Collective:
    every rank must call it."""
    shapes = shapes or {}
    rows, sums, maxes = [], [], []
    for name, p in model.named_parameters():
        x = _local(p.detach()).float()
        g = _local(p.grad.detach()).float() if p.grad is not None else None
        zero = x.new_zeros(())  # constants on the parameter's device: a CPU tensor cannot join a device stack
        grad = [g.sum(), (g * g).sum(), x.new_tensor(float(g.numel())), x.new_ones(())] if g is not None else [zero] * 4
        sums.append(torch.stack([x.sum(), (x * x).sum(), x.new_tensor(float(x.numel())), *grad]))
        maxes.append(torch.stack([x.abs().max() if x.numel() else zero,
                                  g.abs().max() if g is not None and g.numel() else zero]))
        rows.append({"name": name, "shape": tuple(shapes.get(name) or getattr(p, "_original_shape", None) or p.shape)})
    if not rows:
        return []
    to_host = to_host or (lambda t: t.cpu())
    S = to_host(all_reduce(torch.stack(sums), "sum")).tolist()
    M = to_host(all_reduce(torch.stack(maxes), "max")).tolist()
    for r, s, m in zip(rows, S, M):
        n = max(1.0, s[2])
        mean = s[0] / n
        r["mean"] = mean
        r["std"] = math.sqrt(max(0.0, s[1] / n - mean * mean))
        r["max_abs"] = m[0]
        r["has_grad"] = s[6] > 0
        gn = max(1.0, s[5])
        gmean = s[3] / gn
        r["grad_std"] = math.sqrt(max(0.0, s[4] / gn - gmean * gmean)) if r["has_grad"] else float("nan")
        r["grad_max_abs"] = m[1] if r["has_grad"] else float("nan")
    return rows


def format_inspect_table(rows: list[dict[str, Any]]) -> str:
    """The inspect table; a parameter with no gradient on any rank (frozen) shows ``-`` as its grad std."""
    width = max([len(r["name"]) for r in rows] + [4])
    head = f"{'name':<{width}} {'shape':>18} {'mean':>11} {'std':>11} {'max|.|':>11} {'grad std':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        grad = f"{r['grad_std']:>11.3e}" if r["has_grad"] else f"{'-':>11}"
        lines.append(f"{r['name']:<{width}} {shape:>18} {r['mean']:>11.3e} {r['std']:>11.3e} "
                     f"{r['max_abs']:>11.3e} {grad}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ loss curve
def read_stats(jsonl_path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    # A resumed run appends again from the resume step: keep the last value per iteration. A validation
    # row ("kind": "valid") or a downstream row ("kind": "downstream") is merged into its iteration's row instead of
    # replacing it.
    by_iter: dict[int, dict[str, Any]] = {}
    for r in rows:
        it = int(r["iter"])
        if r.get("kind") in ("valid", "downstream"):
            by_iter.setdefault(it, {"iter": it}).update({k: v for k, v in r.items() if k != "kind"})
        else:
            by_iter[it] = r
    return [by_iter[k] for k in sorted(by_iter)]


def plot_loss_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Render loss (and lr on a second axis) per iteration from a run's ``train_stats.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_stats(jsonl_path)
    train = [r for r in rows if math.isfinite(r.get("loss", math.nan))]
    valid = [r for r in rows if math.isfinite(r.get("valid_loss", math.nan))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["iter"] for r in train], [r["loss"] for r in train], color="tab:blue", label="loss")
    if valid:
        ax.plot([r["iter"] for r in valid], [r["valid_loss"] for r in valid], "o-", color="tab:green", markersize=3,
                label="valid loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("iteration")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    lr_rows = [r for r in rows if "lr" in r]
    ax2.plot([r["iter"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:orange", alpha=0.7, label="lr")
    ax2.set_ylabel("lr", color="tab:orange")
    ax.set_title(title or Path(jsonl_path).parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> int:
    """``python -m fm.train.metrics STATS.jsonl OUT.png``: render the loss curve."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("jsonl")
    ap.add_argument("png")
    a = ap.parse_args(argv)
    print(plot_loss_curve(a.jsonl, a.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
