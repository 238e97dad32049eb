"""dragonfly: the FM9G 2.4B model (MiniCPM lineage, muP), as a plain single-device nn.Module.

Reads top to bottom: config → blocks → model. Module names reproduce upstream's BMTrain state
dict (``encoder.layers.{i}.self_att.self_attention.project_q.weight`` …) so an upstream ``.pt``
loads with ``strict=True``. With ``scale: false`` (and ``scale_depth`` ≤ 0) the same code is a
plain llama-family model (RMSNorm, SwiGLU, RoPE, GQA, untied head).

muP, exactly as upstream:
* embeddings × ``scale_emb``;
* each residual branch × ``scale_depth / sqrt(num_layers)`` (upstream applies this whenever
  ``scale_depth > 0``, independently of ``scale``; so do we);
* logits = ``(h / scale_width) @ Eᵀ`` with ``scale_width = dim_model / dim_model_base``;
* init: N(0, init_std²) for the embedding (and an untied ``lm_head``), N(0, init_std²/scale_width)
  for the hidden matrices, 1 for norm weights, 0 for biases;
* optimizer lr of hidden matrices = lr / scale_width (:func:`fm.models.registry.mup_scaled_param_names`).

Beyond upstream (the open families ``fm import`` maps here, :mod:`fm.export.families`): ``qk_norm`` (per-head
RMSNorm of q and k before the rotation, Qwen3), ``rope_scaling_type: "llama3"`` (Llama 3.1 frequency rescaling,
with ``rope_scaling_factor`` and the three ``rope_*`` keys below), ``sliding_window`` (Mistral) and ``hf_model_type``
(the Hugging Face family a checkpoint was imported from, which ``fm export`` writes back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fm.models.config import DTYPES, config_to_dict, positive_sizes, raise_problems, resolve_dtype
from fm.models.decoder import DecoderLM, residual
from fm.nn.attention import DRAGONFLY_NAMES, Attention
from fm.nn.kv_cache import KVCache
from fm.nn.mlp import GatedMLP
from fm.nn.norm import RMSNorm
from fm.nn.rotary import Llama3Scaling


@dataclass
class DragonflyConfig:
    """Keys of upstream ``model_configs/*.json`` (all accepted) plus ours (``sliding_window``, ``model_family``,
    the ``rope_*`` keys of Llama-3 scaling, ``hf_model_type``)."""

    vocab_size: int = 122753
    dim_model: int = 4096
    dim_ff: int = 11008
    dim_head: int = 128
    num_heads: int = 32
    num_kv_heads: int = 32  # -1 (upstream) means num_heads
    num_layers: int = 32
    activate_fn: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    eps: float = 1e-5
    init_std: float = 0.02
    scale: bool = False
    scale_emb: float = 1.0
    scale_depth: float = -1.0
    dim_model_base: int = 256
    tie_lm_head: bool = False
    base: float = 10000.0
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm (eps) of each head's q and k before rotary, weights q_norm / k_norm (Qwen3)
    dropout_p: float = 0.0
    sliding_window: int | None = None
    max_length: int = 8192  # the context length an export declares (upstream dragonfly's default)
    dtype: str | None = None  # default: half_type when half, else fp32
    half: bool = True
    half_type: str = "bf16"
    model_family: Literal["dragonfly"] = "dragonfly"
    # informational upstream keys (engine / launcher concerns, or always-on here)
    use_flash_attn: bool = True
    flash_attn_mask_shape: str = "1d"
    model_type: str = "fm9g"
    architectures: list[str] = field(default_factory=list)
    ffn_gated: bool = True
    ori_max_length: int | None = None
    orig_max_length: int | None = None
    use_checkpoint: bool | None = None
    tp: int = 0
    pose_prob: float = 0.0
    pose_scaling_factor: float = 1.0
    rope_scaling_type: str = ""  # "" (none) or "llama3"
    rope_scaling_factor: float = 1.0  # llama3: the factor long wavelengths are stretched by
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_max_length / this are stretched
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_max_length / this are kept
    rope_original_max_length: int = 8192  # llama3: the context the model was pretrained with
    hf_model_type: str | None = None  # the Hugging Face family it was imported from (fm export writes it back)
    source: str = field(default="<dict>", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads == -1:
            self.num_kv_heads = self.num_heads
        dtype = self.dtype or self.half_type
        raise_problems([
            *positive_sizes(self),
            (
                self.num_kv_heads > 0 and self.num_heads % max(self.num_kv_heads, 1) == 0,
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
            ),
            (self.dim_head % 2 == 0, f"dim_head={self.dim_head} must be even (rotary)"),
            (self.ffn_gated, "ffn_gated=false is not supported: dragonfly's FFN is gated (remove the key)"),
            (
                self.rope_scaling_type in ("", "llama3"),
                f'rope_scaling_type {self.rope_scaling_type!r} is not implemented: use "" (none) or "llama3"',
            ),
            (
                self.rope_scaling_type == "llama3" or self.rope_scaling_factor == 1.0,
                'rope_scaling_factor applies to rope_scaling_type "llama3" only: leave it 1 or set the type',
            ),
            (
                self.rope_scaling_type != "llama3"
                or (self.rope_scaling_factor > 0 and self.rope_original_max_length > 0
                    and self.rope_high_freq_factor > self.rope_low_freq_factor > 0),
                "llama3 rope scaling needs rope_scaling_factor > 0, rope_original_max_length > 0 and "
                "rope_high_freq_factor > rope_low_freq_factor > 0",
            ),
            (self.pose_prob == 0.0, "PoSE is not implemented: leave pose_prob 0"),
            (self.tp in (0, 1), f"tp={self.tp}: tensor parallelism is not supported (use 0)"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null"),
            (self.dim_model_base > 0, "dim_model_base must be positive"),
            (dtype.lower() in DTYPES, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}"),
        ])

    @property
    def rope_scaling(self) -> Llama3Scaling | None:
        if self.rope_scaling_type != "llama3":
            return None
        return Llama3Scaling(self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                             self.rope_original_max_length)

    @property
    def scale_width(self) -> float:
        return self.dim_model / self.dim_model_base if self.scale else 1.0

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_layers) if self.scale_depth > 0 else 1.0

    @property
    def hidden_init_std(self) -> float:
        return self.init_std / math.sqrt(self.scale_width) if self.scale else self.init_std

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return resolve_dtype(self.dtype, self.source)
        return resolve_dtype(self.half_type, self.source) if self.half else torch.float32

    def to_dict(self) -> dict:
        return config_to_dict(self)


# ----------------------------------------------------------------------------------------------
# blocks (names = upstream BMTrain module names)
# ----------------------------------------------------------------------------------------------


class SelfAttentionBlock(nn.Module):
    def __init__(self, config: DragonflyConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.residual_scale = config.residual_scale
        self.dropout_p = config.dropout_p
        self.layernorm_before_attention = RMSNorm(config.dim_model, config.eps, dtype=dtype)
        self.self_attention = Attention(
            config.dim_model,
            config.num_heads,
            config.num_kv_heads,
            config.dim_head,
            qkv_bias=config.qkv_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.eps,
            window=config.sliding_window,
            names=DRAGONFLY_NAMES,
            init_std=config.hidden_init_std,
            dropout_p=config.dropout_p,
            layer_idx=layer_idx,
            dtype=dtype,
        )

    def forward(self, hidden_states, cos, sin, mask=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        x = self.layernorm_before_attention(hidden_states)
        x = self.self_attention(x, cos, sin, mask, cu_seqlens, max_seqlen, kv_cache)
        return residual(hidden_states, x, self.dropout_p, self.training, self.residual_scale)


class FFNBlock(nn.Module):
    def __init__(self, config: DragonflyConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.residual_scale = config.residual_scale
        self.dropout_p = config.dropout_p
        self.layernorm_before_ffn = RMSNorm(config.dim_model, config.eps, dtype=dtype)
        self.ffn = GatedMLP(
            config.dim_model,
            config.dim_ff,
            config.activate_fn,
            names=("w_in.w_0", "w_in.w_1", "w_out"),
            init_std=config.hidden_init_std,
            dropout_p=config.dropout_p,
            dtype=dtype,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.ffn(self.layernorm_before_ffn(hidden_states))
        return residual(hidden_states, x, self.dropout_p, self.training, self.residual_scale)


class DragonflyLayer(nn.Module):
    """One transformer layer: ``layer(hidden, cos, sin, mask, cu_seqlens, max_seqlen, kv_cache) -> hidden``."""

    def __init__(self, config: DragonflyConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_att = SelfAttentionBlock(config, layer_idx, dtype)
        self.ffn = FFNBlock(config, dtype)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.self_att.layernorm_before_attention.init_weights()
        self.self_att.self_attention.init_weights(generator)
        self.ffn.layernorm_before_ffn.init_weights()
        self.ffn.ffn.init_weights(generator)

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
        hidden_states = self.self_att(hidden_states, cos, sin, mask, cu_seqlens, max_seqlen, kv_cache)
        return self.ffn(hidden_states)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


class Dragonfly(DecoderLM):
    """FM9G dragonfly: the :class:`DecoderLM` contract with upstream's muP factors on input and output."""

    layer_cls = DragonflyLayer
    norm_cls = RMSNorm

    def __init__(self, config: DragonflyConfig, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, device=device, dtype=dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.input_embedding(input_ids)
        return h * self.config.scale_emb if self.config.scale else h

    def head_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states / self.config.scale_width if self.config.scale else hidden_states
