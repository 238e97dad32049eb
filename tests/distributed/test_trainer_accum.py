"""grad_accum=4 with batch b gives the same gradient as one batch of 4b (loss normalised by the
step's total target tokens); a single process (FSDP2 world of one on gloo), in-process."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fm.data.loader import build_train_loader
from fm.tokenizer import Tokenizer
from fm.train.config import load_config
from fm.train.trainer import Trainer
from tests.helpers import ROOT, TINY_MODEL, make_run


def split_rows(batch: dict, a: int, b: int) -> dict:
    """Rows [a, b) of a packed batch, with cu_seqlens re-based (every row end is a boundary)."""
    L = batch["inputs"].shape[1]
    cu = batch["cu_seqlens"]
    keep = cu[(cu >= a * L) & (cu <= b * L)] - a * L
    out = {k: batch[k][a:b] for k in ("inputs", "targets", "task_ids", "position_ids", "lengths")}
    out.update(cu_seqlens=keep.to(torch.int32), max_seqlen=batch["max_seqlen"],
               num_tokens=int(batch["lengths"][a:b].sum()), num_targets=int((out["targets"] != -100).sum()),
               task_names=batch["task_names"])
    return out


def test_grad_accum_equals_big_batch(tmp_path):
    cfg_path = make_run(tmp_path, repeat=True, batch_size=8, clip_grad=0.0)
    cfg = load_config(cfg_path)
    tr = Trainer(cfg)
    tr.setup_engine()
    try:
        tr.build_model()
        loader = build_train_loader(cfg.data.mixture, Tokenizer(cfg.data.tokenizer), batch_size=8, max_length=64,
                                    seed=1)
        big = next(iter(loader))
        tr.loader = SimpleNamespace(task_names=loader.task_names)
        grads, norms = [], []

        def capture():
            grads.append({n: p.grad.full_tensor().clone() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                          for n, p in tr.model.named_parameters()})

        tr.engine.optimizer_step = capture  # compare gradients, not Adam updates
        s1 = tr.run_step([split_rows(big, 2 * i, 2 * i + 2) for i in range(4)])
        s2 = tr.run_step([big])
        norms = [s1["grad_norm"], s2["grad_norm"]]
    finally:
        tr.engine.shutdown()
    assert len(grads) == 2
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert math.isclose(norms[0], norms[1], rel_tol=1e-5)
    assert math.isclose(s1["loss"], s2["loss"], rel_tol=1e-6)
    assert s1["target_tokens"] == s2["target_tokens"] == int((big["targets"] != -100).sum())
    assert s1["task_loss"].keys() == s2["task_loss"].keys()
    for k in s1["task_loss"]:
        assert math.isclose(s1["task_loss"][k], s2["task_loss"][k], rel_tol=1e-5)


def test_model_config_is_the_tiny_one():
    # Guard: the shared tiny model used by the trainer tests stays tiny (fast tests).
    assert TINY_MODEL["dim_model"] <= 64 and TINY_MODEL["num_layers"] <= 2
    tiny = json.loads((ROOT / "apps" / "fm9g_2b" / "train_configs" / "tiny.json").read_text())
    assert tiny["engine"]["name"] == "fsdp"


@pytest.mark.parametrize("bad", [{"grad_accum": 0}, {"batch_size": 0}])
def test_bad_shapes_rejected(bad):
    from fm.train.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, bad)


def test_only_run_dataloader_reports_throughput(tmp_path, caplog):
    import logging

    from fm.train.trainer import run

    cfg = load_config(make_run(tmp_path, repeat=True), {"only_run_dataloader": True, "train_iters": 5,
                                                        "grad_accum": 2})
    with caplog.at_level(logging.INFO, logger="fm.train"):
        assert run(cfg) == 0
    assert "only_run_dataloader: 10 batches" in caplog.text
    assert not (tmp_path / "ckpt" / "run").exists()  # nothing trained, nothing saved


def test_resume_no_optimze_rewarms_and_only_load_model_restarts(tmp_path):
    from fm.train.trainer import run
    from tests.helpers import stats

    path = make_run(tmp_path, repeat=True, train_iters=4, save_iters=2, warmup_iters=0, lr_scheduler="constant",
                    lr=0.01)
    assert run(load_config(path)) == 0
    rd = tmp_path / "ckpt" / "run"
    assert run(load_config(path, {"resume_ckpt": "2", "train_iters": 5, "resume_no_optimze": 2})) == 0
    s = stats(rd)
    assert [s[i]["lr"] for i in (3, 4, 5)] == pytest.approx([0.005, 0.01, 0.01])
    assert run(load_config(path, {"resume_ckpt": str(rd / "4"), "only_load_model": True, "model_unique": "ft",
                                  "train_iters": 1})) == 0
    ft = stats(tmp_path / "ckpt" / "ft")
    assert sorted(ft) == [1]  # the step counter restarted
