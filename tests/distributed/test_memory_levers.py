"""The speed and memory levers train exactly as without them, on both engines, 2 processes under torchrun: the LM head
and loss in chunks (``loss_chunk``) against the full logits, selective activation checkpointing
(``use_checkpoint`` + ``checkpoint_every``), optimizer offload (``offload``: FSDP2's CPUOffloadPolicy, BMTrain's
AdamOffloadOptimizer through its own code on the CPU backend), and compiled layers (``compile``: on both engines, and
a compiled fsdp run resumed from its own checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL, launch, make_run, stats

STEPS = {"train_iters": 6, "save_iters": 6, "grad_accum": 2, "clip_grad": 0.5, "inspect_iters": 0,
         "weight_decay": 0.1}
BASELINE = {"loss_chunk": 0, "use_checkpoint": False, "offload": False}
LEVERS = {"loss_chunk": 40, "use_checkpoint": True, "checkpoint_every": 2, "offload": True}  # 128 tokens: 4 chunks


def _run(tmp: Path, engine: str, faults: dict | None = None, **overrides) -> Path:
    cfg = make_run(tmp, repeat=True, engine=engine, **{**STEPS, **overrides})
    rc, out = launch(cfg, bmtrain_cpu=engine == "bmtrain", faults=faults)
    if not (faults or {}).get("die_after"):
        assert rc == 0, out[-4000:]
    return tmp / "ckpt" / "run"


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / str(step) / f"fm9g_live_checkpoint-{step}.pt", weights_only=True)


def _assert_same(a: Path, b: Path, rel: float = 1e-5, atol: float = 1e-6) -> None:
    """Same losses and gradient norms at every step, same weights at the end (inductor fuses, so a compiled run
    rounds fp32 a little differently: looser there)."""
    sa, sb = stats(a), stats(b)
    assert sorted(sa) == sorted(sb) == list(range(1, STEPS["train_iters"] + 1))
    for i in sa:
        assert sa[i]["loss"] == pytest.approx(sb[i]["loss"], rel=rel), i
        assert sa[i]["grad_norm"] == pytest.approx(sb[i]["grad_norm"], rel=rel), i
    wa, wb = _weights(a, 6), _weights(b, 6)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_fsdp_chunked_loss_checkpointing_and_offload_train_as_without(tmp_path):
    _assert_same(_run(tmp_path / "levers", "fsdp", **LEVERS), _run(tmp_path / "base", "fsdp", **BASELINE))


def test_bmtrain_levers_and_compiled_layers_train_as_without(tmp_path):
    # BMTrain's own Block, checkpointing and AdamOffloadOptimizer run on the CPU backend around the compiled layers;
    # an untied head here (BMTrain gathers it as a DistributedLinear), the tied one in the fsdp test
    untied = tmp_path / "untied.json"
    untied.write_text(json.dumps({**TINY_MODEL, "tie_lm_head": False}))
    levers = _run(tmp_path / "levers", "bmtrain", compile=True, config=str(untied), **LEVERS)
    _assert_same(levers, _run(tmp_path / "base", "bmtrain", config=str(untied), **BASELINE), rel=1e-4, atol=1e-5)


def test_compiled_layers_train_as_eager_and_resume(tmp_path):
    # a compiled run killed after step 4 (last save: 3) and resumed compiled trains as the eager run does
    eager = _run(tmp_path / "eager", "fsdp")
    crashed = _run(tmp_path / "compiled", "fsdp", faults={"die_after": 4}, compile=True, save_iters=3)
    assert sorted(stats(crashed)) == [1, 2, 3, 4]
    _assert_same(_run(tmp_path / "compiled", "fsdp", compile=True, save_iters=3), eager, rel=1e-4, atol=1e-5)
