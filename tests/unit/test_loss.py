"""The LM head and cross-entropy in chunks (fm.nn.loss) against the full-logits path: F.linear + F.cross_entropy on
fp32 logits, per token, with their gradients; inside the models (tied head, muP's head scaling, an untied head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm.models.registry import build_model, load_model_config
from fm.nn.loss import linear_cross_entropy
from tests.helpers import TINY_MODEL


def _full(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100, reduction="none")


def _case(n=37, d=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[[0, 5, 6, 36]] = -100  # ignored, at a chunk's start and end too
    weights = torch.rand(n, generator=g)  # an arbitrary upstream gradient per token, not only a mean
    return h, w, t, weights


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_losses_and_gradients_equal_the_full_logits(chunk):
    h, w, t, weights = _case()
    ref = _full(h, w, t)
    (ref * weights).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk)
    (got * weights).sum().backward()
    assert got.dtype == torch.float32 and torch.equal(got[t == -100], torch.zeros(4))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-6)


def test_bf16_rounds_as_the_full_path():
    h, w, t, weights = _case(dtype=torch.bfloat16)
    ref = _full(h, w, t)
    (ref * weights).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, 8)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # same bf16 logits, same fp32 softmax
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad, ref_gh, rtol=2e-2, atol=1e-3)  # w's grad: chunk sums in fp32, then rounded
    torch.testing.assert_close(w.grad, ref_gw, rtol=2e-2, atol=1e-3)


def test_a_non_finite_hidden_state_gives_nan_not_an_error():
    h, w, t, _ = _case()
    h = h.detach().clone()
    h[3] = float("inf")
    got = linear_cross_entropy(h, w.detach(), t, 8)
    assert not torch.isfinite(got[3]) and torch.isfinite(got[7])


def test_chunk_must_be_positive():
    h, w, t, _ = _case()
    with pytest.raises(ValueError, match="chunk must be positive"):
        linear_cross_entropy(h, w, t, 0)


@pytest.mark.parametrize("overrides", [{"tie_lm_head": True, "scale": True}, {"tie_lm_head": False, "scale": True},
                                       {"tie_lm_head": True, "scale": False}], ids=["tied-mup", "untied-mup", "tied"])
def test_model_targets_equal_the_logits_path(overrides):
    torch.manual_seed(0)
    model = build_model(load_model_config({**TINY_MODEL, **overrides}), device="cpu")
    ids = torch.randint(0, 8000, (2, 24))
    targets = torch.randint(0, 8000, (2, 24))
    targets[0, :5] = -100
    cu = torch.tensor([0, 10, 24, 30, 48], dtype=torch.int32)
    ref = F.cross_entropy(model(ids, cu_seqlens=cu, max_seqlen=18).flatten(0, 1).float(), targets.reshape(-1),
                          ignore_index=-100, reduction="none")
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = model(ids, cu_seqlens=cu, max_seqlen=18, targets=targets, loss_chunk=7)
    got.sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        # fp32 sums in another order: within 1e-5 of the gradient's own scale
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=0, atol=1e-5 * scale, msg=n)


def test_an_engine_subclassed_head_still_takes_the_chunked_path(monkeypatch):
    # BMTrain turns every module into a subclass of its class (lm_head: a DistributedLinear); only an adapter that
    # replaced the head (PEFT LoRA) sends the loss through the full logits
    import fm.models.decoder as decoder

    model = build_model(load_model_config({**TINY_MODEL, "tie_lm_head": False}), device="cpu")
    model.lm_head.__class__ = type("DistributedLinear", (torch.nn.Linear,), {})
    calls = []
    monkeypatch.setattr(decoder, "linear_cross_entropy", lambda *a: calls.append(a) or torch.zeros(8))
    ids = torch.randint(0, 8000, (1, 8))
    model(ids, targets=ids, loss_chunk=4)
    assert len(calls) == 1 and calls[0][1] is model.lm_head.weight
    model.lm_head = torch.nn.Sequential(model.lm_head)  # what an adapter looks like: no longer an nn.Linear
    model(ids, targets=ids, loss_chunk=4)
    assert len(calls) == 1


def test_spark_model_targets_equal_the_logits_path(repo_root):
    torch.manual_seed(0)
    model = build_model(load_model_config(repo_root / "apps" / "spark_13b" / "model_configs" / "tiny.json"),
                        device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    targets = torch.roll(ids, -1, 1)
    ref = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.reshape(-1), reduction="none")
    got = model(ids, targets=targets, loss_chunk=6)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_a_full_vocabulary_never_exists_at_once():
    # the point of it: logits of at most `chunk` rows, in forward and in backward
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 5000:
                    Largest.biggest = max(Largest.biggest, t.shape[0])
            return out

    h = torch.randn(300, 8, requires_grad=True)
    w = torch.randn(5000, 8, requires_grad=True)
    t = torch.randint(0, 5000, (300,))
    with Largest():
        linear_cross_entropy(h, w, t, 64).sum().backward()
    assert Largest.biggest == 64


@pytest.mark.gpu
def test_bf16_on_cuda_equals_the_full_logits():
    h, w, t, weights = _case(n=300, d=64, v=5000, dtype=torch.bfloat16)
    h, w = (x.detach().cuda().requires_grad_() for x in (h, w))
    t, weights = t.cuda(), weights.cuda()
    ref = _full(h, w, t)
    (ref * weights).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, 64)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(w.grad, ref_gw, rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------ z-loss
def _z_ref(logits, t, coef):
    """PaLM's z-loss written out: ``coef * log(sum(exp(logits)))^2`` per target token, 0 where ignored."""
    lse = logits.float().exp().sum(-1).log()
    return torch.where(t != -100, coef * lse * lse, torch.zeros_like(lse))


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_z_loss_and_its_gradient_equal_the_formula(chunk):
    h, w, t, weights = _case()
    zw = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(1))  # the z terms' own upstream gradient
    coef = 0.3  # large, so a wrong gradient term shows
    logits = F.linear(h, w)
    ref_ce, ref_z = _full(h, w, t), _z_ref(logits, t, coef)
    ((ref_ce * weights).sum() + (ref_z * zw).sum()).backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ce, z = linear_cross_entropy(h, w, t, chunk, coef)
    ((ce * weights).sum() + (z * zw).sum()).backward()
    assert torch.equal(z[t == -100], torch.zeros(4)) and z.dtype == torch.float32
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-6)


def test_z_loss_zero_gives_the_plain_loss_and_gradient():
    h, w, t, weights = _case()
    (linear_cross_entropy(h, w, t, 8) * weights).sum().backward()
    plain = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ce, z = linear_cross_entropy(h, w, t, 8, 0.0)
    ((ce * weights).sum() + z.sum()).backward()
    assert not z.any() and torch.equal(h.grad, plain[0]) and torch.equal(w.grad, plain[1])
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        linear_cross_entropy(h, w, t, 8, -1.0)


def test_full_logits_z_loss_and_its_gradient_equal_the_formula():
    # the engines' path (loss_chunk 0): Engine.z_loss on the full logits, here the fsdp engine's
    from fm.distributed.fsdp import FSDPEngine

    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 9, 50, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 50, (2, 9), generator=g)
    t[0, :3] = -100
    weights = torch.rand(18, generator=g)
    (_z_ref(logits.reshape(-1, 50), t.reshape(-1), 0.3) * weights).sum().backward()
    ref = logits.grad.clone()
    logits.grad = None
    got = FSDPEngine().z_loss(logits, t, 0.3)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, _z_ref(logits.reshape(-1, 50), t.reshape(-1), 0.3).detach(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(logits.grad, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_model_z_loss_equals_the_logits_path(tied):
    torch.manual_seed(0)
    model = build_model(load_model_config({**TINY_MODEL, "tie_lm_head": tied}), device="cpu")
    ids = torch.randint(0, 8000, (2, 12))
    targets = torch.randint(0, 8000, (2, 12))
    targets[1, :4] = -100
    logits = model(ids)
    ref = (F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), reduction="none"),
           _z_ref(logits.flatten(0, 1), targets.reshape(-1), 1e-2))
    (ref[0].sum() + ref[1].sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ce, z = model(ids, targets=targets, loss_chunk=7, z_loss=1e-2)
    (ce.sum() + z.sum()).backward()
    torch.testing.assert_close(ce, ref[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, ref[1].detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_an_adapted_head_takes_the_z_loss_through_the_full_logits():
    # a head an adapter replaced (PEFT LoRA: no longer an nn.Linear) computes the loss on the full logits: z too
    torch.manual_seed(0)
    model = build_model(load_model_config({**TINY_MODEL, "tie_lm_head": False}), device="cpu")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    ids = torch.randint(0, 8000, (1, 10))
    targets = torch.randint(0, 8000, (1, 10))
    targets[0, :3] = -100
    with torch.no_grad():
        ce, z = model(ids, targets=targets, loss_chunk=4, z_loss=0.5)
        logits = model(ids).flatten(0, 1)
    torch.testing.assert_close(z, _z_ref(logits, targets.reshape(-1), 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, F.cross_entropy(logits.float(), targets.reshape(-1), reduction="none"))
