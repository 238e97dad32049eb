"""fm.train.lora: PEFT adapters on our models — exact trainable counts, only adapters train, PEFT-format
files that PEFT's own loaders put back, merge parity, and a dragonfly adapter served beside the Hugging
Face Llama export (muP residual scale folded into lora_B)."""

from __future__ import annotations

import json

import pytest
import torch

from fm.models.registry import build_model, load_model_config
from fm.train import lora

SPARK_TINY = "apps/spark_13b/model_configs/tiny.json"
DRAGONFLY_TINY = {
    "vocab_size": 8000, "dim_model": 64, "dim_ff": 96, "dim_head": 16, "num_heads": 4, "num_kv_heads": 2,
    "num_layers": 3, "activate_fn": "silu", "eps": 1e-5, "init_std": 0.1, "scale": True, "scale_emb": 12.0,
    "scale_depth": 1.4, "dim_model_base": 16, "tie_lm_head": True, "base": 10000.0, "max_length": 256,
    "dtype": "fp32",
}
ALL = ("q", "k", "v", "out", "fc0", "fc1", "fc2")


def _spark(repo_root, seed=0):
    cfg = load_model_config(str(repo_root / SPARK_TINY))
    torch.manual_seed(seed)
    return cfg, build_model(cfg, device="cpu", dtype=torch.float32).eval()


def _dragonfly(seed=0):
    cfg = load_model_config(DRAGONFLY_TINY, "dragonfly")
    torch.manual_seed(seed)
    return cfg, build_model(cfg, device="cpu", dtype=torch.float32).eval()


def _randomise_b(model, seed=1):
    """PEFT starts B at zero (adapter = identity); tests need a non-trivial adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(vocab, b=2, s=12, seed=3):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_trainable_counts_exact_and_only_adapters_train(repo_root):
    cfg, model = _spark(repo_root)
    base_total = sum(p.numel() for p in model.parameters())
    lc = lora.inject(model, lora.LoraSettings(r=4, alpha=8, targets=ALL))
    assert sorted(lc.target_modules) == ["fc0", "fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    d, f, r, L = cfg.dim_model, cfg.dim_ff, 4, cfg.num_layers
    hq = cfg.num_heads * cfg.dim_head
    per_layer = 4 * (r * d + hq * r) + 2 * (r * d + f * r) + (r * f + d * r)  # q,k,v,out + fc0,fc1 + fc2
    trainable, total = lora.count_parameters(model)
    assert trainable == L * per_layer == 39424
    assert total == base_total + trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(lora.is_lora_name(n) for n in names) and len(names) == L * 7 * 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        ids = _ids(cfg.vocab_size)
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # every adapter moved, no base weight did


def test_inject_on_meta_then_materialise_initialises_adapters(repo_root):
    cfg = load_model_config(str(repo_root / SPARK_TINY))
    meta = build_model(cfg, device="meta")
    lora.inject(meta, lora.LoraSettings(r=2, alpha=4, targets=("q", "v")))
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for layer in meta.encoder.layers:  # what an engine does, one layer at a time
        layer.init_weights()
    for name, p in meta.named_parameters():
        if ".lora_B." in name:
            assert torch.count_nonzero(p) == 0, name
        elif ".lora_A." in name:
            assert p.abs().max() < 1.0 and p.abs().max() > 0, name


def test_target_aliases_and_errors(repo_root):
    _, spark = _spark(repo_root)
    assert lora.resolve_targets(spark, ("q", "gate", "up", "down", "o")) == ["q_proj", "fc0", "fc1", "fc2", "out_proj"]
    assert lora.resolve_targets(spark, lora.parse_targets("q_proj|v_proj|k_proj")) == ["q_proj", "v_proj", "k_proj"]
    _, df = _dragonfly()
    assert lora.resolve_targets(df, ("q", "out", "gate", "up", "down")) == [
        "project_q", "attention_out", "w_in.w_0", "w_in.w_1", "w_out"]
    assert lora.resolve_targets(df, ("o_proj", "down_proj")) == ["attention_out", "w_out"]
    with pytest.raises(lora.LoraError, match="matches no linear layer"):
        lora.resolve_targets(spark, ("query",))
    with pytest.raises(lora.LoraError, match="lora_r"):
        lora.LoraSettings(r=0)


def _adapted(repo_root, targets=ALL):
    cfg, model = _spark(repo_root)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    lc = lora.inject(model, lora.LoraSettings(r=4, alpha=8, targets=targets))
    _randomise_b(model)
    return cfg, model.eval(), base_sd, lc


def test_peft_format_loads_with_peft_functions(repo_root, tmp_path):
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, model, base_sd, lc = _adapted(repo_root)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        want = model(ids)
    out = lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(model), lc)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert "base_model.model.encoder.layers.0.self_attention.q_proj.lora_A.weight" in keys
    assert len(keys) == cfg.num_layers * 7 * 2

    # 1. PeftModel.from_pretrained on a freshly built base model
    _, fresh = _spark(repo_root, seed=5)
    fresh.load_state_dict(base_sd)
    pm = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids), want, rtol=0, atol=1e-6)

    # 2. inject_adapter_in_model + set_peft_model_state_dict(load_file(...))
    _, fresh2 = _spark(repo_root, seed=6)
    fresh2.load_state_dict(base_sd)
    conf = LoraConfig(**{k: v for k, v in json.loads((out / "adapter_config.json").read_text()).items()
                         if k in ("r", "lora_alpha", "target_modules", "lora_dropout")})
    inject_adapter_in_model(conf, fresh2)
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    res = set_peft_model_state_dict(fresh2, sd)
    assert not res.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh2.eval()(ids), want, rtol=0, atol=1e-6)


def test_merge_parity_and_cli(repo_root, tmp_path):
    import importlib.util

    cfg, model, base_sd, lc = _adapted(repo_root)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        want = model(ids)
    adir = lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(model), lc)
    torch.save(base_sd, tmp_path / "base.pt")
    spec = importlib.util.spec_from_file_location("merge_lora", repo_root / "apps/spark_13b/merge_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--base", str(tmp_path / "base.pt"), "--lora", str(adir), "--output", str(tmp_path / "m.pt")]) == 0
    merged = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(merged) == set(base_sd)
    _, plain = _spark(repo_root, seed=9)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids), want, rtol=1e-5, atol=1e-5)
    # the rule, on one weight: W + B @ A * alpha / r
    a = model.encoder.layers[1].mlp.fc2.lora_A["default"].weight
    b = model.encoder.layers[1].mlp.fc2.lora_B["default"].weight
    k = "encoder.layers.1.mlp.fc2.weight"
    torch.testing.assert_close(merged[k], base_sd[k] + (b @ a) * 8 / 4, rtol=0, atol=1e-6)
    # errors name the problem
    bad = ["--base", str(tmp_path / "base.pt"), "--lora", str(tmp_path), "--output", str(tmp_path / "x.pt")]
    assert mod.main(bad) == 2


def test_merged_weights_carry_their_tokenizer(repo_root, tmp_path, tokenizer_path):
    """fm lora merge writes <stem>.tokenizer.model beside the .pt, which the opener finds (no --tokenizer)."""
    import shutil

    from fm.checkpoint.open import open_checkpoint

    cfg, model, base_sd, lc = _adapted(repo_root)
    adir = lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(model), lc)
    (tmp_path / "base").mkdir()
    torch.save(base_sd, tmp_path / "base" / "base.pt")
    shutil.copyfile(tokenizer_path, tmp_path / "base" / "tokenizer.model")
    (tmp_path / "out").mkdir()
    lora.merge_adapter(adir, base=tmp_path / "base" / "base.pt", output=tmp_path / "out" / "merged.pt")
    beside = tmp_path / "out" / "merged.tokenizer.model"
    assert beside.read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()
    assert open_checkpoint(tmp_path / "out" / "merged.pt").tokenizer == beside


def test_dragonfly_adapter_on_hf_llama_export(tmp_path, tokenizer_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from fm.export.hf import export_checkpoint

    cfg, model = _dragonfly()
    ckpt = tmp_path / "ckpt" / "10"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "fm9g_live_checkpoint-10.pt")
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf_dir = export_checkpoint(ckpt, tmp_path / "hf", tokenizer=tokenizer_path)

    lc = lora.inject(model, lora.LoraSettings(r=4, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")))
    _randomise_b(model, seed=4)
    model.eval()
    adir = lora.save_adapter(tmp_path / "adapter", lora.adapter_state_dict(model), lc)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    assert lora.main(["export-hf", "--adapter", str(adir), "--config", str(tmp_path / "model.json"), "--output",
                      str(tmp_path / "hf_adapter"), "--base-model", str(hf_dir)]) == 0
    hf_adapter = tmp_path / "hf_adapter"
    hf_cfg = json.loads((hf_adapter / "adapter_config.json").read_text())
    assert sorted(hf_cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    ids = _ids(cfg.vocab_size, s=10)
    with torch.no_grad():
        want = model(ids)
        hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        base_logits = hf(ids).logits
        pm = PeftModel.from_pretrained(hf, str(hf_adapter)).eval()
        got = pm(ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dragonfly_lora_through_the_trainer(tmp_path, tokenizer_path, caplog):
    """Same trainer, other family: adapters on dragonfly's module names, base from load_model."""
    import logging

    from fm.train.config import load_config
    from fm.train.trainer import run

    cfg, model = _dragonfly(seed=2)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(model.state_dict(), tmp_path / "base.pt")
    idx = tmp_path / "idx"
    idx.mkdir()
    lines = [json.dumps({"input": f"question {i}", "output": f"answer {i} " * 3}) + "\n" for i in range(20)]
    (idx / "data.jsonl").write_text("".join(lines))
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    (idx / "index").write_text("\n".join(map(str, offsets)) + "\n")
    (tmp_path / "mix.json").write_text(json.dumps([{"task_name": "t", "abs_weight": 1.0, "path": str(idx)}]))
    train = load_config(None, {
        "model_unique": "df", "config": str(tmp_path / "model.json"), "dataset_config": str(tmp_path / "mix.json"),
        "tokenizer_path": tokenizer_path, "engine": "fsdp", "dtype": "fp32", "max_length": 64, "batch_size": 2,
        "train_iters": 8, "save_iters": 8, "lr": 2e-2, "lr_scheduler": "constant", "warmup_iters": 0,
        "inspect_iters": 0, "save": str(tmp_path / "ckpt"), "tensorboard": "", "lora": True, "lora_r": 2,
        "lora_alpha": 4.0, "lora_targets": "q,v,o,down", "load_model": str(tmp_path / "base.pt")})
    with caplog.at_level(logging.INFO):
        assert run(train) == 0
    d, r, L = cfg.dim_model, 2, cfg.num_layers
    hq, hkv = cfg.num_heads * cfg.dim_head, cfg.num_kv_heads * cfg.dim_head
    n = L * ((r * d + hq * r) + (r * d + hkv * r) + (r * hq + d * r) + (r * cfg.dim_ff + d * r))
    assert f"trainable params: {n:,} ||" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "ckpt/df/train_stats.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < losses[0]
    conf, state = lora.load_adapter(tmp_path / "ckpt/df/8")
    assert sorted(conf["target_modules"]) == ["attention_out", "project_q", "project_v", "w_out"]
    assert "base_model.model.encoder.layers.2.ffn.ffn.w_out.lora_B.weight" in state
