"""The open checkpoint families: a tiny random transformers model of each (Llama-3 scaled rope with a tied head,
Qwen2, Qwen3 with head_dim ≠ hidden/heads, Mistral with a window shorter than the sequence, MiniCPM through
Llama + MiniCPM's three forward operations as hooks) imports with ``fm import``, gives transformers' logits
(unpacked and packed) and greedy generation, exports back to its own family that transformers loads with the
right class and the same logits; what fm cannot map is refused naming the file and the key, writing nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fm.export.hf import export_checkpoint, main
from fm.generate import generate
from fm.models.registry import build_model, load_model_config
from tests.support.hf_fixtures import IM_END, build_hf_tokenizer

SAMPLES = ["Hello, how are you? 你好，世界！", "def f(x):\n\treturn x  # 训练 2026"]

SHAPE = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # head_dim 8: every band occurs
FAMILIES = {  # name: (config class, model class, config keys)
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5, "head_dim": 8}),
}
MINICPM = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 8}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that any mismatch shows (transformers' init gives near-zero logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hf_model(name: str, seed: int = 0):
    cfg_cls, model_cls, keys = FAMILIES[name]
    config = getattr(transformers, cfg_cls)(**SHAPE, **keys)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model, seed)
    return model


def _import(hf_dir, out):
    assert main(["import", "--hf-dir", str(hf_dir), "--output", str(out)]) == 0
    cfg = load_model_config(str(out.with_suffix(".json")), "dragonfly")
    model = build_model(cfg, device="cpu", dtype=torch.float32).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    return cfg, model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param)
    hf.save_pretrained(str(tmp / "hf"))
    build_hf_tokenizer(tmp / "hf", vocab_size=SHAPE["vocab_size"])  # Qwen-style BPE, Chinese and English
    cfg, model = _import(tmp / "hf", tmp / "m.pt")
    return request.param, tmp, hf, cfg, model


def _ids(shape, seed):
    return torch.randint(4, SHAPE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def _assert_logits_match(model, hf_logits_of, packed: bool = True):
    ids = _ids((2, 17), 1)
    with torch.no_grad():
        ours = model(ids).float()
        torch.testing.assert_close(ours, hf_logits_of(ids), rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.5  # not a trivially small comparison
    if not packed:
        return
    lens = [5, 9, 3, 7]
    ids = _ids((1, sum(lens)), 2)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        ours = model(ids, cu_seqlens=cu, max_seqlen=max(lens))[0].float()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(ours[a:b], hf_logits_of(ids[:, a:b])[0], rtol=0, atol=1e-4)


def test_import_config_records_the_family(family):
    name, _, hf, cfg, _ = family
    assert cfg.hf_model_type == hf.config.model_type
    assert cfg.scale is False and cfg.num_kv_heads == 2 and cfg.eps == 1e-6
    expect = {"llama3_tied": dict(tie_lm_head=True, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                                  rope_original_max_length=64, dim_head=8),
              "qwen2": dict(qkv_bias=True, qk_norm=False, sliding_window=None, base=1e6),
              "qwen3": dict(qk_norm=True, qkv_bias=False, dim_head=16),
              "mistral": dict(sliding_window=5, qkv_bias=False)}[name]
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_logits_match_transformers(family):
    *_, hf, _, model = family
    _assert_logits_match(model, lambda ids: hf(input_ids=ids).logits.float())


def test_greedy_generation_matches_transformers(family):
    *_, hf, _, model = family
    prompts = [[1, 50, 42, 200, 13], [1, 88], [1, 30, 31, 32, 33, 17, 99, 5]]
    ours = generate(model, prompts, max_new_tokens=10, stop_token_ids=(2,))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=10, eos_token_id=2, pad_token_id=0)
        ref_new = ref[0, len(prompt):].tolist()
        assert got == (ref_new[:ref_new.index(2)] if 2 in ref_new else ref_new)


def test_hf_directory_opens_as_a_checkpoint_as_imported(family):
    # fm generate / fm eval / train's load_model take the Hugging Face directory itself through the same mapping
    from fm.checkpoint.open import open_checkpoint

    _, tmp, _, cfg, model = family
    ck = open_checkpoint(tmp / "hf")
    assert ck.model_config.to_dict() == cfg.to_dict()
    state = ck.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and set(state) == set(
        model.state_dict())
    assert open_checkpoint(tmp / "m.pt").tokenizer == tmp / "m.tokenizer"  # the copy fm import took along


def test_tokenizer_taken_along(family):
    _, tmp, *_ = family
    tok = tmp / "m.tokenizer"
    # generation_config.json too: its eos_token_id stop fm generate on the imported .pt
    assert sorted(p.name for p in tok.iterdir()) == ["generation_config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    for p in tok.iterdir():
        assert p.read_bytes() == (tmp / "hf" / p.name).read_bytes()


def test_export_goes_back_to_the_family(family, tmp_path):
    name, tmp, hf, cfg, model = family
    out = export_checkpoint(tmp / "m.pt", tmp_path / "out")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back) is type(hf)
    _assert_logits_match(model, lambda ids: back(input_ids=ids).logits.float(), packed=False)
    weights = load_file(str(out / "model.safetensors"))
    if name == "llama3_tied":  # tied as it came: one tensor, and the scaling where 4.x and 5.x read it
        assert hf_cfg["tie_word_embeddings"] is True and "lm_head.weight" not in weights
        assert hf_cfg["rope_scaling"]["rope_type"] == "llama3" and hf_cfg["rope_parameters"]["factor"] == 8.0
        assert back.config.rope_parameters["original_max_position_embeddings"] == 64
    if name == "qwen2":
        assert hf_cfg["use_sliding_window"] is False and hf_cfg["rope_theta"] == 1e6
    if name == "qwen3":
        assert hf_cfg["head_dim"] == 16 and "model.layers.1.self_attn.k_norm.weight" in weights
    if name == "mistral":
        assert hf_cfg["sliding_window"] == 5 and back.config.sliding_window == 5
    # the tokenizer files, as they were (and transformers reads them)
    assert (out / "tokenizer.json").read_bytes() == (tmp / "hf" / "tokenizer.json").read_bytes()
    tok, src = (transformers.AutoTokenizer.from_pretrained(str(d)) for d in (out, tmp / "hf"))
    for text in SAMPLES:  # the exported tokenizer encodes and decodes as the original
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == src(text, add_special_tokens=False).input_ids and tok.decode(ids) == text
    chat = [{"role": "user", "content": SAMPLES[0]}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == src.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (
        None, src.convert_tokens_to_ids(IM_END), src.pad_token_id)


def test_fm_generate_with_the_carried_tokenizer_and_its_chat_template(family, tmp_path):
    # fm generate on the imported .pt: its tokenizer (taken along by fm import) and its ChatML template
    # (--template auto) give the token ids and the greedy continuation transformers gives
    from fm.generate import main as generate_main

    _, tmp, hf, _, _ = family
    src = transformers.AutoTokenizer.from_pretrained(str(tmp / "hf"))
    out = tmp_path / "gen.jsonl"
    assert generate_main(["--checkpoint", str(tmp / "m.pt"), "--prompt", SAMPLES[0], "--template", "auto",
                          "--max-new-tokens", "6", "--dtype", "fp32", "--output", str(out)]) == 0
    got = json.loads(out.read_text().splitlines()[0])["generate"]
    prompt = src.apply_chat_template([{"role": "user", "content": SAMPLES[0]}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    eos = src.convert_tokens_to_ids(IM_END)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=src.pad_token_id)
    new = ref[0, len(prompt):].tolist()
    new = new[:new.index(eos)] if eos in new else new
    assert got == src.decode(new)


def test_qwen2_window_on_every_layer_is_a_plain_window(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    hf = Qwen2ForCausalLM(cfg).eval()
    _randomize(hf, 4)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours_cfg, model = _import(tmp_path / "hf", tmp_path / "m.pt")
    assert ours_cfg.sliding_window == 4
    _assert_logits_match(model, lambda ids: hf(input_ids=ids).logits.float(), packed=False)
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert back.config.layer_types == ["sliding_attention"] * 2
    _assert_logits_match(model, lambda ids: back(input_ids=ids).logits.float(), packed=False)


# ------------------------------------------------------------------------------------------ MiniCPM


def _minicpm_reference(llama, scale_emb: float, scale_depth: float, dim_model_base: int):
    """MiniCPM's published forward on a stock Llama: embeddings × scale_emb, each attention/MLP branch output ×
    scale_depth/√L, the head's input ÷ (hidden_size/dim_model_base)."""
    n = llama.config.num_hidden_layers
    llama.model.embed_tokens.register_forward_hook(lambda m, i, o: o * scale_emb)
    for layer in llama.model.layers:
        for mod in (layer.self_attn.o_proj, layer.mlp.down_proj):
            mod.register_forward_hook(lambda m, i, o: o * (scale_depth / math.sqrt(n)))
    width = llama.config.hidden_size / dim_model_base
    llama.lm_head.register_forward_pre_hook(lambda m, args: (args[0] / width,))
    return llama


def test_minicpm_imports_with_its_mup_and_exports_folded(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    _randomize(llama, 7)
    llama.save_pretrained(str(tmp_path / "hf"))
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_cfg.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], **MINICPM)
    hf_cfg.pop("rope_parameters")
    hf_cfg["rope_theta"], hf_cfg["rope_scaling"] = 10000.0, None  # as MiniCPM's own config.json spells it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    cfg, model = _import(tmp_path / "hf", tmp_path / "m.pt")
    assert (cfg.scale, cfg.scale_emb, cfg.scale_depth, cfg.dim_model_base, cfg.tie_lm_head, cfg.hf_model_type) == (
        True, 12.0, 1.4, 8, True, "minicpm")
    ref = _minicpm_reference(llama, **MINICPM)
    _assert_logits_match(model, lambda ids: ref(input_ids=ids).logits.float())
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "out")  # stock Llama, muP folded, head untied
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["tie_word_embeddings"] is False
    back = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    _assert_logits_match(model, lambda ids: back(input_ids=ids).logits.float(), packed=False)
    assert main(["import", "--hf-dir", str(out), "--output", str(tmp_path / "again.pt")]) == 0
    assert load_model_config(str(tmp_path / "again.json"), "dragonfly") == cfg


def test_upstream_fm9g_4b_form_imports_as_minicpm(tmp_path):
    # upstream FM9G's 4B checkpoint: model_type fm9g, FM9GForCausalLM (remote code), Llama-named weights, MiniCPM's muP
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)).eval()
    _randomize(llama, 11)
    llama.save_pretrained(str(tmp_path / "hf"))
    _edit_config(tmp_path / "hf", drop=("rope_parameters",), model_type="fm9g", architectures=["FM9GForCausalLM"],
                 auto_map={"AutoConfig": "configuration_fm9g.FM9GConfig",
                           "AutoModelForCausalLM": "modeling_fm9g.FM9GForCausalLM"}, rope_theta=10000.0, **MINICPM)
    cfg, model = _import(tmp_path / "hf", tmp_path / "m.pt")
    assert (cfg.scale, cfg.scale_emb, cfg.scale_depth, cfg.dim_model_base, cfg.hf_model_type) == (
        True, 12.0, 1.4, 8, "fm9g")
    ref = _minicpm_reference(llama, **MINICPM)
    _assert_logits_match(model, lambda ids: ref(input_ids=ids).logits.float())
    back = LlamaForCausalLM.from_pretrained(str(export_checkpoint(tmp_path / "m.pt", tmp_path / "out")),
                                            dtype=torch.float32).eval()
    _assert_logits_match(model, lambda ids: back(input_ids=ids).logits.float(), packed=False)


@pytest.mark.parametrize("bias_key", ["attention_bias", "qkv_bias"])
def test_upstream_fm9g_7b_form_imports_with_qkv_biases_and_no_mup(tmp_path, bias_key):
    # upstream FM9G's 7B: model_type fm9g7b, a Qwen2-shaped body (q/k/v biases, RoPE base 1e6) without muP keys
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})).eval()
    _randomize(qwen, 12)
    qwen.save_pretrained(str(tmp_path / "hf"))
    _edit_config(tmp_path / "hf", drop=("rope_parameters", "use_sliding_window", "max_window_layers", "layer_types"),
                 model_type="fm9g7b", architectures=["FM9GForCausalLM"], rope_theta=1e6, **{bias_key: True})
    cfg, model = _import(tmp_path / "hf", tmp_path / "m.pt")
    assert (cfg.scale, cfg.qkv_bias, cfg.base, cfg.tie_lm_head, cfg.hf_model_type) == (
        False, True, 1e6, False, "fm9g7b")
    _assert_logits_match(model, lambda ids: qwen(input_ids=ids).logits.float())


@pytest.mark.parametrize("changes, key", [
    ({"q_lora_rank": 16, **MINICPM}, "q_lora_rank=16"),
    ({"scale_emb": 12.0, "dim_model_base": 8}, "scale_depth=None"),
])
def test_upstream_fm9g_forms_fm_cannot_map_are_refused(tmp_path, capsys, changes, key):
    _, hf_dir = _plain_llama(tmp_path)
    _edit_config(hf_dir, model_type="fm9g", **changes)
    _assert_refused(hf_dir, tmp_path, capsys, "config.json", key)


# ------------------------------------------------------------------------------------------ refusals


def _plain_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    return hf, tmp_path / "hf"


def _edit_config(hf_dir, drop=(), **changes):
    cfg = json.loads((hf_dir / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def _edit_weights(hf_dir, edit):
    state = load_file(str(hf_dir / "model.safetensors"))
    edit(state)
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def _assert_refused(hf_dir, tmp_path, capsys, *needles):
    out = tmp_path / "o" / "m.pt"
    assert main(["import", "--hf-dir", str(hf_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


REFUSALS = {  # name: (config changes, weight edit, words the message holds besides the file)
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), None,
             ("config.json", "rope_type='yarn'")),
    "dynamic (4.x spelling)": (dict(rope_scaling={"type": "dynamic", "factor": 2.0}, drop=("rope_parameters",)),
                               None, ("config.json", "rope_type='dynamic'")),
    "moe": (dict(num_local_experts=8), None, ("config.json", "num_local_experts=8")),
    "mlp_bias": (dict(mlp_bias=True), None, ("config.json", "mlp_bias=True")),
    "unknown family": (dict(model_type="gemma2"), None, ("config.json", "model_type='gemma2'", "qwen3")),
    "qwen2 window on some layers": (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1, layer_types=None), None,
                                    ("config.json", "use_sliding_window", "every layer")),
    "partial rotary": (dict(partial_rotary_factor=0.5), None, ("config.json", "partial_rotary_factor=0.5")),
    "missing tensor": ({}, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
                       ("hf", "model.layers.1.mlp.up_proj.weight", "missing")),
    "unexpected tensor": ({}, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
                          ("model.safetensors", "model.layers.0.mlp.extra.weight", "no dragonfly equivalent")),
    "extra layer": ({}, lambda s: s.update({"model.layers.2.input_layernorm.weight": torch.ones(32)}),
                    ("model.safetensors", "model.layers.2.input_layernorm.weight", "num_hidden_layers=2")),
    "shape": (dict(intermediate_size=40), None,
              ("model.safetensors", "model.layers.0.mlp.down_proj.weight", "shape [32, 48]", "describes [32, 40]")),
    "tied head that is not": (dict(tie_word_embeddings=True), None, ("model.safetensors", "lm_head.weight", "tied")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_file_and_key_and_write_nothing(case, tmp_path, capsys):
    changes, edit, needles = REFUSALS[case]
    _, hf_dir = _plain_llama(tmp_path)
    if edit is not None:
        _edit_weights(hf_dir, edit)
    if changes or edit is None:
        _edit_config(hf_dir, **changes)
    _assert_refused(hf_dir, tmp_path, capsys, *needles)


def test_export_refuses_what_the_family_cannot_hold(tmp_path):
    from fm.export.families import hf_config_from_dragonfly

    base = {"vocab_size": 300, "dim_model": 32, "dim_ff": 48, "dim_head": 8, "num_heads": 4, "num_kv_heads": 2,
            "num_layers": 2}
    cases = [({"hf_model_type": "mistral", "qkv_bias": True}, "qkv_bias=True"),
             ({"hf_model_type": "qwen3", "qk_norm": False}, "qk_norm=False"),
             ({"hf_model_type": "llama", "sliding_window": 8}, "sliding_window=8"),
             ({"qk_norm": True}, "qk_norm=True"),  # dragonfly's own: stock Llama has no q/k norm
             ({"hf_model_type": "gpt2"}, "hf_model_type='gpt2'")]
    for keys, needle in cases:
        cfg = load_model_config({**base, **keys}, "dragonfly")
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            hf_config_from_dragonfly(cfg, torch.float32)
