"""iFlytekSpark-13B as a plain single-device nn.Module.

40 pre-LN layers, hidden 5120, 40 heads × 128 (MHA), vocab 60000, tied head, LayerNorm (weight +
bias, eps 1e-5) and a final LayerNorm, biases on every linear, RoPE base 1e6 (NeoX, all 128
dims), causal sliding window 8192 in every layer, gated GELU (exact erf) FFN 5120 → 2×14336 →
5120. No embedding scaling, no muP (``scale_width`` is 1).

State-dict keys (``{i}`` = layer)::

    input_embedding.weight
    encoder.layers.{i}.input_layernorm.{weight,bias}
    encoder.layers.{i}.self_attention.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}
    encoder.layers.{i}.post_attention_layernorm.{weight,bias}
    encoder.layers.{i}.mlp.fc0.{weight,bias}     gate  [14336, 5120]
    encoder.layers.{i}.mlp.fc1.{weight,bias}     up    [14336, 5120]
    encoder.layers.{i}.mlp.fc2.{weight,bias}     down  [5120, 14336]
    encoder.output_layernorm.{weight,bias}
    lm_head.weight                               only when tie_lm_head is false

The released Megatron-DeepSpeed checkpoints convert to these keys with ``fm import-spark``
(:mod:`fm.export.spark_import`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fm.models.config import DTYPES, config_to_dict, positive_sizes, raise_problems, resolve_dtype
from fm.models.decoder import DecoderLM, residual
from fm.nn.attention import Attention
from fm.nn.kv_cache import KVCache
from fm.nn.mlp import GatedMLP
from fm.nn.norm import LayerNorm

SPARK_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")
SPARK_MLP_NAMES = ("fc0", "fc1", "fc2")

# Canonical (unsharded Megatron) parameter name → our state-dict key; used by the checkpoint
# importer (fm.export.spark_import) so that the model module alone owns its key layout.
MEGATRON_TO_SPARK: dict[str, str] = {
    "embed.weight": "input_embedding.weight",
    "final_ln.weight": "encoder.output_layernorm.weight",
    "final_ln.bias": "encoder.output_layernorm.bias",
    **{
        f"layers.{{i}}.{canon}.{kind}": f"encoder.layers.{{i}}.{ours}.{kind}"
        for canon, ours in {
            "ln1": "input_layernorm",
            "q": "self_attention.q_proj",
            "k": "self_attention.k_proj",
            "v": "self_attention.v_proj",
            "o": "self_attention.out_proj",
            "ln2": "post_attention_layernorm",
            "gate": "mlp.fc0",
            "up": "mlp.fc1",
            "down": "mlp.fc2",
        }.items()
        for kind in ("weight", "bias")
    },
}


@dataclass
class SparkConfig:
    vocab_size: int = 60000
    dim_model: int = 5120
    dim_ff: int = 14336
    dim_head: int = 128
    num_heads: int = 40
    num_kv_heads: int = 40
    num_layers: int = 40
    activate_fn: Literal["gelu", "gelu_tanh", "silu"] = "gelu"
    eps: float = 1e-5
    base: float = 1000000.0
    sliding_window: int | None = 8192
    tie_lm_head: bool = True
    init_std: float = 0.02
    dropout_p: float = 0.0
    max_length: int = 32768
    dtype: str = "bf16"
    model_family: Literal["spark"] = "spark"
    model_type: str = "iflytekspark"
    architectures: list[str] = field(default_factory=list)
    source: str = field(default="<dict>", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads == -1:
            self.num_kv_heads = self.num_heads
        raise_problems([
            *positive_sizes(self),
            (self.num_kv_heads > 0 and self.num_heads % max(self.num_kv_heads, 1) == 0,
             f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"),
            (self.dim_head % 2 == 0, f"dim_head={self.dim_head} must be even (rotary)"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null"),
            (self.dtype.lower() in DTYPES, f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}"),
        ])

    scale = False
    scale_width = 1.0

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.source)

    def to_dict(self) -> dict:
        return config_to_dict(self)


class SparkLayer(nn.Module):
    """``layer(hidden, cos, sin, mask, cu_seqlens, max_seqlen, kv_cache) -> hidden`` (pre-LN)."""

    def __init__(self, config: SparkConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.dropout_p = config.dropout_p
        self.input_layernorm = LayerNorm(config.dim_model, config.eps, dtype=dtype)
        self.self_attention = Attention(
            config.dim_model,
            config.num_heads,
            config.num_kv_heads,
            config.dim_head,
            qkv_bias=True,
            out_bias=True,
            window=config.sliding_window,
            names=SPARK_ATTN_NAMES,
            init_std=config.init_std,
            dropout_p=config.dropout_p,
            layer_idx=layer_idx,
            dtype=dtype,
        )
        self.post_attention_layernorm = LayerNorm(config.dim_model, config.eps, dtype=dtype)
        self.mlp = GatedMLP(
            config.dim_model,
            config.dim_ff,
            config.activate_fn,
            bias=True,
            names=SPARK_MLP_NAMES,
            init_std=config.init_std,
            dropout_p=config.dropout_p,
            dtype=dtype,
        )

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.input_layernorm.init_weights()
        self.self_attention.init_weights(generator)
        self.post_attention_layernorm.init_weights()
        self.mlp.init_weights(generator)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.self_attention(self.input_layernorm(hidden_states), cos, sin, mask, cu_seqlens, max_seqlen, kv_cache)
        hidden_states = residual(hidden_states, x, self.dropout_p, self.training)
        return residual(hidden_states, self.mlp(self.post_attention_layernorm(hidden_states)), self.dropout_p,
                        self.training)


class Spark(DecoderLM):
    """Same call contract as :class:`fm.models.dragonfly.Dragonfly`; no muP factors."""

    layer_cls = SparkLayer
    norm_cls = LayerNorm

    def __init__(self, config: SparkConfig, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, device=device, dtype=dtype)
