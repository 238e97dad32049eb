"""The skeleton every decoder-only model family shares: embedding → ``encoder`` (layers + final norm) → head.

A family (dragonfly, spark) subclasses :class:`DecoderLM` with its layer and norm classes, and overrides
``embed`` / ``project`` where it scales them (dragonfly's muP factors). The attention inputs every layer needs
(mask or ``cu_seqlens``, positions, the KV cache step) are prepared here once per forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fm.nn.attention import positions_from_cu_seqlens, prepare_attention, select_kernel
from fm.nn.kv_cache import KVCache
from fm.nn.loss import IGNORE_INDEX, linear_cross_entropy, z_loss_terms
from fm.nn.rotary import RotaryEmbedding
from fm.nn.utils import init_linear


def residual(hidden_states: torch.Tensor, x: torch.Tensor, dropout_p: float, training: bool,
             scale: float = 1.0) -> torch.Tensor:
    """``hidden_states + dropout(x) · scale``: one fused kernel for the add (``scale`` 1.0 when muP is off)."""
    if dropout_p and training:
        x = F.dropout(x, dropout_p)
    return hidden_states.add(x, alpha=scale)


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



class DecoderLM(nn.Module):
    """Shared skeleton of the decoder-only models: embedding → ``encoder`` (layers + final norm) → head.

    ``model(input_ids [B,S], position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None) -> logits [B,S,V]``;
    with ``targets [B,S]`` it returns the per-token cross-entropy ``[B*S]`` (fp32, 0 where the target is -100)
    instead, the head and the loss computed ``loss_chunk`` tokens at a time (:func:`fm.nn.loss.linear_cross_entropy`),
    so the full-vocabulary logits never exist; with ``z_loss`` too (a coefficient) it returns ``(cross-entropy,
    z-loss)``, both ``[B*S]`` (PaLM's ``z_loss * logsumexp(logits)^2`` per token). (In ``forward``, so that an
    engine that gathers parameters around forward, FSDP2's root, has the head's weight at hand.)
    Built on the meta device and materialised (``to_empty`` + ``init_weights``) unless ``device``
    names a real device, in which case that is done here. Logits are in the model dtype.
    Subclasses set ``layer_cls`` (called ``layer_cls(config, index, dtype)``) and ``norm_cls``, and may
    override ``embed`` / ``head_input`` (dragonfly's muP factors).
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
        self.rotary = RotaryEmbedding(config.dim_head, config.base, getattr(config, "rope_scaling", None))
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

    def head_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the head multiplies (the final norm's output; dragonfly scales it)."""
        return hidden_states

    def head_weight(self) -> torch.Tensor:
        return self.input_embedding.weight if self.lm_head is None else self.lm_head.weight

    def _adapted_head(self) -> bool:
        """An adapter (PEFT LoRA) replaced the untied head: only calling it applies the adapter. (An engine's
        subclass of ``nn.Linear``, BMTrain's ``DistributedLinear``, is still a plain head.)"""
        return self.lm_head is not None and not isinstance(self.lm_head, nn.Linear)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._adapted_head():
            return self.lm_head(self.head_input(hidden_states))
        return F.linear(self.head_input(hidden_states), self.head_weight())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 1024,
        z_loss: float | None = None,
    ) -> Any:
        hidden_states = self.embed(input_ids)
        dropout_p = getattr(self.config, "dropout_p", 0.0) if self.training else 0.0
        args, position_ids = _attention_args(
            input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache, self.config.sliding_window, hidden_states,
            dropout_p,
        )
        cos, sin = self.rotary(position_ids)
        hidden_states = self.encoder(hidden_states, cos, sin, *args)
        if kv_cache is not None:
            kv_cache.end()
        if targets is None:
            return self.project(hidden_states)
        if self._adapted_head():
            logits = self.project(hidden_states)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="none")
            return ce if z_loss is None else (ce, z_loss_terms(logits, targets, z_loss))
        if z_loss is None:
            return linear_cross_entropy(self.head_input(hidden_states), self.head_weight(), targets, loss_chunk)
        return linear_cross_entropy(self.head_input(hidden_states), self.head_weight(), targets, loss_chunk, z_loss)



def _attention_args(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache, window, hidden_states, dropout_p):
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
        use_flash=select_kernel(hidden_states, dropout_p, window) != "sdpa",
        dtype=hidden_states.dtype,
    )
    return (mask, cu_seqlens, max_seqlen), position_ids
