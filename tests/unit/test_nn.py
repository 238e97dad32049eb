"""Layers against naive references: norms, rotary, attention (varlen, GQA, window), gated MLP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fm.nn.attention import (
    Attention,
    attention,
    causal_mask,
    flash_attn_varlen_func,
    positions_from_cu_seqlens,
    prepare_attention,
    segment_ids,
)
from fm.nn.mlp import GatedMLP
from fm.nn.norm import LayerNorm, RMSNorm
from fm.nn.rotary import RotaryEmbedding, apply_rotary

# ---------------------------------------------------------------------------------------- norms


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_bf16_variance_in_fp32_then_cast():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5, dtype=torch.bfloat16)
    x = (torch.randn(4, 64) * 30).to(torch.bfloat16)
    # upstream rms_layernorm: fp32 variance, normalise, cast to bf16, then multiply by the weight
    var = x.float().pow(2).mean(-1, keepdim=True)
    expected = (x * torch.rsqrt(var + 1e-5)).to(torch.bfloat16) * norm.weight
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_layernorm_matches_torch_with_bias():
    torch.manual_seed(0)
    ours = LayerNorm(32, eps=1e-5)
    ref = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        ours.bias.copy_(torch.randn(32))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), ref(x))
    assert set(dict(ours.named_parameters())) == {"weight", "bias"}
    assert set(dict(LayerNorm(8, bias=False).named_parameters())) == {"weight"}


def test_norms_init_weights_after_meta():
    norm = RMSNorm(8, device="meta")
    assert norm.weight.is_meta
    norm.to_empty(device="cpu")
    norm.init_weights()
    assert torch.equal(norm.weight, torch.ones(8))
    ln = LayerNorm(8, device="meta").to_empty(device="cpu")
    ln.init_weights()
    assert torch.equal(ln.weight, torch.ones(8)) and torch.equal(ln.bias, torch.zeros(8))


# --------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("base", [10000.0, 1e6])
def test_rotary_matches_direct_formula(base):
    torch.manual_seed(0)
    dim, half = 8, 4
    rope = RotaryEmbedding(dim, base)
    pos = torch.tensor([[0, 1, 2, 7], [5, 0, 3, 1000]])
    x = torch.randn(2, 4, 3, dim)
    out = apply_rotary(x, *rope(pos))
    expected = torch.empty_like(x)
    for b in range(2):
        for s in range(4):
            p = float(pos[b, s])
            for i in range(half):
                theta = p * base ** (-2 * i / dim)
                c, sn = math.cos(theta), math.sin(theta)
                x1, x2 = x[b, s, :, i], x[b, s, :, i + half]
                expected[b, s, :, i] = x1 * c - x2 * sn
                expected[b, s, :, i + half] = x2 * c + x1 * sn
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_rotary_computed_in_fp32_for_bf16_inputs():
    rope = RotaryEmbedding(16, 10000.0)
    pos = torch.arange(300).view(1, 300)
    cos, sin = rope(pos)
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(1, 300, 2, 16)
    out = apply_rotary(x.to(torch.bfloat16), cos, sin)
    assert out.dtype == torch.bfloat16
    expected = apply_rotary(x.to(torch.bfloat16).float(), cos, sin).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_rotary_is_relative():
    # <R(p)q, R(p')k> depends only on p - p'
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, 10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        rq = apply_rotary(q, *rope(torch.tensor([[pq]])))
        rk = apply_rotary(k, *rope(torch.tensor([[pk]])))
        return (rq * rk).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ attention


def naive_attention(q, k, v, allowed):
    """q [S, H, D], k/v [S, Hkv, D], allowed [S, S] bool → [S, H, D] by explicit masked softmax."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for h in range(heads):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = q[:, h] @ kh.T / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ vh
    return out


def naive_allowed(n, window=None):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def per_sample_reference(q, k, v, cu_seqlens, window=None):
    """Loop over the packed samples of the flattened [B*S] tokens."""
    batch, seqlen = q.shape[:2]
    qf, kf, vf = (t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v))
    out = torch.empty_like(qf)
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        out[a:b] = naive_attention(qf[a:b], kf[a:b], vf[a:b], naive_allowed(b - a, window))
    return out.view_as(q)


def _qkv(batch, seqlen, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, generator=g)
    k = torch.randn(batch, seqlen, kv_heads, dim, generator=g)
    v = torch.randn(batch, seqlen, kv_heads, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal_attention_matches_naive_mha_and_gqa(kv_heads):
    q, k, v = _qkv(2, 12, 4, kv_heads, 8)
    out = attention(q, k, v)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_attention(q[b], k[b], v[b], naive_allowed(12)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_varlen_equals_per_sample_loop(window, kv_heads):
    batch, seqlen = 3, 16
    q, k, v = _qkv(batch, seqlen, 4, kv_heads, 8, seed=1)
    # row 0: samples 5, 7, padding 4 | row 1: one sample 16 | row 2: 1, 9, padding 6
    cu = torch.tensor([0, 5, 12, 16, 32, 33, 42, 48], dtype=torch.int32)
    mask, cu_out, _ = prepare_attention(batch, seqlen, cu, None, window, device=q.device, use_flash=False)
    assert cu_out is None and mask.shape == (batch, 1, seqlen, seqlen)
    out = attention(q, k, v, mask, window=window)
    torch.testing.assert_close(out, per_sample_reference(q, k, v, cu, window), atol=1e-5, rtol=1e-5)
    # passing cu_seqlens directly (no prepared mask) takes the same path on CPU
    out2 = attention(q, k, v, None, cu, 9, window)
    torch.testing.assert_close(out2, out)


def test_sliding_window_mask():
    mask = causal_mask(6, window=2)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    q, k, v = _qkv(1, 10, 2, 2, 4)
    out = attention(q, k, v, window=3)
    torch.testing.assert_close(out[0], naive_attention(q[0], k[0], v[0], naive_allowed(10, 3)), atol=1e-5, rtol=1e-5)
    # a window as long as the sequence is plain causal attention
    torch.testing.assert_close(attention(q, k, v, window=10), attention(q, k, v))


def test_segments_and_positions_from_cu_seqlens():
    cu = torch.tensor([0, 3, 8, 10, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        segment_ids(cu, 2, 6)  # sample [3, 8) spans rows 0 and 1
    cu = torch.tensor([0, 3, 6, 8, 12], dtype=torch.int32)
    assert segment_ids(cu, 2, 6).tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]]
    assert positions_from_cu_seqlens(cu, 2, 6).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="end at B\\*S=12"):
        segment_ids(torch.tensor([0, 5], dtype=torch.int32), 2, 6)


def test_attention_module_matches_manual_computation_with_biases():
    torch.manual_seed(0)
    dim, heads, kv_heads, dh, seqlen = 16, 4, 2, 8, 7
    attn = Attention(dim, heads, kv_heads, dh, qkv_bias=True, out_bias=True, names=("q", "k", "v", "o"))
    attn.init_weights()
    with torch.no_grad():
        for name in ("q", "k", "v", "o"):
            getattr(attn, name).bias.normal_()
    x = torch.randn(1, seqlen, dim)
    cos, sin = RotaryEmbedding(dh, 10000.0)(torch.arange(seqlen)[None])
    out = attn(x, cos, sin)
    q = apply_rotary((x @ attn.q.weight.T + attn.q.bias).view(1, seqlen, heads, dh), cos, sin)
    k = apply_rotary((x @ attn.k.weight.T + attn.k.bias).view(1, seqlen, kv_heads, dh), cos, sin)
    v = (x @ attn.v.weight.T + attn.v.bias).view(1, seqlen, kv_heads, dh)
    ctx = naive_attention(q[0], k[0], v[0], naive_allowed(seqlen)).reshape(seqlen, heads * dh)
    expected = ctx @ attn.o.weight.T + attn.o.bias
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    assert set(dict(attn.named_parameters())) == {f"{n}.{p}" for n in "qkvo" for p in ("weight", "bias")}


def test_attention_module_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(16, 4, 3, 4)


@pytest.mark.gpu
@pytest.mark.skipif(flash_attn_varlen_func is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("window", [None, 5])
def test_flash_path_matches_sdpa_path(window):
    batch, seqlen = 2, 32
    q, k, v = (t.cuda().to(torch.bfloat16) for t in _qkv(batch, seqlen, 4, 2, 64, seed=3))
    cu = torch.tensor([0, 10, 32, 45, 64], dtype=torch.int32, device="cuda")
    _, cu_flash, max_len = prepare_attention(batch, seqlen, cu, None, window, device=q.device, use_flash=True)
    flash = attention(q, k, v, None, cu_flash, max_len, window)
    mask, _, _ = prepare_attention(batch, seqlen, cu, None, window, device=q.device, use_flash=False)
    sdpa = attention(q, k, v, mask, None, None, window)
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)
    ref = per_sample_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), cu.cpu(), window)
    torch.testing.assert_close(flash.float().cpu(), ref, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------------ mlp


@pytest.mark.parametrize(
    "activation, fn",
    [
        ("silu", lambda t: t * torch.sigmoid(t)),
        ("gelu", lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))),
        ("gelu_tanh", lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))),
    ],
)
def test_gated_mlp_matches_formula(activation, fn):
    torch.manual_seed(0)
    mlp = GatedMLP(8, 20, activation, bias=True, names=("w_in.w_0", "w_in.w_1", "w_out"), init_std=0.3)
    mlp.init_weights()
    with torch.no_grad():
        for p in mlp.parameters():
            if p.ndim == 1:
                p.normal_()
    x = torch.randn(3, 8)
    gate, up, down = mlp.w_in.w_0, mlp.w_in.w_1, mlp.w_out
    expected = (fn(x @ gate.weight.T + gate.bias) * (x @ up.weight.T + up.bias)) @ down.weight.T + down.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    names = set(dict(mlp.named_parameters()))
    assert names == {f"{m}.{p}" for m in ("w_in.w_0", "w_in.w_1", "w_out") for p in ("weight", "bias")}


def test_gated_mlp_uses_replaced_children():
    # adapters (PEFT) replace the projection modules after construction: forward must see them
    mlp = GatedMLP(4, 6, "silu", names=("fc0", "fc1", "fc2"))
    x = torch.randn(2, 4)
    before = mlp(x)
    mlp.fc2 = torch.nn.Sequential(mlp.fc2, torch.nn.Identity())
    torch.testing.assert_close(mlp(x), before)
    mlp.fc2 = torch.nn.Linear(6, 4, bias=False)
    torch.nn.init.zeros_(mlp.fc2.weight)
    assert torch.equal(mlp(x), torch.zeros(2, 4))


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        GatedMLP(4, 8, "relu")  # type: ignore[arg-type]


def test_sdpa_reference_sanity():
    # the naive reference itself agrees with torch's math on a full causal mask
    q, k, v = _qkv(1, 5, 2, 2, 4)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(naive_attention(q[0], k[0], v[0], naive_allowed(5)), ref[0].transpose(0, 1))


def test_cu_seqlens_on_the_device_is_not_read():
    # checking a device copy would wait for the device: only host copies are checked (and segment ids come out)
    bad = torch.tensor([0, 3, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        segment_ids(bad, 2, 6)
    assert segment_ids(bad.to("meta"), 2, 6).device.type == "meta"
