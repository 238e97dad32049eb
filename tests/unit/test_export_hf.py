"""Hugging Face export/import of dragonfly: stock transformers reproduces our logits (unpacked and
packed), greedy generation, and import(export(x)) == x."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fm.export.hf import export_checkpoint, import_hf, main
from fm.generate import generate
from fm.models.registry import build_model, load_model_config

TINY = {
    "vocab_size": 8000, "dim_model": 64, "dim_ff": 96, "dim_head": 16, "num_heads": 4, "num_kv_heads": 2,
    "num_layers": 3, "activate_fn": "silu", "eps": 1e-5, "init_std": 0.1, "scale": True, "scale_emb": 12.0,
    "scale_depth": 1.4, "dim_model_base": 16, "tie_lm_head": True, "base": 10000.0, "qkv_bias": False,
    "qk_norm": False, "max_length": 256, "dtype": "fp32",
}


def _model(overrides=None, seed=0):
    cfg = load_model_config({**TINY, **(overrides or {})}, "dragonfly")
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model


def _write_checkpoint(tmp_path, cfg, model, step=10):
    ckpt = tmp_path / "ckpt" / str(step)
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / f"fm9g_live_checkpoint-{step}.pt")
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    return ckpt


def _hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("export")
    cfg, model = _model()
    ckpt = _write_checkpoint(tmp, cfg, model)
    out = export_checkpoint(ckpt, tmp / "hf", tokenizer=tokenizer_path)
    return cfg, model, ckpt, out


def test_export_files_and_config(exported):
    cfg, _, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json", "tokenizer.json"} <= names
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"] is False
    assert hf_cfg["num_key_value_heads"] == 2 and hf_cfg["rms_norm_eps"] == 1e-5
    assert hf_cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert hf_cfg["max_position_embeddings"] == cfg.max_length == 256  # the model config's context
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].startswith("{{ bos_token }}")
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_export_is_readable_by_others_as_the_umask_allows(exported, tmp_path):
    # a serving job under another uid reads the export: every file as a plain open() would create it (0644 under
    # umask 022), the weights included (safetensors alone creates them 0600), shards too
    from fm.io import umask

    *_, out = exported
    sharded = tmp_path / "hf"
    main(["--checkpoint", str(exported[2]), "--output", str(sharded), "--max-shard-size", "400KB"])
    files = [*out.iterdir(), *sharded.iterdir()]
    assert sum(p.name.endswith(".safetensors") for p in files) > 2
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask(), (f, oct(f.stat().st_mode))
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_hf_logits_match_unpacked(exported):
    _, model, _, out = exported
    hf = _hf(out)
    ids = torch.randint(0, 8000, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).float()
        ref = hf(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a trivially small comparison


def test_hf_logits_match_packed(exported):
    _, model, _, out = exported
    hf = _hf(out)
    lens = [5, 9, 3, 7]
    ids = torch.randint(0, 8000, (1, sum(lens)), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        ours = model(ids, cu_seqlens=cu, max_seqlen=max(lens))[0].float()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref = hf(input_ids=ids[:, a:b]).logits[0].float()
            torch.testing.assert_close(ours[a:b], ref, rtol=0, atol=1e-4)


def test_hf_greedy_generation_matches(exported):
    _, model, _, out = exported
    hf = _hf(out)
    prompts = [[1, 500, 42, 7000, 13], [1, 88], [1, 3000, 3001, 3002, 3003, 17, 99, 5]]
    ours = generate(model, prompts, max_new_tokens=12, stop_token_ids=(2,))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=12, eos_token_id=2, pad_token_id=3)
        ref_new = [t for t in ref[0, len(prompt):].tolist()]
        if 2 in ref_new:
            ref_new = ref_new[:ref_new.index(2)]
        assert got == ref_new


def test_tokenizer_loads_in_transformers(exported, tokenizer):
    _, _, _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ["Hello world. 你好，世界！", "  two spaces\nnew line <用户>hi<AI>"]:
        assert tok(text).input_ids == tokenizer.encode(text, bos=True)
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_import_of_export_is_identity(exported, tmp_path):
    cfg, model, _, out = exported
    pt, cfg_json = import_hf(out, tmp_path / "back.pt")
    state = torch.load(pt, weights_only=True)
    orig = model.state_dict()
    assert set(state) == set(orig)
    for k in orig:
        torch.testing.assert_close(state[k], orig[k], rtol=1e-6, atol=0)
    assert json.loads(cfg_json.read_text()) == cfg.to_dict()


def test_plain_llama_imports_without_mup(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    hf_cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "llama"))
    pt, cfg_json = main(["import", "--hf-dir", str(tmp_path / "llama"), "--output", str(tmp_path / "x.pt")]) or (
        tmp_path / "x.pt", tmp_path / "x.json")
    cfg = load_model_config(str(cfg_json), "dragonfly")
    assert cfg.scale is False and cfg.num_kv_heads == 1 and cfg.base == 5000.0 and cfg.eps == 1e-6
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    model.load_state_dict(torch.load(pt, weights_only=True), strict=True)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), hf(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_sharded_export_and_cli(tmp_path, tokenizer_path):
    cfg, model = _model({"tie_lm_head": False, "qkv_bias": True}, seed=5)
    ckpt = _write_checkpoint(tmp_path, cfg, model, step=3)
    pt = ckpt / "fm9g_live_checkpoint-3.pt"
    out = tmp_path / "hf"
    assert main(["--checkpoint", str(pt), "--output", str(out), "--config", str(ckpt / "config.json"),
                 "--max-shard-size", "400KB", "--tokenizer", tokenizer_path]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = _hf(out)
    ids = torch.randint(0, 8000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), hf(input_ids=ids).logits, rtol=0, atol=1e-4)
    with pytest.raises(FileExistsError):
        export_checkpoint(ckpt, out)
    export_checkpoint(ckpt, out, overwrite=True, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_errors_name_the_fix(tmp_path):
    cfg, model = _model()
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "fm9g_live_checkpoint-1.pt")
    from fm.checkpoint.open import CheckpointFormError

    with pytest.raises(CheckpointFormError, match="give it with --config"):
        export_checkpoint(ckpt, tmp_path / "o")
    (ckpt / "config.json").write_text(json.dumps({**TINY, "num_layers": 4}))
    with pytest.raises(KeyError, match="num_layers"):
        export_checkpoint(ckpt, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_trainer_checkpoint_directory(tmp_path, tokenizer_path):
    """Our trainer's layout: config.json is the train config naming the model config ("tiny")."""
    import shutil

    cfg = load_model_config("tiny", "dragonfly")
    torch.manual_seed(4)
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    step_dir = tmp_path / "data" / "checkpoints" / "run" / "20"
    step_dir.mkdir(parents=True)
    torch.save(model.state_dict(), step_dir / "fm9g_live_checkpoint-20.pt")
    (step_dir / "config.json").write_text(json.dumps({"model_unique": "run", "config": "tiny", "lr": 0.01}))
    shutil.copyfile(tokenizer_path, step_dir / "tokenizer.model")
    out = export_checkpoint(step_dir, tmp_path / "hf")
    assert (out / "tokenizer.model").is_file()
    ids = torch.randint(0, 8000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), _hf(out)(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_bf16_round_trip(tmp_path):
    cfg, model = _model(seed=6)
    ckpt = _write_checkpoint(tmp_path, cfg, model.to(torch.bfloat16), step=2)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    pt, _ = import_hf(out, tmp_path / "back.pt")
    state = torch.load(pt, weights_only=True)
    for k, v in model.state_dict().items():
        assert state[k].dtype == torch.bfloat16
        torch.testing.assert_close(state[k], v, rtol=2e-2, atol=0)


def test_exported_context_is_what_the_model_was_trained_for():
    from fm.train.trainer import checkpoint_model_config

    cfg = load_model_config("2.4b", "dragonfly")
    assert cfg.max_length == 8192  # upstream dragonfly's default, when the config does not say
    assert checkpoint_model_config(cfg, 4096)["max_length"] == 8192
    short = load_model_config({**TINY, "max_length": 256}, "dragonfly")
    assert checkpoint_model_config(short, 1024)["max_length"] == 1024  # trained on longer rows than it declared
