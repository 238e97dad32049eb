"""Spark Megatron-DeepSpeed importer: synthetic TP=1/2/4 checkpoints written the way Megatron lays
them out (per-shard [Wq; Wk; Wv], interleaved gate/up rows, vocab padding) import back exactly."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fm.export.spark_import import SparkImportError, import_megatron, main
from fm.models.registry import build_model, load_model_config

SPARK = {"vocab_size": 1000, "dim_model": 64, "dim_ff": 96, "dim_head": 16, "num_heads": 4, "num_kv_heads": 4,
         "num_layers": 2, "sliding_window": 8, "init_std": 0.3, "dtype": "fp32"}
PADDED_VOCAB = 1024  # Megatron pads the vocabulary to a multiple of 128·TP


def _model(seed=0, **overrides):
    cfg = load_model_config({**SPARK, **overrides}, "spark")
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.uniform_(-1.0 if name.endswith("bias") else 0.5, 1.5)
    return cfg, model


def megatron_shards(state, cfg, tp):
    """Our spark state dict → ``tp`` Megatron ``language_model`` dicts (flat encoder keys)."""
    g = torch.Generator().manual_seed(tp)
    emb = state["input_embedding.weight"]
    emb = torch.cat([emb, torch.randn(PADDED_VOCAB - emb.shape[0], emb.shape[1], generator=g)])
    shards = [{"embedding": {"word_embeddings": {"weight": e.clone()}}, "encoder": {}} for e in emb.chunk(tp)]
    if "lm_head.weight" in state:  # untied: Megatron's vocab-parallel output_layer
        head = state["lm_head.weight"]
        head = torch.cat([head, torch.randn(PADDED_VOCAB - head.shape[0], head.shape[1], generator=g)])
        for r, h in enumerate(head.chunk(tp)):
            shards[r]["output_layer"] = {"weight": h.clone()}
    for r in range(tp):
        enc = shards[r]["encoder"]
        enc["final_layernorm.weight"] = state["encoder.output_layernorm.weight"].clone()
        enc["final_layernorm.bias"] = state["encoder.output_layernorm.bias"].clone()
    for i in range(cfg.num_layers):
        ours = f"encoder.layers.{i}."
        meg = f"layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (state[f"{ours}self_attention.{n}_proj.{kind}"].chunk(tp) for n in "qkv")
            gate = state[f"{ours}mlp.fc0.{kind}"].chunk(tp)
            up = state[f"{ours}mlp.fc1.{kind}"].chunk(tp)
            for r in range(tp):
                enc = shards[r]["encoder"]
                enc[f"{meg}self_attention.query_key_value.{kind}"] = torch.cat([q[r], k[r], v[r]])
                inter = torch.stack([gate[r], up[r]], dim=1)  # rows: g0, u0, g1, u1, …
                enc[f"{meg}mlp.dense_h_to_4h.{kind}"] = inter.reshape(-1, *gate[r].shape[1:])
        o = state[f"{ours}self_attention.out_proj.weight"].chunk(tp, dim=1)
        down = state[f"{ours}mlp.fc2.weight"].chunk(tp, dim=1)
        for r in range(tp):
            enc = shards[r]["encoder"]
            enc[f"{meg}self_attention.dense.weight"] = o[r].clone()
            enc[f"{meg}mlp.dense_4h_to_h.weight"] = down[r].clone()
            enc[f"{meg}self_attention.dense.bias"] = state[f"{ours}self_attention.out_proj.bias"].clone()
            enc[f"{meg}mlp.dense_4h_to_h.bias"] = state[f"{ours}mlp.fc2.bias"].clone()
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for kind in ("weight", "bias"):
                    enc[f"{meg}{norm}.{kind}"] = state[f"{ours}{norm}.{kind}"].clone()
    return shards


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_megatron(directory, shards, layout="nested"):
    directory.mkdir(parents=True, exist_ok=True)
    for r, lm in enumerate(shards):
        if layout == "nested":  # DeepSpeed: {'module': {'language_model': {...}}, 'args': Namespace, …}
            obj = {"module": {"language_model": lm}, "args": argparse.Namespace(tensor_model_parallel_size=len(shards)),
                   "iteration": 100, "mp_world_size": len(shards)}
        else:  # flat dotted keys
            obj = {"model": _flat({"language_model": lm})}
        torch.save(obj, directory / f"mp_rank_{r:02d}_model_states.pt")


@pytest.mark.parametrize("tp,layout", [(1, "nested"), (2, "flat"), (4, "nested")])
def test_import_tp_shards_reproduces_model(tmp_path, tp, layout):
    cfg, model = _model(seed=tp)
    write_megatron(tmp_path / "ckpt", megatron_shards(model.state_dict(), cfg, tp), layout)
    state = import_megatron(tmp_path / "ckpt", cfg)
    orig = model.state_dict()
    assert set(state) == set(orig)
    for k in orig:
        assert torch.equal(state[k], orig[k]), k
    fresh = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_cli_with_deepspeed_step_folder(tmp_path):
    cfg, model = _model(seed=9)
    root = tmp_path / "release"
    write_megatron(root / "global_step1000", megatron_shards(model.state_dict(), cfg, 2))
    (root / "latest").write_text("global_step1000\n")
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(SPARK))
    out = tmp_path / "spark.pt"
    assert main(["--megatron-dir", str(root), "--config", str(cfg_path), "--output", str(out),
                  "--dtype", "bf16"]) == 0
    state = torch.load(out, weights_only=True)
    assert state["input_embedding.weight"].dtype == torch.bfloat16
    assert torch.equal(state["encoder.layers.1.mlp.fc1.weight"],
                       model.state_dict()["encoder.layers.1.mlp.fc1.weight"].to(torch.bfloat16))


def test_missing_keys_and_shards_are_named(tmp_path):
    cfg, model = _model()
    shards = megatron_shards(model.state_dict(), cfg, 2)
    del shards[1]["encoder"]["layers.1.mlp.dense_4h_to_h.bias"]
    write_megatron(tmp_path / "a", shards)
    with pytest.raises(SparkImportError, match=r"encoder\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        import_megatron(tmp_path / "a", cfg)
    write_megatron(tmp_path / "b", megatron_shards(model.state_dict(), cfg, 2))
    (tmp_path / "b" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(SparkImportError, match="missing"):
        import_megatron(tmp_path / "b", cfg)
    with pytest.raises(SparkImportError, match="no mp_rank_XX_model_states.pt"):
        import_megatron(tmp_path, cfg)
    shards = megatron_shards(model.state_dict(), cfg, 2)
    shards[1]["encoder"]["layers.0.input_layernorm.bias"] += 1
    write_megatron(tmp_path / "c", shards)
    with pytest.raises(SparkImportError, match="replicated"):
        import_megatron(tmp_path / "c", cfg)


def test_untied_output_layer(tmp_path):
    cfg, model = _model(seed=3, tie_lm_head=False)
    shards = megatron_shards(model.state_dict(), cfg, 2)
    write_megatron(tmp_path / "u", shards)
    state = import_megatron(tmp_path / "u", cfg)
    assert torch.equal(state["lm_head.weight"], model.state_dict()["lm_head.weight"])
    fresh = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    fresh.load_state_dict(state, strict=True)
    for shard in shards:
        del shard["output_layer"]
    write_megatron(tmp_path / "t", shards)
    with pytest.raises(SparkImportError, match="output_layer"):
        import_megatron(tmp_path / "t", cfg)
