"""z-loss and the in-loop downstream evaluation on both engines, 2 processes under torchrun: fsdp (gloo) with the head
and loss in chunks, bmtrain (BMTrain's own code on the CPU backend) with the full logits (``loss_chunk`` 0: the
engine's loss and ``Engine.z_loss``).

The two runs train alike with ``optim.z_loss`` (the same cross-entropy and z-loss per step), and each one's in-loop
accuracy, scored by two ranks sharing the questions (an odd number of them), is what ``fm eval`` gives on the
run's checkpoint of that step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import downstream_rows, fm_eval_mc, launch, make_benchmarks, make_run, stats

COEF = 1e-3


def _run(tmp: Path, engine: str, ceval: Path, mmlu: Path, loss_chunk: int) -> Path:
    cfg = make_run(tmp, repeat=True, engine=engine, train_iters=4, save_iters=2, loss_chunk=loss_chunk,
                   tensorboard="", optim={"z_loss": COEF},
                   eval={"downstream_interval": 2, "downstream_limit": 2, "downstream_batch_size": 2,
                         "ceval_dir": str(ceval), "mmlu_dir": str(mmlu)})
    rc, out = launch(cfg, bmtrain_cpu=engine == "bmtrain")
    assert rc == 0, out[-4000:]
    return tmp / "ckpt" / "run"


def test_z_loss_and_downstream_eval_on_both_engines(tmp_path):
    ceval, mmlu = make_benchmarks(tmp_path / "bench")
    runs = {"fsdp": _run(tmp_path / "fsdp", "fsdp", ceval, mmlu, 16), "bmtrain": _run(tmp_path / "bmt", "bmtrain",
                                                                                          ceval, mmlu, 0)}
    a, b = stats(runs["fsdp"]), stats(runs["bmtrain"])
    for i in range(1, 5):
        assert a[i]["z_loss"] > 0 and math.isfinite(a[i]["z_loss"]), a[i]
        assert a[i]["z_loss"] == pytest.approx(b[i]["z_loss"], rel=1e-4), i
        assert a[i]["loss"] == pytest.approx(b[i]["loss"], rel=1e-4), i
    # PaLM's term at this init: coef * logsumexp^2, with logsumexp near log(vocabulary) for small logits
    assert a[1]["z_loss"] / COEF == pytest.approx(math.log(8000) ** 2, rel=0.5)
    for engine, rd in runs.items():
        rows = downstream_rows(rd)
        assert [r["iter"] for r in rows] == [2, 4], engine
        for row in rows:
            ref = fm_eval_mc(rd / str(row["iter"]), ceval, mmlu, limit=2)
            for task in ("ceval", "mmlu"):
                got = row["downstream"][task]
                assert got["total"] == ref[task]["total"] == 5, engine
                assert (got["correct"], got["accuracy"], got["macro_accuracy"]) == (
                    ref[task]["correct"], ref[task]["micro_accuracy"], ref[task]["macro_accuracy"]), (engine, task)
