"""The LM head and cross-entropy in one, over chunks of tokens: never the full-vocabulary logits at once.

``F.cross_entropy(F.linear(h, W).float(), t)`` holds ``N x V`` logits in the model dtype, their fp32 copy, the
log-softmax and, in backward, its gradient: at vocabulary 122,753 and 4,096 tokens that is gigabytes per
micro-batch. :func:`linear_cross_entropy` computes the same per-token losses ``chunk`` rows at a time, keeping only
each row's log-sum-exp, and recomputes each chunk's logits in backward (the way torchtitan's chunked loss and
OLMo-core's fused linear cross-entropy do). The arithmetic is the full path's: logits in the dtype of ``h`` and
``W``, softmax in fp32, the gradient of the logits cast back to that dtype before the two matmuls.

z-loss (PaLM, OLMo): ``z_loss * logsumexp(logits)^2`` per target token, which keeps the softmax normaliser near 1
(the logits from drifting). The chunked path has each row's log-sum-exp already; its gradient with respect to the
logits is ``2 * z_loss * lse * softmax``, added in the same pass of the backward. :func:`z_loss_terms` is the same
term on full logits (the engines' path, ``loss_chunk`` 0).
"""

from __future__ import annotations

from typing import Any

import torch

from fm.constants import IGNORE_INDEX


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            t = targets[s:s + chunk]
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss[s:s + chunk] = torch.where(t != IGNORE_INDEX, lse[s:s + chunk] - picked, 0.0)
        z = torch.where(targets != IGNORE_INDEX, z_loss * lse.square(), 0.0) if z_loss else torch.zeros_like(lse)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.z_loss = chunk, z_loss
        ctx.mark_non_differentiable(*(() if z_loss else (z,)))
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z: torch.Tensor | None):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with_z = bool(ctx.z_loss) and grad_z is not None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            valid = t != IGNORE_INDEX
            g = torch.where(valid, grad_loss[s:s + ctx.chunk].float(), 0.0)
            # d loss / d logits = (softmax - onehot(target)) * g, computed in place on the recomputed logits; with
            # z-loss, d (z * lse^2) / d logits = 2 * z * lse * softmax joins the softmax's factor
            gs = g
            if with_z:
                gs = g + torch.where(valid, 2.0 * ctx.z_loss * lse[s:s + ctx.chunk] * grad_z[s:s + ctx.chunk].float(),
                                     0.0)
            grad_logits = (h @ weight.t()).float().sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(gs[:, None])
            grad_logits.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -g.unsqueeze(1))
            grad_logits = grad_logits.to(hidden.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = grad_logits @ weight
            if want_w:
                grad_w += (grad_logits.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024, z_loss: float | None = None) -> Any:
    """Per-token ``cross_entropy(hidden @ weight.T, targets)`` in fp32, ``[N]``, 0 where the target is -100.

    ``hidden [..., D]`` (flattened to ``[N, D]``), ``weight [V, D]`` (the LM head, or the tied embedding),
    ``targets`` with ``N`` elements. At most ``chunk`` rows of logits exist at a time, in forward and backward.

    With ``z_loss`` (a coefficient, 0 allowed) it returns ``(cross-entropy [N], z-loss [N])``, the second
    ``z_loss * logsumexp(logits)^2`` per token (0 where the target is -100), both differentiable: a caller sums
    them into the loss it backpropagates."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if z_loss is not None and z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    ce, z = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk,
                                      float(z_loss or 0.0))
    return ce if z_loss is None else (ce, z)


def z_loss_terms(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Per-token ``z_loss * logsumexp(logits)^2`` in fp32, ``[N]``, 0 where the target is -100: the full-logits form
    (``logits [..., V]``, ``targets`` with ``N`` elements) of what :func:`linear_cross_entropy` computes per chunk."""
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    return torch.where(targets.reshape(-1) != IGNORE_INDEX, z_loss * lse.square(), 0.0)
