"""Rotary position embedding, NeoX ``rotate_half`` layout, computed in fp32 from explicit positions.

Frequencies are the plain ``base^(-2i/dim)``, optionally rescaled the Llama-3 way (:class:`Llama3Scaling`,
transformers' ``rope_type: llama3``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's frequency rescaling: wavelengths above ``original_max_position_embeddings / low_freq_factor``
    are stretched by ``factor``, those below ``… / high_freq_factor`` kept, the band between interpolated
    (transformers' ``_compute_llama3_parameters``, step for step)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` tables ``[B, S, dim]`` (fp32) for ``position_ids [B, S]``.

    Nothing is cached in buffers: the tables are a few KB per step and recomputing them keeps the
    module free of state (meta-device build, ``to_empty`` and state-dict keys stay trivial). The
    arithmetic matches upstream's cached tables: ``pos(fp32) * inv_freq(fp32)`` then cos/sin.
    ``scaling``: Llama-3 frequency rescaling, or None.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: Llama3Scaling | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.base = float(base)
        self.scaling = scaling

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        return inv_freq if self.scaling is None else self.scaling.apply(inv_freq)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq(position_ids.device)  # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, dim]
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}" + (f", scaling={self.scaling}" if self.scaling else "")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, S, H, D]`` by fp32 tables ``cos, sin [B, S, D]``; result in ``x.dtype``."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
