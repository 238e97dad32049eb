"""``bmtrain.loss._function`` on the CPU backend: BMTrain 1.0.1's loss and overflow kernels as torch ops.

Same signatures and argument checks as ``bmtrain/loss/_function.py``; each body computes what its
kernel in ``csrc/cuda/cross_entropy.cu`` / ``has_inf_nan.cu`` computes, in fp32:

* ``cross_entropy_forward``: per row ``max = max(x, -1e6)``, ``sum = Σ exp(x - max) + 1e-10``,
  ``softmax = exp(x - max) / sum`` stored in the input dtype, loss ``-x[t] + max + log(sum)`` (0 for
  ``ignore_index``);
* ``cross_entropy_backward_inplace``: ``x ← (x - [i = t]) · grad`` in place;
* ``fused_sumexp`` / ``fused_softmax_inplace``: the two halves of the vocab-parallel loss;
* ``has_inf_nan``: sets ``out`` to 1 when any element is inf or nan (never back to 0).
"""

from __future__ import annotations

import torch

CHECK_INPUT = lambda x: x.is_contiguous() and x.device.type == "cpu"  # noqa: E731 - as the original
_HALF = (torch.float16, torch.bfloat16)


def has_inf_nan(g_half: torch.Tensor, out: torch.Tensor) -> None:
    assert out.dtype == torch.uint8, "out must be a uint8 tensor"
    assert CHECK_INPUT(g_half), "g_fp16 must be contiguous and on cuda"
    assert CHECK_INPUT(out), "out must be contiguous and on cuda"
    if g_half.dtype not in _HALF:
        raise ValueError(f"has_inf_nan not supported for dtype {g_half.dtype}")
    if g_half.numel() <= 0:
        return
    found = (~torch.isfinite(g_half)).any().to(torch.uint8)
    out.copy_(torch.maximum(out, found))  # on the device: no host sync, as the kernel


def _check_half(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _HALF:
        raise ValueError(f"{what} not supported for dtype {t.dtype}")


def cross_entropy_forward(m: int, n: int, input: torch.Tensor, target: torch.Tensor, softmax: torch.Tensor,
                          output: torch.Tensor, ignore_index: int) -> None:
    CHECK_INPUT(input)
    CHECK_INPUT(target)
    CHECK_INPUT(softmax)
    CHECK_INPUT(output)
    assert target.dtype == torch.int32, "target must be an int tensor"
    assert output.dtype == torch.float32, "output must be a float tensor"
    assert input.numel() == softmax.numel(), "input and softmax must have the same number of elements"
    assert target.numel() == output.numel(), "target and output must have the same number of elements"
    _check_half(input, "cross_entropy_forward")
    x = input.reshape(m, n).float()
    row_max = torch.clamp_min(x.max(dim=1).values, -1e6)
    e = torch.exp(x - row_max[:, None])
    row_sum = e.sum(dim=1) + 1e-10
    softmax.view(m, n).copy_((e / row_sum[:, None]).to(softmax.dtype))
    t = target.reshape(m).long()
    keep = t != ignore_index
    picked = x.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
    loss = -picked + row_max + torch.log(row_sum)
    output.view(m).copy_(torch.where(keep, loss, torch.zeros_like(loss)))


def cross_entropy_backward_inplace(m: int, n: int, grad_output: torch.Tensor, target: torch.Tensor,
                                   x: torch.Tensor, ignore_index: int) -> None:
    CHECK_INPUT(grad_output)
    CHECK_INPUT(target)
    CHECK_INPUT(x)
    assert grad_output.dtype == torch.float32, "grad_output must be a float tensor"
    assert target.dtype == torch.int32, "target must be an int tensor"
    assert target.numel() == grad_output.numel(), "target and grad_output must have the same number of elements"
    _check_half(x, "cross_entropy_backward")
    del ignore_index  # the kernel compares column indices with the target; -100 matches none
    xs = x.view(m, n)
    t = target.reshape(m).long()
    v = grad_output.reshape(m)
    hit = torch.arange(n)[None, :] == t[:, None]
    xf = xs.float()
    xs.copy_(torch.where(hit, (xf - 1) * v[:, None], xf * v[:, None]).to(x.dtype))


def fused_sumexp(logits: torch.Tensor, max_logits: torch.Tensor) -> torch.Tensor:
    CHECK_INPUT(logits)
    CHECK_INPUT(max_logits)
    assert max_logits.dtype == torch.float32, "max_logits must be float tensor"
    assert max_logits.size(0) == logits.size(0), "max_logits must have same size(0) as logits"
    _check_half(logits, "fused_sumexp")
    return torch.exp(logits.float() - max_logits[:, None]).sum(dim=1)


def fused_softmax_inplace(logits: torch.Tensor, max_logits: torch.Tensor, sum_exp_logits: torch.Tensor) -> None:
    CHECK_INPUT(logits)
    CHECK_INPUT(max_logits)
    CHECK_INPUT(sum_exp_logits)
    assert max_logits.dtype == torch.float32, "max_logits must be float tensor"
    assert sum_exp_logits.dtype == torch.float32, "sum_exp_logits must be float tensor"
    assert max_logits.size(0) == logits.size(0), "max_logits must have same size(0) as logits"
    assert sum_exp_logits.size(0) == logits.size(0), "sum_exp_logits must have same size(0) as logits"
    _check_half(logits, "fused_softmax_inplace")
    e = torch.exp(logits.float() - max_logits[:, None]) / sum_exp_logits[:, None]
    logits.copy_(e.to(logits.dtype))
