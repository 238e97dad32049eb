"""Rotary position embedding, NeoX ``rotate_half`` layout, computed in fp32 from explicit positions."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` tables ``[B, S, dim]`` (fp32) for ``position_ids [B, S]``.

    Nothing is cached in buffers: the tables are a few KB per step and recomputing them keeps the
    module free of state (meta-device build, ``to_empty`` and state-dict keys stay trivial). The
    arithmetic matches upstream's cached tables: ``pos(fp32) * inv_freq(fp32)`` then cos/sin.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.base = float(base)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq(position_ids.device)  # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, dim]
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by fp32 tables ``cos, sin [B, S, D]``; result in ``x.dtype``."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
