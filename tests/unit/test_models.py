"""dragonfly / spark models: configs, parameter counts, upstream keys, muP, packing, KV cache, parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fm.models.config import ModelConfigError
from fm.models.dragonfly import Dragonfly, DragonflyConfig
from fm.models.registry import (
    build_model,
    load_model_config,
    mup_scaled_param_names,
    shipped_configs,
)
from fm.models.spark import MEGATRON_TO_SPARK, Spark, SparkConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY = "fm9g_2b/tiny"
SPARK_TINY = "spark_13b/tiny"


def tiny(name=TINY, seed=0, **overrides) -> torch.nn.Module:
    config = load_model_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return build_model(config, device="cpu", dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------- configs


def test_every_shipped_config_loads_and_builds_on_meta():
    found = shipped_configs()
    assert {p.name for p in found["dragonfly"]} >= {"2.4b.json", "tiny.json", "skywork_13b.json"}
    assert {p.name for p in found["spark"]} >= {"13b.json", "tiny.json"}
    for family, paths in found.items():
        for path in paths:
            config = load_model_config(str(path))
            model = build_model(config, device="meta")
            assert model.config.model_family == family, path
            assert all(p.is_meta for p in model.parameters())


def test_upstream_2_4b_config_values_and_every_upstream_key(tmp_path):
    config = load_model_config("2.4b")
    assert isinstance(config, DragonflyConfig)
    assert (config.vocab_size, config.dim_model, config.dim_ff, config.dim_head) == (122753, 2304, 5760, 64)
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (36, 36, 40)
    assert (config.scale, config.scale_emb, config.scale_depth, config.dim_model_base) == (True, 12, 1.4, 256)
    assert config.scale_width == 9.0 and config.tie_lm_head and config.base == 10000
    assert config.residual_scale == pytest.approx(1.4 / math.sqrt(40))
    upstream = json.loads((REPO_ROOT / "apps/fm9g_2b/model_configs/2.4b.json").read_text())
    upstream.update(
        dropout_p=0.0, half=True, half_type="bf16", use_flash_attn=True, flash_attn_mask_shape="1d",
        model_type="fm9g", architectures=["FM9GForCausalLM"], ffn_gated=True, max_length=4096, dtype="bf16",
        ori_max_length=32768, use_checkpoint=True,
    )  # fmt: skip
    path = tmp_path / "upstream.json"
    path.write_text(json.dumps(upstream))
    loaded = load_model_config(str(path))
    assert loaded.torch_dtype == torch.bfloat16 and loaded.architectures == ["FM9GForCausalLM"]


def test_unknown_key_names_file_and_suggests_closest(tmp_path):
    data = json.loads((REPO_ROOT / "apps/fm9g_2b/model_configs/tiny.json").read_text())
    data["dim_modle"] = 64
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelConfigError) as err:
        load_model_config(str(path))
    assert str(err.value) == f"{path}: unknown key 'dim_modle'; did you mean \"dim_model\"?"
    spark = json.loads((REPO_ROOT / "apps/spark_13b/model_configs/tiny.json").read_text())
    spark["sliding_windw"] = 3
    path.write_text(json.dumps(spark))
    with pytest.raises(ModelConfigError, match='did you mean "sliding_window"'):
        load_model_config(str(path))
    # every problem at once: unknown key, wrong type, invalid choice, bad range
    path.write_text(json.dumps({**data, "dim_modle": 1, "num_layers": "4", "activate_fn": "relu"}))
    with pytest.raises(ModelConfigError) as err:
        load_model_config(str(path))
    assert sorted(err.value.problems) == ["activate_fn: 'relu' is not one of silu, gelu, gelu_tanh; did you mean "
                                          "\"gelu\"?",
                                          "num_layers: must be an integer (a JSON number, not a string), got '4'",
                                          "unknown key 'dim_modle'; did you mean \"dim_model\"?"]
    assert str(err.value).startswith(f"{path}: 3 problems:\n  - ")
    data.pop("dim_modle")
    path.write_text(json.dumps({**data, "num_layers": 0, "dim_head": 7}))
    with pytest.raises(ModelConfigError) as err:
        load_model_config(str(path))
    assert err.value.problems == ["num_layers=0 must be >= 1", "dim_head=7 must be even (rotary)"]


def test_config_type_and_value_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_layers": "4"}))
    with pytest.raises(ModelConfigError, match=r"c\.json: num_layers: must be an integer .*, got '4'"):
        load_model_config(str(path))
    path.write_text(json.dumps({"activate_fn": "relu"}))
    with pytest.raises(ModelConfigError, match="'relu' is not one of silu, gelu, gelu_tanh"):
        load_model_config(str(path))
    path.write_text(json.dumps({"num_heads": 6, "num_kv_heads": 4}))
    with pytest.raises(ModelConfigError, match=r"c\.json: num_heads=6 must be a multiple of num_kv_heads=4"):
        load_model_config(str(path))
    path.write_text('{"vocab_size": 1,\n "x": }')
    with pytest.raises(ModelConfigError, match=r"c\.json:2:\d+: invalid JSON"):
        load_model_config(str(path))
    # One rule for unqualified names everywhere (upstream FM9G's configs are dragonfly's): dragonfly first.
    assert isinstance(load_model_config("tiny"), DragonflyConfig)
    assert isinstance(load_model_config("spark/tiny"), SparkConfig)
    assert isinstance(load_model_config("spark_13b/tiny"), SparkConfig)
    assert isinstance(load_model_config("13b"), SparkConfig)  # only spark has it
    with pytest.raises(ModelConfigError, match="no shipped config of that name"):
        load_model_config("nope")
    assert isinstance(load_model_config("tiny", family="spark"), SparkConfig)
    assert isinstance(load_model_config("tiny", family="dragonfly"), DragonflyConfig)
    assert load_model_config({"num_kv_heads": -1, "num_heads": 8}).num_kv_heads == 8


# ---------------------------------------------------------------------------- parameter counts


def test_2_4b_parameter_count_on_meta():
    model = build_model(load_model_config("2.4b"), device="meta")
    assert model.num_parameters() == 2_724_880_896
    assert model.num_parameters(exclude_embeddings=True) == 2_442_057_984
    assert sum(p.numel() for p in model.parameters()) == 2_724_880_896


@pytest.mark.parametrize("name, total, body", [("fm9g_4b", 4_129_681_920, 3_941_655_040),
                                               ("fm9g_7b", 7_078_350_848, 6_476_664_832)])
def test_upstream_fm9g_4b_and_7b_shapes(name, total, body):
    config = load_model_config(name)
    assert config.vocab_size == 73448 and config.base == 1e6
    if name == "fm9g_4b":  # MiniCPM's muP, GQA 40/4, tied head
        assert (config.scale, config.scale_emb, config.scale_depth, config.num_kv_heads, config.tie_lm_head) == (
            True, 12, 1.4, 4, True)
    else:  # Qwen2-shaped: q/k/v biases, all heads for keys and values, no muP
        assert (config.scale, config.qkv_bias, config.num_kv_heads, config.tie_lm_head) == (False, True, 32, False)
    model = build_model(config, device="meta")
    assert (model.num_parameters(), model.num_parameters(exclude_embeddings=True)) == (total, body)


def test_skywork_13b_llama_family_parameter_count_on_meta():
    config = load_model_config("skywork_13b")
    assert not config.scale and config.scale_width == 1.0 and config.residual_scale == 1.0
    model = build_model(config, device="meta")
    v, d, f, n = 65519, 4608, 12288, 52
    expected = 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    assert expected == 13_854_113_280
    assert model.num_parameters() == expected
    assert model.lm_head.weight.shape == (v, d)


def test_spark_13b_parameter_count_on_meta():
    model = build_model(load_model_config("spark_13b/13b"), device="meta")
    v, d, f, n = 60000, 5120, 14336, 40
    per_layer = 2 * d + 4 * (d * d + d) + 2 * d + 2 * (d * f + f) + (f * d + d)
    expected = v * d + n * per_layer + 2 * d
    assert expected == 13_312_542_720
    assert model.num_parameters() == expected


# ------------------------------------------------------------------------------ state-dict keys


def upstream_keys(num_layers: int) -> set[str]:
    keys = {"input_embedding.weight", "encoder.output_layernorm.weight"}
    for i in range(num_layers):
        p = f"encoder.layers.{i}."
        keys |= {
            p + "self_att.layernorm_before_attention.weight",
            p + "self_att.self_attention.project_q.weight",
            p + "self_att.self_attention.project_k.weight",
            p + "self_att.self_attention.project_v.weight",
            p + "self_att.self_attention.attention_out.weight",
            p + "ffn.layernorm_before_ffn.weight",
            p + "ffn.ffn.w_in.w_0.weight",
            p + "ffn.ffn.w_in.w_1.weight",
            p + "ffn.ffn.w_out.weight",
        }
    return keys


def test_dragonfly_state_dict_keys_are_upstreams():
    model = build_model(load_model_config("2.4b"), device="meta")
    assert set(model.state_dict()) == upstream_keys(40)
    untied = build_model(load_model_config("skywork_13b"), device="meta")
    assert set(untied.state_dict()) == upstream_keys(52) | {"lm_head.weight"}


def test_upstream_checkpoint_loads_strict(tmp_path):
    source = tiny(seed=1)
    path = tmp_path / "fm9g_live_checkpoint-1.pt"
    torch.save({k: v.clone() for k, v in source.state_dict().items()}, path)
    target = build_model(load_model_config(TINY), device="meta", dtype=torch.float32)
    target.to_empty(device="cpu")
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ids = torch.randint(0, 8000, (1, 9))
    assert torch.equal(target.eval()(ids), source(ids))


def test_spark_state_dict_keys_and_importer_map():
    model = build_model(load_model_config(SPARK_TINY), device="meta")
    keys = set(model.state_dict())
    expected = {v.format(i=i) for v in MEGATRON_TO_SPARK.values() for i in range(4)}
    assert keys == expected
    assert "encoder.layers.3.mlp.fc0.bias" in keys and "encoder.layers.0.self_attention.out_proj.bias" in keys
    assert model.state_dict()["encoder.layers.0.mlp.fc2.weight"].shape == (128, 352)


# ------------------------------------------------------------------------- meta build and muP


def test_meta_build_then_init_weights_gives_mup_stds():
    config = load_model_config(TINY)
    model = build_model(config, device="meta", dtype=torch.float32)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert config.scale_width == 4.0
    assert model.input_embedding.weight.std().item() == pytest.approx(0.1, rel=0.02)
    hidden = torch.cat([model.get_parameter(n).flatten() for n in sorted(mup_scaled_param_names(model))])
    assert hidden.std().item() == pytest.approx(0.1 / math.sqrt(4.0), rel=0.02)
    for name, p in model.named_parameters():
        if "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_layers_materialise_one_at_a_time():
    model = build_model(load_model_config(TINY), device="meta", dtype=torch.float32)
    for layer in model.encoder.layers:
        layer.to_empty(device="cpu")
        layer.init_weights()
        assert not any(p.is_meta for p in layer.parameters())
    assert model.input_embedding.weight.is_meta
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = model.encoder.layers[0], model.encoder.layers[1]
    a.init_weights(g1)
    b.init_weights(g2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_mup_scaled_param_names():
    model = build_model(load_model_config("2.4b"), device="meta")
    names = mup_scaled_param_names(model)
    assert len(names) == 7 * 40
    assert "encoder.layers.0.ffn.ffn.w_in.w_0.weight" in names
    assert "encoder.layers.39.self_att.self_attention.attention_out.weight" in names
    assert not any("layernorm" in n or "embedding" in n for n in names)
    assert mup_scaled_param_names(build_model(load_model_config("skywork_13b"), device="meta")) == set()
    assert mup_scaled_param_names(build_model(load_model_config("spark_13b/13b"), device="meta")) == set()


# ----------------------------------------------------------------- forward vs naive references


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, base):
    """x [S, H, D] at positions 0..S-1, pairs (i, i + D/2) rotated by pos * base^(-2i/D)."""
    seqlen, _, dim = x.shape
    half = dim // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    ang = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv  # [S, half]
    c, s = ang.cos()[:, None].float(), ang.sin()[:, None].float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _attn(x, wq, wk, wv, wo, heads, kv_heads, dim_head, base, window=None, biases=None):
    seqlen = x.shape[0]
    bq, bk, bv, bo = biases or (0, 0, 0, 0)
    q = _rope((x @ wq.T + bq).view(seqlen, heads, dim_head), base)
    k = _rope((x @ wk.T + bk).view(seqlen, kv_heads, dim_head), base)
    v = (x @ wv.T + bv).view(seqlen, kv_heads, dim_head)
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None]
    allowed = (j <= i) & ((i - j < window) if window else True)
    out = torch.empty(seqlen, heads, dim_head)
    for h in range(heads):
        kh = h // (heads // kv_heads)
        scores = (q[:, h] @ k[:, kh].T / math.sqrt(dim_head)).masked_fill(~allowed, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kh]
    return out.reshape(seqlen, -1) @ wo.T + bo


def reference_dragonfly(model: Dragonfly, ids: torch.Tensor) -> torch.Tensor:
    """Upstream semantics written out by hand for one sequence ``ids [S]``."""
    c, sd = model.config, model.state_dict()
    h = sd["input_embedding.weight"][ids] * (c.scale_emb if c.scale else 1.0)
    res = c.scale_depth / math.sqrt(c.num_layers) if c.scale_depth > 0 else 1.0
    for i in range(c.num_layers):
        p = f"encoder.layers.{i}."
        a = p + "self_att.self_attention."
        x = _rms(h, sd[p + "self_att.layernorm_before_attention.weight"], c.eps)
        h = h + res * _attn(
            x,
            sd[a + "project_q.weight"],
            sd[a + "project_k.weight"],
            sd[a + "project_v.weight"],
            sd[a + "attention_out.weight"],
            c.num_heads,
            c.num_kv_heads,
            c.dim_head,
            c.base,
        )
        x = _rms(h, sd[p + "ffn.layernorm_before_ffn.weight"], c.eps)
        f = F.silu(x @ sd[p + "ffn.ffn.w_in.w_0.weight"].T) * (x @ sd[p + "ffn.ffn.w_in.w_1.weight"].T)
        h = h + res * (f @ sd[p + "ffn.ffn.w_out.weight"].T)
    h = _rms(h, sd["encoder.output_layernorm.weight"], c.eps)
    head = sd["input_embedding.weight"] if c.tie_lm_head else sd["lm_head.weight"]
    return (h / c.scale_width) @ head.T


def reference_spark(model: Spark, ids: torch.Tensor) -> torch.Tensor:
    c, sd = model.config, model.state_dict()
    h = sd["input_embedding.weight"][ids]

    def ln(x, name):
        return F.layer_norm(x, (c.dim_model,), sd[name + ".weight"], sd[name + ".bias"], c.eps)

    for i in range(c.num_layers):
        p = f"encoder.layers.{i}."
        a = p + "self_attention."
        w = [sd[f"{a}{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        b = [sd[f"{a}{n}.bias"] for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        h = h + _attn(
            ln(h, p + "input_layernorm"), *w, c.num_heads, c.num_kv_heads, c.dim_head, c.base, c.sliding_window, b
        )
        x = ln(h, p + "post_attention_layernorm")
        m = p + "mlp."
        gate = x @ sd[m + "fc0.weight"].T + sd[m + "fc0.bias"]
        up = x @ sd[m + "fc1.weight"].T + sd[m + "fc1.bias"]
        gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
        h = h + (gelu * up) @ sd[m + "fc2.weight"].T + sd[m + "fc2.bias"]
    h = ln(h, "encoder.output_layernorm")
    return h @ sd["input_embedding.weight"].T


@pytest.mark.parametrize("name", [TINY, "fm9g_2b/tiny_llama"])
def test_dragonfly_forward_matches_hand_written_reference(name):
    model = tiny(name)
    ids = torch.randint(0, 8000, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], reference_dragonfly(model, ids[0]), atol=2e-4, rtol=2e-4)


def test_spark_forward_matches_hand_written_reference_beyond_the_window():
    model = tiny(SPARK_TINY)
    assert model.config.sliding_window == 16
    ids = torch.randint(0, 8000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)[0]
        torch.testing.assert_close(out, reference_spark(model, ids[0]), atol=2e-4, rtol=2e-4)
        # the window matters: full causal attention gives different logits after position 16
        model.config.sliding_window = None
        for layer in model.encoder.layers:
            layer.self_attention.window = None
        full = model(ids)[0]
    torch.testing.assert_close(full[:16], out[:16], atol=1e-5, rtol=1e-5)
    assert (full[16:] - out[16:]).abs().max() > 1e-3


def test_tied_head_shares_the_embedding_and_untied_has_lm_head():
    model = tiny()
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    h = torch.randn(2, 3, 128)
    torch.testing.assert_close(model.project(h), (h / 4.0) @ model.input_embedding.weight.T)
    untied = tiny("fm9g_2b/tiny_llama")
    assert untied.lm_head.weight.data_ptr() != untied.input_embedding.weight.data_ptr()
    torch.testing.assert_close(untied.project(h), h @ untied.lm_head.weight.T)
    spark = tiny(SPARK_TINY)
    assert spark.lm_head is None and spark.config.scale_width == 1.0


def _pack(samples, batch, seqlen):
    """Pack samples into rows (like the train loader): ids, position_ids, cu_seqlens, slot map."""
    ids = torch.zeros(batch, seqlen, dtype=torch.long)
    pos = torch.zeros(batch, seqlen, dtype=torch.long)
    cu, where, row, col = [0], [], 0, 0
    for s in samples:
        if col + len(s) > seqlen:
            if col < seqlen:
                cu.append(row * seqlen + seqlen)  # padding tail is its own segment
            row, col = row + 1, 0
        ids[row, col : col + len(s)] = s
        pos[row, col : col + len(s)] = torch.arange(len(s))
        where.append((row, col))
        col += len(s)
        cu.append(row * seqlen + col)
    if col < seqlen:
        cu.append(row * seqlen + seqlen)
    assert row == batch - 1
    return ids, pos, torch.tensor(cu, dtype=torch.int32), where


@pytest.mark.parametrize("name", [TINY, SPARK_TINY])
def test_packed_forward_equals_per_sample_forwards(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 8000, (n,), generator=g) for n in (7, 20, 3, 30, 9)]
    ids, pos, cu, where = _pack(samples, batch=3, seqlen=32)
    with torch.no_grad():
        packed = model(ids, pos, cu, 30)
        derived = model(ids, None, cu)  # positions derived from cu_seqlens
        torch.testing.assert_close(derived, packed)
        for s, (r, c) in zip(samples, where):
            single = model(s[None])[0]
            torch.testing.assert_close(packed[r, c : c + len(s)], single, atol=1e-5, rtol=1e-5)


def test_layer_contract_positional_args():
    model = tiny()
    ids = torch.randint(0, 8000, (2, 8))
    h = model.embed(ids)
    cos, sin = model.rotary(torch.arange(8).expand(2, 8))
    out = h
    for layer in model.encoder.layers:
        out = layer(out, cos, sin, None, None, None)
    with torch.no_grad():
        torch.testing.assert_close(model.project(model.encoder.output_layernorm(out)), model(ids))
    assert isinstance(model.encoder.layers, torch.nn.ModuleList) and len(model.encoder.layers) == 4


# ------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", [TINY, SPARK_TINY])
def test_kv_cache_forward_equals_full_forward(name):
    model = tiny(name)
    ids = torch.randint(0, 8000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 64)
        steps = [model(ids[:, :10], kv_cache=cache)] + [model(ids[:, t : t + 1], kv_cache=cache) for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.lengths.tolist() == [40, 40]
        # chunks longer than a rolling buffer
        cache = model.new_kv_cache(2, 64)
        chunks = [model(ids[:, :25], kv_cache=cache), model(ids[:, 25:], kv_cache=cache)]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    window = model.config.sliding_window
    assert cache.capacity == (window if window else 64) and cache.k[0].shape[2] == cache.capacity


@pytest.mark.parametrize("name", [TINY, SPARK_TINY])
def test_kv_cache_left_padded_batch(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 8000, (30,), generator=g), torch.randint(0, 8000, (24,), generator=g)
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
        # prompts of 20 and 14 tokens, left-padded with position -1, then 10 decode steps
        ids = torch.full((2, 20), 3)
        pos = torch.full((2, 20), -1)
        ids[0], pos[0] = a[:20], torch.arange(20)
        ids[1, 6:], pos[1, 6:] = b[:14], torch.arange(14)
        cache = model.new_kv_cache(2, 64)
        first = model(ids, pos, kv_cache=cache)
        assert cache.lengths.tolist() == [20, 14]
        torch.testing.assert_close(first[0], ref_a[:20], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first[1, 6:], ref_b[:14], atol=1e-5, rtol=1e-5)
        for t in range(10):
            step = model(torch.stack([a[20 + t], b[14 + t]])[:, None], kv_cache=cache)
            assert torch.isfinite(step).all()
            torch.testing.assert_close(step[0, 0], ref_a[20 + t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[1, 0], ref_b[14 + t], atol=1e-5, rtol=1e-5)


def test_kv_cache_full_raises_and_rejects_packing():
    model = tiny()
    cache = model.new_kv_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="cannot be combined"):
            model(
                torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]), kv_cache=model.new_kv_cache(1, 8)
            )


# --------------------------------------------------------------------------------- dtype, parity


@pytest.mark.parametrize("name", [TINY, SPARK_TINY])
def test_bf16_forward_and_backward_run(name):
    config = load_model_config(name)
    torch.manual_seed(0)
    model = build_model(config, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, 8000, (2, 16))
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32)
    logits = model(ids, None, cu)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    F.cross_entropy(logits.float().view(-1, 8000), ids.view(-1)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref = build_model(config, device="cpu", dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        diff = (ref(ids, None, cu) - logits.float()).abs().mean() / ref(ids, None, cu).abs().mean()
    assert diff < 0.05


def test_llama_config_matches_transformers_llama():
    import transformers

    model = tiny("fm9g_2b/tiny_llama")
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim_model, intermediate_size=c.dim_ff, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.dim_head,
        rms_norm_eps=c.eps, rope_theta=c.base, tie_word_embeddings=False, max_position_embeddings=512,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    sd = model.state_dict()
    hf_sd = {"model.embed_tokens.weight": sd["input_embedding.weight"], "model.norm.weight":
             sd["encoder.output_layernorm.weight"], "lm_head.weight": sd["lm_head.weight"]}  # fmt: skip
    att, ffn = "self_att.self_attention.", "ffn.ffn."
    names = {
        "self_attn.q_proj": att + "project_q",
        "self_attn.k_proj": att + "project_k",
        "self_attn.v_proj": att + "project_v",
        "self_attn.o_proj": att + "attention_out",
        "mlp.gate_proj": ffn + "w_in.w_0",
        "mlp.up_proj": ffn + "w_in.w_1",
        "mlp.down_proj": ffn + "w_out",
        "input_layernorm": "self_att.layernorm_before_attention",
        "post_attention_layernorm": "ffn.layernorm_before_ffn",
    }
    for i in range(c.num_layers):
        for theirs, ours in names.items():
            hf_sd[f"model.layers.{i}.{theirs}.weight"] = sd[f"encoder.layers.{i}.{ours}.weight"]
    hf.load_state_dict(hf_sd, strict=True)
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["2.4b", "skywork_13b", "spark_13b/13b", SPARK_TINY])
def test_config_to_dict_round_trips_through_json(name, tmp_path):
    config = load_model_config(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    again = load_model_config(str(path))
    assert type(again) is type(config) and again.to_dict() == config.to_dict()


def test_models_and_layers_import_no_training_or_distributed_code():
    import ast

    for folder in ("fm/nn", "fm/models"):
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    forbidden = ("fm.data", "fm.train", "fm.distributed", "torch.distributed")
                    assert not name.startswith(forbidden), (path, name)


def test_packed_forward_under_cpu_autocast():
    model = tiny(SPARK_TINY)
    ids = torch.randint(0, 8000, (2, 16))
    cu = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    with torch.no_grad():
        ref = model(ids, None, cu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, None, cu)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() / ref.abs().mean() < 0.05


def test_residual_scale_follows_upstream_when_scale_is_off():
    # upstream multiplies residual branches by scale_depth/sqrt(L) whenever scale_depth > 0
    model = tiny("fm9g_2b/tiny_llama", scale_depth=1.4)
    assert model.encoder.layers[0].ffn.residual_scale == model.config.residual_scale
    assert model.config.scale_width == 1.0 and model.config.residual_scale == pytest.approx(0.7)
    ids = torch.randint(0, 8000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], reference_dragonfly(model, ids[0]), atol=2e-4, rtol=2e-4)


def test_dropout_only_in_training_mode():
    config = load_model_config(TINY)
    config.dropout_p = 0.5
    torch.manual_seed(0)
    model = build_model(config, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 8000, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))
