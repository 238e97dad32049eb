"""The CUDA attention path without a GPU: torch's ``varlen_attn`` call checked against a reference implementation
substituted for it (the arguments each torch release takes), and the 2.4B and Spark-13B shapes run forward and
backward on the ``meta`` device through it, allocating no ``S x S`` tensor. The SDPA fallback's mask never builds
an int64 ``S x S`` temporary, repeats k/v for GQA, and is refused on a GPU above its size limit."""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fm.models.registry import build_model, load_model_config
from fm.nn.attention import attention, causal_mask, force_kernel, prepare_attention

A = importlib.import_module("fm.nn.attention")  # the module (fm.nn.attention is also the function's name)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """What torch 2.13's varlen_attn computes (its CUDA kernel cannot run here), asserting its input contract."""
    assert return_aux is None and scale is None
    assert q.dim() == k.dim() == v.dim() == 3 and cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
    assert isinstance(window_size, tuple) and window_size[1] == 0  # (-1, 0) causal; (w - 1, 0) causal + window
    assert enable_gqa == (k.shape[1] != q.shape[1])
    cu = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        i = torch.arange(b - a)[:, None]
        j = torch.arange(b - a)[None, :]
        allowed = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)
        kk, vv = k[a:b].repeat_interleave(group, 1), v[a:b].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), kk.double()) / math.sqrt(q.shape[-1])
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -math.inf).softmax(-1),
                                vv.double()).to(q.dtype)
    return out


def _reference_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    assert scale is None and k.shape[1] == q.shape[1]  # no enable_gqa in 2.11: fm repeats k/v itself
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=False)


def _reference_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False):
    assert is_causal
    return _reference_2_11(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


def _packed(heads, kv_heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, d = 2, 12, 8
    q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 5, 12, 15, 24], dtype=torch.int64)  # two samples per row; int64 as a user might pass
    return q, k, v, cu, 9


@pytest.mark.parametrize("release,reference", [("2.12+", _reference_varlen), ("2.11", _reference_2_11),
                                               ("2.10", _reference_2_10)])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_call_equals_the_mask_path(monkeypatch, release, reference, window, kv_heads):
    def ref(q, k, v, cu_q, cu_k, max_q, max_k, **kw):  # signature of the release under test
        return reference(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    ref.__signature__ = inspect.signature(reference)
    monkeypatch.setattr(A, "torch_varlen_attn", ref)
    A._varlen_params.cache_clear()
    try:
        q, k, v, cu, longest = _packed(4, kv_heads)
        expected = attention(q, k, v, causal_mask(12, segments=A.segment_ids(cu, 2, 12), window=window))
        with force_kernel("varlen"):
            if release == "2.10" and window is not None:
                assert not A.torch_varlen_supports(window)  # no window argument: the mask path runs instead
            got = attention(q, k, v, None, cu, longest, window)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    finally:
        A._varlen_params.cache_clear()


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _packed_step(config: dict | str, seqlen: int = 4096, layers: int | None = None) -> Shapes:
    cfg = load_model_config(config)
    if layers is not None:
        cfg.num_layers = layers
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)
    model.train()
    ids = torch.zeros(1, seqlen, dtype=torch.long, device="meta")
    cu = torch.tensor([0, 700, 1800, 2500, seqlen], dtype=torch.int32)  # a packed row, on the host
    with Shapes() as rec:
        logits = model(ids, cu_seqlens=cu, max_seqlen=1100)
        logits.float().sum().backward()
    return rec


def _square(rec: Shapes, seqlen: int) -> list:
    return [(f, s) for f, s in rec.shapes if sum(d == seqlen for d in s) >= 2]


@pytest.mark.parametrize("config", ["2.4b", "spark/13b"])
def test_big_shapes_run_varlen_without_any_s_by_s_tensor(config):
    calls = []
    real = A.torch_varlen_attn

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    spy.__signature__ = inspect.signature(real)
    A.torch_varlen_attn, saved = spy, A.torch_varlen_attn
    try:
        with force_kernel("varlen"):
            rec = _packed_step(config, layers=2)
    finally:
        A.torch_varlen_attn = saved
    cfg = load_model_config(config)
    gqa = cfg.num_kv_heads != cfg.num_heads
    assert len(calls) == 2 and all(kw.get("enable_gqa", False) == gqa for kw in calls)  # forward of each layer
    assert not _square(rec, 4096), _square(rec, 4096)[:3]
    window = cfg.sliding_window
    assert calls[0]["window_size"] == ((window - 1, 0) if window else (-1, 0))


def test_the_detector_sees_the_mask_path():
    # the same step through SDPA builds [1, 1, S, S] masks: the check above would catch a varlen path that fell back
    with force_kernel("sdpa"):
        rec = _packed_step("2.4b", layers=1)
    assert _square(rec, 4096)


def test_dragonfly_layer_forward_and_backward_on_meta_through_varlen():
    cfg = load_model_config("2.4b")
    cfg.num_layers = 1
    model = build_model(cfg, device="meta", dtype=torch.bfloat16).train()
    layer = model.encoder.layers[0]
    x = torch.randn(2, 256, cfg.dim_model, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 100, 256, 300, 512], dtype=torch.int32)
    with force_kernel("varlen"):
        mask, cu_dev, max_len = prepare_attention(2, 256, cu, 156, None, device=x.device, use_flash=True)
        assert mask is None and cu_dev.dtype == torch.int32 and max_len == 156
        cos, sin = model.rotary(torch.zeros(2, 256, dtype=torch.long, device="meta"))
        out = layer(x, cos, sin, mask, cu_dev, max_len)
        out.float().sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is not None for p in layer.parameters())


def test_dropout_goes_to_a_kernel_that_has_it():
    t = torch.empty(1, device="meta", dtype=torch.bfloat16)
    with force_kernel("varlen"):
        assert A.select_kernel(t, dropout_p=0.1) == "varlen"  # forced; attention() still skips varlen for dropout
    q, k, v, cu, longest = _packed(4, 2)
    torch.manual_seed(0)
    with force_kernel("varlen"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(A, "torch_varlen_attn", lambda *a, **kw: pytest.fail("varlen_attn has no dropout"))
            out = attention(q, k, v, None, cu, longest, None, dropout_p=0.5)
    assert out.shape == q.shape


def test_mask_window_builds_no_int64_square():
    with Shapes() as rec:
        causal_mask(64, window=8)
    assert [s for f, s in rec.shapes if s == (64, 64)]  # the boolean mask itself
    big_int = [f for f, s in rec.shapes if s == (64, 64) and "sub" in f]
    assert not big_int, rec.shapes


def test_mask_path_repeats_kv_for_gqa(monkeypatch):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], kw["enable_gqa"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", sdpa)
    q, k, v, cu, _ = _packed(4, 2)
    attention(q, k, v, causal_mask(12, segments=A.segment_ids(cu, 2, 12)))
    assert seen == [(4, 4, False)]


def test_a_large_mask_is_refused_on_a_gpu_with_the_fix():
    A.check_mask_size(4, 1024, torch.device("cuda"), torch.bfloat16)  # 8 MiB: fine
    A.check_mask_size(1, 32768, torch.device("cpu"), torch.bfloat16)  # CPU: no varlen kernel exists anyway
    with pytest.raises(RuntimeError, match=r"1 x 1 x 32768 x 32768 mask \(2\.0 GiB.*varlen_attn.*flash-attn"):
        A.check_mask_size(1, 32768, torch.device("cuda"), torch.bfloat16)


def test_the_kernel_is_logged_once(caplog):
    A._logged.clear()
    t = torch.empty(1)
    with caplog.at_level("INFO", logger="fm.nn.attention"):
        for _ in range(3):
            assert A.select_kernel(t) == "sdpa"
    assert [r.getMessage() for r in caplog.records] == ["attention kernel: sdpa (cpu, float32)"]
    with pytest.raises(ValueError, match="unknown attention kernel"):
        with force_kernel("flash"):
            pass


# ---------------------------------------------------------------------------------------- on a GPU (run.sh)
@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5])
def test_torch_varlen_kernel_matches_the_mask_path_on_cuda(window):
    if not A.torch_varlen_supports(window):
        pytest.skip(f"torch {torch.__version__}: no varlen_attn with a window")
    q, k, v, cu, longest = _packed(4, 2)
    q, k, v = (t.cuda().to(torch.bfloat16).repeat(1, 1, 1, 8) for t in (q, k, v))  # head dim 64
    with force_kernel("varlen"):
        got = attention(q, k, v, None, cu.to("cuda", torch.int32), longest, window)
    want = attention(q, k, v, causal_mask(12, segments=A.segment_ids(cu.cuda(), 2, 12), window=window,
                                          device=q.device))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
