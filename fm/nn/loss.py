"""The LM head and cross-entropy in one, over chunks of tokens: never the full-vocabulary logits at once.

``F.cross_entropy(F.linear(h, W).float(), t)`` holds ``N x V`` logits in the model dtype, their fp32 copy, the
log-softmax and, in backward, its gradient: at vocabulary 122,753 and 4,096 tokens that is gigabytes per
micro-batch. :func:`linear_cross_entropy` computes the same per-token losses ``chunk`` rows at a time, keeping only
each row's log-sum-exp, and recomputes each chunk's logits in backward (the way torchtitan's chunked loss and
OLMo-core's fused linear cross-entropy do). The arithmetic is the full path's: logits in the dtype of ``h`` and
``W``, softmax in fp32, the gradient of the logits cast back to that dtype before the two matmuls.
"""

from __future__ import annotations

import torch

from fm.constants import IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            t = targets[s:s + chunk]
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss[s:s + chunk] = torch.where(t != IGNORE_INDEX, lse[s:s + chunk] - picked, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            g = torch.where(t != IGNORE_INDEX, grad_loss[s:s + ctx.chunk].float(), 0.0)
            # d loss / d logits = (softmax - onehot(target)) * g, computed in place on the recomputed logits
            grad_logits = (h @ weight.t()).float().sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(g[:, None])
            grad_logits.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -g.unsqueeze(1))
            grad_logits = grad_logits.to(hidden.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = grad_logits @ weight
            if want_w:
                grad_w += (grad_logits.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Per-token ``cross_entropy(hidden @ weight.T, targets)`` in fp32, ``[N]``, 0 where the target is -100.

    ``hidden [..., D]`` (flattened to ``[N, D]``), ``weight [V, D]`` (the LM head, or the tied embedding),
    ``targets`` with ``N`` elements. At most ``chunk`` rows of logits exist at a time, in forward and backward."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk)
