"""Trainer end to end with 2 processes (torchrun, FSDP2 on gloo, tiny dragonfly, max_length 64).

Exact resume after SIGKILL (40 steps; kill after 23; resume from 20 with ``latest`` while a cut-short
checkpoint directory lies around), 2 → 1 process resume without repeated or skipped data lines up to
the end of the data, SIGTERM on one rank → agreed checkpoint + exit 0, non-finite skips.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import children, launch, make_run, stats


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    ref_cfg = make_run(tmp_path / "ref", repeat=True)
    rc, out = launch(ref_cfg)
    assert rc == 0, out
    ref = stats(tmp_path / "ref" / "ckpt" / "run")
    assert sorted(ref) == list(range(1, 41))

    cfg = make_run(tmp_path / "crash", repeat=True)
    rc, out = launch(cfg, faults={"die_after": 23})
    assert rc != 0, out
    run = tmp_path / "crash" / "ckpt" / "run"
    assert max(stats(run)) == 23
    # A save cut short by a crash: a step directory without the completion marker, and a temp dir.
    (run / "30" / "optimizer").mkdir(parents=True)
    (run / "30" / "fm9g_live_checkpoint-30.pt").write_bytes(b"truncated")
    (run / ".tmp-25").mkdir()
    # The resumed run also exercises async saving and keep_last_n.
    rc, out = launch(cfg, args=("--async_save", "true", "--keep_last_n", "1"))
    assert rc == 0, out
    assert "resumed at iteration 20" in out
    # 20 pruned, the stale temp dir removed; the foreign incomplete "30" is left alone (never read).
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["30", "40"]
    assert (run / "40" / "COMPLETE").is_file() and not (run / "30" / "COMPLETE").exists()
    assert (run / "latest").read_text().strip() == "40"
    got = stats(run)
    for i in range(21, 41):
        assert got[i]["loss"] == ref[i]["loss"], (i, got[i]["loss"], ref[i]["loss"])
        assert got[i]["lr"] == ref[i]["lr"] and got[i]["grad_norm"] == ref[i]["grad_norm"]

    # The checkpoint's model file loads into a fresh dragonfly, strictly, and matches the reference run.
    from fm.models.registry import build_model, load_model_config

    model = build_model(load_model_config(str(tmp_path / "ref" / "model.json")))
    sd = torch.load(run / "40" / "fm9g_live_checkpoint-40.pt", weights_only=True)
    model.load_state_dict(sd, strict=True)
    ref_sd = torch.load(tmp_path / "ref" / "ckpt" / "run" / "40" / "fm9g_live_checkpoint-40.pt", weights_only=True)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert "encoder.layers.1.ffn.ffn.w_in.w_0.weight" in sd
    log_ckpt = json.loads((run / "40" / ".log_ckpt").read_text())
    assert log_ckpt["iteration"] == 40 and log_ckpt["consumed_tokens"] == sum(r["tokens"] for r in ref.values())
    for name in ("config.json", "model_config.json", "tokenizer.model", "dataset_ckpt/state.json", "rng/rank1.pt",
                 "scheduler.pt", "COMPLETE", "optimizer"):
        assert (run / "40" / name).exists(), name
    # self-describing: the run directory alone gives the model config, the weights and the tokenizer
    from fm.checkpoint.open import open_checkpoint

    opened = open_checkpoint(run)
    assert opened.path == run / "40" and opened.model_config == load_model_config(str(tmp_path / "ref" / "model.json"))
    assert opened.tokenizer == run / "40" / "tokenizer.model"
    assert all(torch.equal(opened.state_dict()[k], sd[k]) for k in sd)

    # Tensorboard tags read back with tensorboard's own reader; lr values follow the cosine schedule.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fm.train.schedules import Schedule

    acc = EventAccumulator(str(tmp_path / "ref" / "tb" / "run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("Loss/train", "Loss/train/a", "Loss/train/b", "Optimizer/lr", "Optimizer/scale",
                "Optimizer/grad_norm", "Throughput/tokens_per_sec", "Optimizer/skipped_steps"):
        assert tag in tags, (tag, tags)
    lrs = {e.step: e.value for e in acc.Scalars("Optimizer/lr")}
    sched = Schedule("cosine", 0.01, 40, 4)
    assert all(math.isclose(lrs[t], sched.lr_at(t - 1), rel_tol=1e-6) for t in range(1, 41))
    loss = {e.step: e.value for e in acc.Scalars("Loss/train")}
    assert math.isclose(loss[40], ref[40]["loss"], rel_tol=1e-6)
    assert (tmp_path / "ref" / "ckpt" / "run" / "loss_curve.png").stat().st_size > 1000


def _lines(rec_dir: Path, upto: int | None = None) -> list[tuple[str, int]]:
    out = []
    for f in sorted(rec_dir.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if upto is None or row["iter"] <= upto:
                out += [(task, i) for task, idx in row["indexes"].items() for i in idx]
    return out


@pytest.mark.slow
def test_resume_two_to_one_process_until_data_ends(tmp_path):
    cfg = make_run(tmp_path, repeat=False, n_a=60, n_b=40, train_iters=2, save_iters=2, warmup_iters=1)
    rc, out = launch(cfg, faults={"record_indexes": tmp_path / "rec2"})
    assert rc == 0, out
    rc, out = launch(cfg, nproc=1, args=("--train_iters", "1000", "--save_iters", "100"),
                     faults={"record_indexes": tmp_path / "rec1"})
    assert rc == 0, out
    assert "resumed at iteration 2" in out and "data exhausted" in out
    first, second = _lines(tmp_path / "rec2"), _lines(tmp_path / "rec1")
    assert first and second
    every = first + second
    assert len(every) == len(set(every)), "a data line was trained on twice"
    assert set(every) == {("a", i) for i in range(60)} | {("b", i) for i in range(40)}, "a data line was skipped"
    run = tmp_path / "ckpt" / "run"
    last = max(int(d.name) for d in run.iterdir() if d.name.isdigit())
    assert (run / str(last) / "COMPLETE").is_file() and last > 2  # final checkpoint at the end of data


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_and_exits_zero(tmp_path):
    cfg = make_run(tmp_path, repeat=True, train_iters=100000, save_iters=0)
    proc = launch(cfg, wait=False)
    jsonl = tmp_path / "ckpt" / "run" / "train_stats.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 3):
        time.sleep(0.2)
    assert jsonl.exists(), proc.communicate()[0]
    rank0 = [p for p in children(proc.pid) if _rank_of(p) == 0]
    assert rank0
    os.kill(rank0[0], signal.SIGTERM)  # only rank 0 gets it: the ranks must agree through the all-reduce
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stop signal received" in out
    run = tmp_path / "ckpt" / "run"
    saved = [int(d.name) for d in run.iterdir() if d.name.isdigit() and (d / "COMPLETE").is_file()]
    assert len(saved) == 1
    step = saved[0]
    assert json.loads((run / str(step) / ".log_ckpt").read_text())["reason"] == "signal"
    rc, out = launch(cfg, args=("--train_iters", str(step + 2)))
    assert rc == 0, out
    assert f"resumed at iteration {step}" in out
    assert max(stats(run)) == step + 2


@pytest.mark.slow
def test_non_finite_steps_skipped_on_all_ranks_then_stop(tmp_path):
    cfg = make_run(tmp_path, repeat=True, train_iters=30, save_iters=4, max_skipped_steps=3)
    rc, out = launch(cfg, faults={"nan_steps": "1:2,1:5,1:6,1:7"})
    assert rc != 0, out
    assert "3 consecutive non-finite steps" in out
    run = tmp_path / "ckpt" / "run"
    s = stats(run)
    assert sorted(s) == list(range(1, 8))
    assert [i for i in s if s[i]["skipped"]] == [2, 5, 6, 7]
    assert [s[i]["skipped_steps"] for i in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
    # Skipped steps do not advance the schedule: step 3 uses the lr step 2 would have used.
    assert s[3]["lr"] == s[2]["lr"]
    state = json.loads((run / "7" / ".log_ckpt").read_text())
    assert state["reason"] == "non-finite" and state["optimizer_steps"] == 3 and state["skipped_total"] == 4
    # The stop checkpoint holds the last good weights: those after step 4 (steps 5-7 were skipped).
    a = torch.load(run / "4" / "fm9g_live_checkpoint-4.pt", weights_only=True)
    b = torch.load(run / "7" / "fm9g_live_checkpoint-7.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
