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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fm.models.config import DTYPES, config_to_dict, positive_sizes, raise_problems, resolve_dtype
from fm.nn.attention import (
    DRAGONFLY_NAMES,
    Attention,
    KVCache,
    flash_available,
    positions_from_cu_seqlens,
    prepare_attention,
)
from fm.nn.mlp import GatedMLP
from fm.nn.norm import RMSNorm
from fm.nn.rotary import RotaryEmbedding
from fm.nn.utils import init_linear


@dataclass
class DragonflyConfig:
    """Keys of upstream ``model_configs/*.json`` (all accepted) plus ours (``sliding_window``, ``model_family``)."""

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
    qk_norm: bool = False
    dropout_p: float = 0.0
    sliding_window: int | None = None
    max_length: int = 4096
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
    rope_scaling_type: str = ""
    rope_scaling_factor: float = 1.0
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
            (not self.qk_norm, "qk_norm=true is not implemented (upstream ignored it as well): set it to false"),
            (
                self.rope_scaling_type == "" and self.rope_scaling_factor == 1.0 and self.pose_prob == 0.0,
                'rope scaling / PoSE are not implemented: leave rope_scaling_type "", factor 1, pose_prob 0',
            ),
            (self.tp in (0, 1), f"tp={self.tp}: tensor parallelism is not supported (use 0)"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null"),
            (self.dim_model_base > 0, "dim_model_base must be positive"),
            (dtype.lower() in DTYPES, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}"),
        ])

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
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p)
        # one fused kernel for h + x·scale_depth/√L (alpha=1.0 when muP is off)
        return hidden_states.add(x, alpha=self.residual_scale)


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
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p)
        # one fused kernel for h + x·scale_depth/√L (alpha=1.0 when muP is off)
        return hidden_states.add(x, alpha=self.residual_scale)


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


class Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module], output_layernorm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output_layernorm = output_layernorm

    def forward(self, hidden_states: torch.Tensor, *args) -> torch.Tensor:
        # iterate (not call) so an engine may replace `layers` by any iterable of wrapped blocks
        for layer in self.layers:
            hidden_states = layer(hidden_states, *args)
        return self.output_layernorm(hidden_states)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


class DecoderLM(nn.Module):
    """Shared skeleton of the decoder-only models: embedding → ``encoder`` (layers + final norm) → head.

    ``model(input_ids [B,S], position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None) -> logits [B,S,V]``.
    Built on the meta device and materialised (``to_empty`` + ``init_weights``) unless ``device``
    names a real device, in which case that is done here. Logits are in the model dtype.
    Subclasses set ``layer_cls`` (called ``layer_cls(config, index, dtype)``) and ``norm_cls``, and may
    override ``embed`` / ``project`` (dragonfly's muP factors).
    """

    layer_cls: type[nn.Module]
    norm_cls: type[nn.Module]

    def __init__(self, config, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        dtype = dtype or config.torch_dtype
        with torch.device("meta"):
            self.input_embedding = nn.Embedding(config.vocab_size, config.dim_model, dtype=dtype)
            layers = [self.layer_cls(config, i, dtype) for i in range(config.num_layers)]
            self.encoder = Encoder(layers, self.norm_cls(config.dim_model, config.eps, dtype=dtype))
            self.lm_head = (
                None if config.tie_lm_head else nn.Linear(config.dim_model, config.vocab_size, bias=False, dtype=dtype)
            )
        self.rotary = RotaryEmbedding(config.dim_head, config.base)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    # -- weights -------------------------------------------------------------------------------

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter (each layer's own stds); call after ``to_empty``."""
        with torch.no_grad():
            nn.init.normal_(self.input_embedding.weight, std=self.config.init_std, generator=generator)
        for layer in self.encoder.layers:
            layer.init_weights(generator)
        self.encoder.output_layernorm.init_weights()
        if self.lm_head is not None:
            init_linear(self.lm_head, self.config.init_std, generator)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        skip = {id(self.input_embedding.weight)}
        if self.lm_head is not None:
            skip.add(id(self.lm_head.weight))
        return sum(p.numel() for p in self.parameters() if not (exclude_embeddings and id(p) in skip))

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.input_embedding.weight
        return KVCache(
            self.config.num_layers,
            batch_size,
            self.config.num_kv_heads,
            self.config.dim_head,
            max_len,
            window=self.config.sliding_window,
            device=device if device is not None else weight.device,
            dtype=dtype or weight.dtype,
        )

    # -- forward -------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.input_embedding(input_ids)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.input_embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden_states, weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        args, position_ids = _attention_args(
            input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache, self.config.sliding_window, hidden_states
        )
        cos, sin = self.rotary(position_ids)
        hidden_states = self.encoder(hidden_states, cos, sin, *args)
        if kv_cache is not None:
            kv_cache.end()
        return self.project(hidden_states)


class Dragonfly(DecoderLM):
    """FM9G dragonfly: the :class:`DecoderLM` contract with upstream's muP factors on input and output."""

    layer_cls = DragonflyLayer
    norm_cls = RMSNorm

    def __init__(self, config: DragonflyConfig, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__(config, device=device, dtype=dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.input_embedding(input_ids)
        return h * self.config.scale_emb if self.config.scale else h

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.scale:
            hidden_states = hidden_states / self.config.scale_width
        return super().project(hidden_states)


def _attention_args(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache, window, hidden_states):
    """Per-forward attention inputs shared by all layers: ``(mask, cu_seqlens, max_seqlen, kv_cache)``."""
    batch, seqlen = input_ids.shape
    device = input_ids.device
    if kv_cache is not None:
        if cu_seqlens is not None:
            raise ValueError("kv_cache and cu_seqlens cannot be combined: decode unpacked rows")
        if position_ids is None:
            position_ids = kv_cache.next_positions(seqlen).to(device)
        kv_cache.begin(position_ids)
        return (None, None, None, kv_cache), position_ids
    if position_ids is None:
        if cu_seqlens is not None:
            position_ids = positions_from_cu_seqlens(cu_seqlens.to(device), batch, seqlen)
        else:
            position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)
    mask, cu_seqlens, max_seqlen = prepare_attention(
        batch,
        seqlen,
        cu_seqlens,
        max_seqlen,
        window,
        device=device,
        use_flash=flash_available(hidden_states),
        dtype=hidden_states.dtype,
    )
    return (mask, cu_seqlens, max_seqlen), position_ids
