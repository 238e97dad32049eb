"""Training from an imported open checkpoint on both engines: a tiny random Qwen3 (per-head q/k norm, bias-free,
head_dim ≠ hidden/heads) with Llama-3 rope scaling, ``fm import``-ed, then 3 steps under torchrun from
``load_model``, on fsdp and on the BMTrain CPU backend, to the same losses; the q/k norm weights train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import launch, make_run, stats


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fm.export.hf import import_hf

    tmp = tmp_path_factory.mktemp("qwen3")
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = Qwen3Config(vocab_size=8000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=rope,
                      initializer_range=0.1)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(str(tmp / "hf"))
    return import_hf(tmp / "hf", tmp / "qwen3.pt")


def test_imported_qwen3_trains_on_both_engines(imported, tmp_path):
    pt, model_json = imported
    start = torch.load(pt, weights_only=True)
    losses = {}
    for engine in ("fsdp", "bmtrain"):
        cfg = make_run(tmp_path / engine, repeat=True, engine=engine, train_iters=3, save_iters=3, warmup_iters=1,
                       config=str(model_json), load_model=str(pt))
        rc, out = launch(cfg, bmtrain_cpu=engine == "bmtrain")
        assert rc == 0, out[-4000:]
        rows = stats(tmp_path / engine / "ckpt" / "run")
        assert sorted(rows) == [1, 2, 3]
        losses[engine] = [rows[i]["loss"] for i in (1, 2, 3)]
        trained = torch.load(tmp_path / engine / "ckpt" / "run" / "3" / "fm9g_live_checkpoint-3.pt",
                             weights_only=True)
        assert set(trained) == set(start)
        key = "encoder.layers.0.self_att.self_attention.q_norm.weight"
        assert not torch.equal(trained[key].float(), start[key].float())  # the new parameters train
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses["bmtrain"] == pytest.approx(losses["fsdp"], rel=1e-5), losses
