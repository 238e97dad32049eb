"""``bmtrain.optim._function`` on the CPU backend: BMTrain 1.0.1's Adam kernels as torch ops.

Same signatures and argument checks as ``bmtrain/optim/_function.py``; each body computes what the
kernel it replaces computes, element by element in fp32, in the order of operations of the kernel's
plain (scalar) form:

* ``adam_fp16`` / ``adam_bf16``: ``adam_fp32_accum`` / ``adam_fp32_accum_bf16`` of
  ``csrc/cuda/adam_cuda.cu`` (fp16 keeps ``m`` in fp16 and ``v`` pre-multiplied by the loss scale;
  the low-precision copy is rounded to nearest, as ``__float2half``/``__float2bfloat16`` do);
* ``adam_cpu`` (``AdamOffloadOptimizer``): ``adam_cpu_0``/``adam_cpu_bf16_0`` of
  ``csrc/include/adam_cpu.hpp``, including its bf16 copy by truncation (``bf16_from_fp32_value``
  keeps the upper 16 bits) and the optional ``delta_info`` statistics;
* ``fp16_from_fp32`` / ``bf16_from_fp32``: the CPU casts of ``adam_cpu.hpp``.

Weight decay is decoupled in every kernel: ``p -= lr * (m̂ / (√v̂ + eps)) + lr * wd * p``, with the
decay applied to the parameter before the update.  (nvcc contracts the GPU kernels into FMAs, and the
offload kernel's AVX forms use FMAs too, so real fp32 results can differ from these in the last bit.)
"""

from __future__ import annotations

import numpy as np
import torch

CHECK_INPUT = lambda x: x.is_contiguous() and x.device.type == "cpu"  # noqa: E731 - as the original


def _f32(x: float) -> float:
    """A scalar as the kernel receives it (a C ``float``)."""
    return float(np.float32(x))


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrtf is correctly rounded; torch's fp32 sqrt on CPU is not always (1 ulp off for <1% of inputs).
    # A double sqrt rounded to fp32 is correctly rounded.
    return torch.sqrt(x.double()).float()


def _f32_sub(a: float, b: float) -> float:
    return float(np.float32(a) - np.float32(b))


def _f32_mul(a: float, b: float) -> float:
    return float(np.float32(a) * np.float32(b))


def bf16_from_fp32(param_fp32: torch.Tensor) -> torch.Tensor:
    return _bf16_truncate(param_fp32)


def fp16_from_fp32(param_fp32: torch.Tensor) -> torch.Tensor:
    return param_fp32.to(torch.float16)


def _bf16_truncate(x: torch.Tensor) -> torch.Tensor:
    """``bf16_from_fp32_value``: the upper half of the fp32 bit pattern (rounds toward zero)."""
    return torch.bitwise_right_shift(x.contiguous().view(torch.int32), 16).to(torch.int16).view(torch.bfloat16)


def _adam_update(p, m, v, g, beta1, beta2, eps, lr, weight_decay, bias_correction1, bias_correction2):
    """The common fp32 update of ``adam_cpu_0`` and ``adam_fp32_accum_bf16`` (``g`` already unscaled)."""
    b1, b2 = _f32(beta1), _f32(beta2)
    m_new = b1 * m + _f32_sub(1, beta1) * g
    v_new = b2 * v + _f32_sub(1, beta2) * g * g
    step = _f32(lr) * m_new / _f32(bias_correction1) / (_sqrt(v_new / _f32(bias_correction2)) + _f32(eps))
    p_new = p - step - _f32_mul(lr, weight_decay) * p
    return p_new, m_new, v_new


def adam_cpu(param_fp32: torch.Tensor, param_fp16: torch.Tensor, delta_info: torch.Tensor | None,
             g_fp16: torch.Tensor, m_fp32: torch.Tensor, v_fp32: torch.Tensor, beta1: float, beta2: float,
             eps: float, lr: float, scale: float, weight_decay: float, step: int) -> None:
    assert param_fp32.is_contiguous(), "param_fp32 must be contiguous"
    assert param_fp16.is_contiguous(), "param_fp16 must be contiguous"
    assert g_fp16.is_contiguous(), "g_fp16 must be contiguous"
    assert m_fp32.is_contiguous(), "m_fp32 must be contiguous"
    assert v_fp32.is_contiguous(), "v_fp32 must be contiguous"
    assert param_fp32.dtype == torch.float32, "param_fp32 must be float32 tensor"
    assert param_fp16.dtype in (torch.float16, torch.bfloat16), "param_fp16 must be float16/bfloat16 tensor"
    assert g_fp16.dtype in (torch.float16, torch.bfloat16), "g_fp16 must be float16/bfloat16 tensor"
    assert m_fp32.dtype == torch.float32, "m_fp32 must be float32 tensor"
    assert v_fp32.dtype == torch.float32, "v_fp32 must be float32 tensor"
    for t, name in ((param_fp32, "param_fp32"), (param_fp16, "param_fp16"), (g_fp16, "g_fp16"), (m_fp32, "m_fp32"),
                    (v_fp32, "v_fp32")):
        assert t.device == torch.device("cpu"), f"{name} must be a cpu tensor"
    n = param_fp32.numel()
    assert n == param_fp16.numel(), "param_fp32 and param_fp16 must have the same number of elements"
    assert n == g_fp16.numel(), "param_fp32 and g_fp16 must have the same number of elements"
    assert n == m_fp32.numel(), "param_fp32 and m_fp32 must have the same number of elements"
    assert n == v_fp32.numel(), "param_fp32 and v_fp32 must have the same number of elements"
    if delta_info is not None:
        assert delta_info.is_contiguous(), "delta_info must be contiguous"
        assert delta_info.dtype == torch.float32, "delta_info must be float32 tensor"
        assert delta_info.device == torch.device("cpu"), "delta_info must be a cpu tensor"
        assert delta_info.numel() == 4, "delta_info have a length of 4"
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    g = g_fp16.float() / _f32(scale)  # fp16 and bf16 widen to fp32 exactly
    p = param_fp32
    p_new, m_new, v_new = _adam_update(p, m_fp32, v_fp32, g, beta1, beta2, eps, lr, weight_decay,
                                       bias_correction1, bias_correction2)
    if delta_info is not None and n:
        delta = (m_new / _f32(bias_correction1) / (_sqrt(v_new / _f32(bias_correction2)) + _f32(eps))
                 + _f32(weight_decay) * p)
        s, sq = delta.sum(), (delta * delta).sum()
        delta_info.copy_(torch.stack([s / n, sq / n - s * s / (n * n), s, sq]))
    param_fp32.copy_(p_new)
    m_fp32.copy_(m_new)
    v_fp32.copy_(v_new)
    if param_fp16.dtype == torch.bfloat16:
        param_fp16.copy_(_bf16_truncate(p_new))
    else:
        param_fp16.copy_(p_new.to(torch.float16))


def adam_fp16(param_fp32: torch.Tensor, param_fp16: torch.Tensor, g_fp16: torch.Tensor, m_fp16: torch.Tensor,
              v_fp32: torch.Tensor, beta1: float, beta2: float, eps: float, lr: float, scale: float,
              weight_decay: float, step: int) -> None:
    assert CHECK_INPUT(param_fp32), "param_fp32 must be contiguous and on cuda"
    assert CHECK_INPUT(param_fp16), "param_fp16 must be contiguous and on cuda"
    assert CHECK_INPUT(g_fp16), "g_fp16 must be contiguous and on cuda"
    assert CHECK_INPUT(m_fp16), "m_fp32 must be contiguous and on cuda"
    assert CHECK_INPUT(v_fp32), "v_fp32 must be contiguous and on cuda"
    assert param_fp32.dtype == torch.float32, "param_fp32 must be float32 tensor"
    assert param_fp16.dtype == torch.float16, "param_fp16 must be float16 tensor"
    assert g_fp16.dtype == torch.float16, "g_fp16 must be float16 tensor"
    assert m_fp16.dtype == torch.float16, "m_fp16 must be float16 tensor"
    assert v_fp32.dtype == torch.float32, "v_fp32 must be float32 tensor"
    n = param_fp32.numel()
    assert n == param_fp16.numel(), "param_fp32 and param_fp16 must have the same number of elements"
    assert n == g_fp16.numel(), "param_fp32 and g_fp16 must have the same number of elements"
    assert n == m_fp16.numel(), "param_fp32 and m_fp32 must have the same number of elements"
    assert n == v_fp32.numel(), "param_fp32 and v_fp32 must have the same number of elements"
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if n <= 0:
        return
    # adam_fp32_accum: g, m and v carry the loss scale; v is divided by it once per step.
    s = _f32(scale)
    g = g_fp16.float()
    m = _f32(beta1) * m_fp16.float() + _f32_sub(1, beta1) * g
    v = _f32(beta2) * v_fp32 + _f32_sub(1, beta2) * g * g / s
    p = param_fp32
    step_ = _f32(lr) * m / _f32(bias_correction1) / (_sqrt(v * s / _f32(bias_correction2)) + _f32_mul(eps, s))
    p_new = p - step_ - _f32_mul(lr, weight_decay) * p
    param_fp16.copy_(p_new.to(torch.float16))
    param_fp32.copy_(p_new)
    v_fp32.copy_(v)
    m_fp16.copy_(m.to(torch.float16))


def adam_bf16(param_fp32: torch.Tensor, param_bf16: torch.Tensor, g_bf16: torch.Tensor, m_fp32: torch.Tensor,
              v_fp32: torch.Tensor, beta1: float, beta2: float, eps: float, lr: float, scale: float,
              weight_decay: float, step: int) -> None:
    assert CHECK_INPUT(param_fp32), "param_fp32 must be contiguous and on cuda"
    assert CHECK_INPUT(param_bf16), "param_bf16 must be contiguous and on cuda"
    assert CHECK_INPUT(g_bf16), "g_bf16 must be contiguous and on cuda"
    assert CHECK_INPUT(m_fp32), "m_fp32 must be contiguous and on cuda"
    assert CHECK_INPUT(v_fp32), "v_fp32 must be contiguous and on cuda"
    assert param_fp32.dtype == torch.float32, "param_fp32 must be float32 tensor"
    assert param_bf16.dtype == torch.bfloat16, "param_fp16 must be float16 tensor"
    assert g_bf16.dtype == torch.bfloat16, "g_bf16 must be bfloat16 tensor"
    assert m_fp32.dtype == torch.float32, "m_fp32 must be bfloat16 tensor"
    assert v_fp32.dtype == torch.float32, "v_fp32 must be float32 tensor"
    n = param_fp32.numel()
    assert n == param_bf16.numel(), "param_fp32 and param_bf16 must have the same number of elements"
    assert n == g_bf16.numel(), "param_fp32 and g_fp16 must have the same number of elements"
    assert n == m_fp32.numel(), "param_fp32 and m_m_fp32 must have the same number of elements"
    assert n == v_fp32.numel(), "param_fp32 and v_fp32 must have the same number of elements"
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if n <= 0:
        return
    g = g_bf16.float() / _f32(scale)
    p_new, m_new, v_new = _adam_update(param_fp32, m_fp32, v_fp32, g, beta1, beta2, eps, lr, weight_decay,
                                       bias_correction1, bias_correction2)
    param_bf16.copy_(p_new.to(torch.bfloat16))
    param_fp32.copy_(p_new)
    v_fp32.copy_(v_new)
    m_fp32.copy_(m_new)
