"""Validation loss during training (``eval_dataset_config``, ``eval_iters``, ``eval_interval``).

In-process runs (FSDP2 world of one on gloo, tiny dragonfly) check the schedule of evaluations, the
tensorboard tags and jsonl rows, determinism (the same loss when the final weights are evaluated again
after a resume), that validation leaves training untouched, and ``eos_token`` on the validation data;
one 2-process torchrun checks the loss all-reduced over ranks. Both compare the logged loss with plain
token-weighted cross-entropy of the saved model file over the same ``fixed_batches``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fm.eval.validation import fixed_batches
from fm.tokenizer import Tokenizer
from fm.train.config import ConfigError, load_config
from fm.train.trainer import Trainer, run
from tests.helpers import ROOT, launch, make_run, records, stats, write_index

TOKENIZER = str(ROOT / "quick_start" / "tokenizer.model")


def with_valid_data(tmp: Path, **train) -> Path:
    """``make_run`` plus a held-out two-task mixture (other lines than the training data)."""
    write_index(tmp / "valid" / "a", records("va", 40, 11))
    write_index(tmp / "valid" / "b", records("vb", 30, 12, instr=True))
    mix = tmp / "valid" / "mix.json"
    mix.write_text(json.dumps([{"task_name": "a", "abs_weight": 1.0, "path": "a"},
                               {"task_name": "b", "abs_weight": 1.0, "path": "b"}]))
    train = {"eval_dataset_config": str(mix), "eval_iters": 2, "eval_interval": 2, "train_iters": 4, "save_iters": 4,
             **train}
    return make_run(tmp, repeat=True, **train)


def valid_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "train_stats.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == "valid"]


def direct_loss(tmp: Path, step: int, world_size: int) -> dict[str, tuple[float, int]]:
    """(loss, tokens) overall ("") and per task: the checkpoint's model file in a fresh dragonfly, plain
    cross-entropy summed over every rank's fixed batches."""
    from fm.models.registry import build_model, load_model_config

    cfg = load_config(tmp / "train.json")
    model = build_model(load_model_config(str(tmp / "model.json")))
    sd = torch.load(tmp / "ckpt" / "run" / str(step) / f"fm9g_live_checkpoint-{step}.pt", weights_only=True)
    model.load_state_dict(sd, strict=True)
    model.eval()
    tok = Tokenizer(TOKENIZER)
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for rank in range(world_size):
            for b in fixed_batches(cfg.eval.mixture, tok, batch_size=cfg.data.batch_size,
                                   max_length=cfg.data.max_length, n_batches=cfg.eval.iters, rank=rank,
                                   world_size=world_size, seed=cfg.run.seed):
                logits = model(b["inputs"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
                               max_seqlen=b["max_seqlen"])
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), b["targets"].reshape(-1),
                                     ignore_index=-100, reduction="none")
                tid, valid = b["task_ids"].reshape(-1), b["targets"].reshape(-1) != -100
                for i, name in enumerate(["", *b["task_names"]]):
                    m = valid if not name else valid & (tid == i - 1)
                    acc = sums.setdefault(name, [0.0, 0])
                    acc[0] += float(ce[m].sum())
                    acc[1] += int(m.sum())
    return {k: (s / n, n) for k, (s, n) in sums.items()}


def scalars(tb_dir: Path) -> dict[str, dict[int, list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            out.setdefault(tag, {}).setdefault(ev.step, []).append(ev.value)
    return out


# ------------------------------------------------------------------------------------------------ tests
def test_validation_in_process_logged_deterministic_and_exact(tmp_path):
    path = with_valid_data(tmp_path / "v")
    assert run(load_config(path)) == 0
    rd = tmp_path / "v" / "ckpt" / "run"
    rows = valid_rows(rd)
    assert [r["iter"] for r in rows] == [2, 4]  # every eval_interval steps; the end (4) only once
    # Resume at train_iters: no step, one more evaluation of the same final weights, bit-identical.
    assert run(load_config(path)) == 0
    rows = valid_rows(rd)
    assert [r["iter"] for r in rows] == [2, 4, 4]
    assert rows[2]["valid_loss"] == rows[1]["valid_loss"] and rows[2]["valid_task_loss"] == rows[1]["valid_task_loss"]
    assert rows[1]["valid_loss"] != rows[0]["valid_loss"]  # the weights did change between 2 and 4

    # Logged value == plain cross-entropy of the saved model over the same batches.
    ref = direct_loss(tmp_path / "v", 4, world_size=1)
    last = rows[-1]
    assert last["valid_tokens"] == ref[""][1]
    assert math.isclose(last["valid_loss"], ref[""][0], rel_tol=0, abs_tol=1e-5)
    assert math.isclose(last["valid_ppl"], math.exp(ref[""][0]), rel_tol=1e-5)
    assert set(last["valid_task_loss"]) == {"a", "b"}
    for task in ("a", "b"):
        assert math.isclose(last["valid_task_loss"][task], ref[task][0], rel_tol=0, abs_tol=1e-5)

    tb = scalars(tmp_path / "v" / "tb" / "run")
    for tag in ("Loss/valid", "Loss/valid/a", "Loss/valid/b", "Perplexity/valid", "Perplexity/valid/a"):
        assert sorted(tb[tag]) == [2, 4], (tag, tb.get(tag))
    assert tb["Loss/valid"][4] == pytest.approx([ref[""][0]] * 2, abs=1e-5)
    assert tb["Loss/valid/b"][2][0] == pytest.approx(rows[0]["valid_task_loss"]["b"], rel=1e-6)

    # read_stats merges a validation row into its iteration's row (the loss curve plots both).
    from fm.train.metrics import read_stats

    merged = {r["iter"]: r for r in read_stats(rd / "train_stats.jsonl")}
    assert merged[2]["valid_loss"] == rows[0]["valid_loss"] and "lr" in merged[2] and "loss" in merged[4]

    # Validation changes nothing in training: the same run without it has the same train losses.
    plain = make_run(tmp_path / "p", repeat=True, train_iters=4, save_iters=4)
    assert run(load_config(plain)) == 0
    assert [merged[i]["loss"] for i in range(1, 5)] == [stats(tmp_path / "p" / "ckpt" / "run")[i]["loss"]
                                                      for i in range(1, 5)]


def test_two_processes_all_reduce_the_validation_loss(tmp_path):
    path = with_valid_data(tmp_path, train_iters=2, save_iters=2, warmup_iters=1, eval_interval=1, eval_iters=1)
    rc, out = launch(path)
    assert rc == 0, out
    assert "valid at iter      2 | loss" in out
    rows = valid_rows(tmp_path / "ckpt" / "run")
    assert [r["iter"] for r in rows] == [1, 2]
    ref = direct_loss(tmp_path, 2, world_size=2)  # both ranks' batches
    assert rows[-1]["valid_tokens"] == ref[""][1]
    assert math.isclose(rows[-1]["valid_loss"], ref[""][0], rel_tol=0, abs_tol=1e-5)
    for task in ("a", "b"):
        assert math.isclose(rows[-1]["valid_task_loss"][task], ref[task][0], rel_tol=0, abs_tol=1e-5)
    tb = scalars(tmp_path / "tb" / "run")
    assert sorted(tb["Loss/valid"]) == [1, 2] and sorted(tb["Loss/valid/a"]) == [1, 2]


def test_eos_token_applies_to_validation_batches(tmp_path):
    cfg = load_config(with_valid_data(tmp_path, eos_token="<end>"))
    tr = Trainer(cfg)
    tr.setup_engine()
    try:
        tr.build_loader()
        tr.validation.setup(tr)
    finally:
        tr.engine.shutdown()
    end = Tokenizer(TOKENIZER).piece_to_id("<end>")
    targets = torch.cat([b["targets"].reshape(-1) for b in tr.validation.batches])
    assert len(tr.validation.batches) == 2 and tr.validation.tasks == ["a", "b"]
    assert (targets == end).any() and not (targets == 2).any()  # "<end>" instead of the tokenizer's </s>


@pytest.mark.parametrize(("bad", "key"), [({"eval_interval": 5}, "eval.mixture"),
                                          ({"eval_iters": 0}, "eval_iters"),
                                          ({"eval_interval": -1}, "eval_interval")])
def test_bad_validation_keys_rejected(bad, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, bad)
    assert key in str(e.value)


def test_validation_off_by_default():
    cfg = load_config(None)
    assert (cfg.eval.mixture, cfg.eval.iters, cfg.eval.interval) == ("", 10, 0)
