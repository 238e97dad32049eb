"""Layers: norms, rotary, attention (varlen, GQA, sliding window, KV cache), gated MLP."""

from fm.nn.attention import Attention, attention, causal_mask, prepare_attention
from fm.nn.kv_cache import KVCache
from fm.nn.mlp import GatedMLP
from fm.nn.norm import LayerNorm, RMSNorm
from fm.nn.rotary import RotaryEmbedding, apply_rotary, rotate_half

__all__ = [
    "Attention",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "attention",
    "causal_mask",
    "prepare_attention",
    "rotate_half",
]
