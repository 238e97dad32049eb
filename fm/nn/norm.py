"""Normalisation layers: RMSNorm (variance in fp32, as upstream dragonfly) and LayerNorm with bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight``.

    The variance is computed in fp32 and the normalised value is cast back to the input dtype
    *before* the weight multiply, exactly like upstream ``rms_layernorm`` (so bf16 checkpoints
    reproduce bit-for-bit on the same kernels).
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        if not self.weight.is_meta:
            self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with weight and (optional) bias; statistics are accumulated in fp32 by torch."""

    def __init__(
        self, dim: int, eps: float = 1e-5, bias: bool = True, *, device=None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None
        if not self.weight.is_meta:
            self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"
