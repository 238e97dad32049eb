"""Causal self-attention over packed (varlen) sequences, with GQA and sliding window; decoding attends
through a :class:`~fm.nn.kv_cache.KVCache`.

Three kernels compute the same thing; :func:`select_kernel` picks one per forward, logs it once:

* ``varlen``: torch's own ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 kernels inside torch; CUDA,
  fp16/bf16, no dropout). Tokens are flattened to ``[B*S, H, D]``, ``cu_seqlens`` (int32) delimits the samples,
  the sliding window is ``window_size=(w - 1, 0)``. Its arguments are chosen from its signature, which changes per
  torch release (2.10: ``is_causal``, no window; 2.11: ``window_size``; 2.12+: ``enable_gqa``).
* ``flash_attn``: the flash-attn package's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, when installed; also with
  dropout), same layout.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` everywhere else: a mask ``[B, 1, S, S]`` built once
  per forward from segment ids (``cu_seqlens``), causality and the window; without packing and without window the
  fused ``is_causal`` path is used. With a mask, k/v are repeated for GQA (SDPA would fall back to its math kernel),
  and on CUDA a mask above :data:`MASK_LIMIT_BYTES` is refused with the fix.

Attention never crosses a ``cu_seqlens`` boundary, and a sample never crosses a row (the train
loader's padding tail is its own segment), so the per-row mask is exact.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fm.nn.kv_cache import KVCache
from fm.nn.norm import RMSNorm
from fm.nn.rotary import apply_rotary
from fm.nn.utils import init_linear, set_submodule

try:  # optional at import time: CPU machines and CI have no flash-attn
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.10 (CUDA kernels only)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch release
    torch_varlen_attn = None

DRAGONFLY_NAMES = ("project_q", "project_k", "project_v", "attention_out")
KERNELS = ("varlen", "flash_attn", "sdpa")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# kernel choice
# ----------------------------------------------------------------------------------------------
_forced: str | None = None
_logged: set[str] = set()


@contextlib.contextmanager
def force_kernel(name: str) -> Iterator[None]:
    """Use kernel ``name`` whatever the device (tests drive the CUDA paths on the ``meta`` device with it)."""
    global _forced
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}: one of {', '.join(KERNELS)}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


@functools.cache
def _varlen_params(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def torch_varlen_supports(window: int | None) -> bool:
    """torch's varlen kernel exists here and can apply ``window`` (torch 2.10 has no window argument)."""
    return torch_varlen_attn is not None and (window is None or "window_size" in _varlen_params(torch_varlen_attn))


def select_kernel(t: torch.Tensor, dropout_p: float = 0.0, window: int | None = None) -> str:
    """The kernel for attention over tensors like ``t``: torch's varlen kernel first, the flash-attn package second
    (the one that also has dropout), SDPA last. Logged once per kernel."""
    if _forced is not None:
        kernel = _forced
    elif t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0 and torch_varlen_supports(window):
        kernel = "varlen"
    elif t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and flash_attn_varlen_func is not None:
        kernel = "flash_attn"
    else:
        kernel = "sdpa"
    if kernel not in _logged:
        _logged.add(kernel)
        log.info("attention kernel: %s (%s, %s%s)", kernel, t.device.type, str(t.dtype).removeprefix("torch."),
                 f", dropout {dropout_p}" if dropout_p else "")
    return kernel


# ----------------------------------------------------------------------------------------------
# packing helpers
# ----------------------------------------------------------------------------------------------


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> None:
    """Raise unless ``cu_seqlens`` starts at 0, ends at ``B*S`` and starts a segment at every row start.

    Checked only when ``cu_seqlens`` is on the host (as the train loader hands it over): reading a device
    copy would wait for the device."""
    if cu_seqlens.device.type != "cpu":
        return
    cu = cu_seqlens.numpy()
    total = batch * seqlen
    if cu.size == 0 or cu[-1] != total or cu[0] != 0:
        got = f"{cu[0]}..{cu[-1]}" if cu.size else "nothing"
        raise ValueError(f"cu_seqlens must start at 0 and end at B*S={total}, got {got}")
    if not set(range(0, total, seqlen)) <= set(cu.tolist()):
        raise ValueError("cu_seqlens: a sample crosses a row boundary; every row must start a new segment")


def segment_ids(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Segment index of every token, ``[B, S]``, on ``cu_seqlens``' device; rejects samples that cross a row
    boundary (when ``cu_seqlens`` is on the host, see :func:`check_cu_seqlens`)."""
    check_cu_seqlens(cu_seqlens, batch, seqlen)
    cu = cu_seqlens.to(torch.long)
    idx = torch.arange(batch * seqlen, device=cu.device)
    return torch.searchsorted(cu[1:], idx, right=True).view(batch, seqlen)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Position ids restarting at 0 at every segment start, ``[B, S]`` (int64)."""
    cu = cu_seqlens.to(torch.long)
    seg = segment_ids(cu, batch, seqlen).view(-1)
    idx = torch.arange(batch * seqlen, device=cu.device)
    return (idx - cu[seg]).view(batch, seqlen)


def causal_mask(
    seqlen: int,
    *,
    segments: torch.Tensor | None = None,
    window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean "may attend" mask ``[B or 1, 1, S, S]``: causal, same segment, inside the window.

    Only the boolean result is ``S x S``: the window test compares ``j`` with ``i - window + 1`` (an ``[S, 1]``
    column), never materialising ``i - j``."""
    i = torch.arange(seqlen, device=device).unsqueeze(1)
    j = torch.arange(seqlen, device=device).unsqueeze(0)
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    mask = mask[None, None]
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    return mask


def prepare_attention(
    batch: int,
    seqlen: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    window: int | None,
    *,
    device: torch.device,
    use_flash: bool,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None]:
    """Once per forward: ``(mask, cu_seqlens, max_seqlen)`` for the layers.

    Varlen path (``use_flash``: torch's varlen kernel or flash-attn): no mask, ``cu_seqlens`` (int32, one segment
    per row when not packed). SDPA path: a mask ``[B or 1, 1, S, S]`` (boolean "may attend", or additive 0/-inf
    in ``dtype`` when a dtype is given), or ``None`` meaning plain causal attention per row.
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, seqlen)  # on the host, before it moves
    if use_flash:
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen
            max_seqlen = seqlen
        elif max_seqlen is None:  # the train loader passes it: computing it here would read the device
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return None, cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True), int(max_seqlen)
    if cu_seqlens is None and window is None:
        return None, None, None
    check_mask_size(batch if cu_seqlens is not None else 1, seqlen, device, dtype)
    cu = cu_seqlens.to(device, non_blocking=True) if cu_seqlens is not None else None
    segments = segment_ids(cu, batch, seqlen) if cu is not None else None
    allowed = causal_mask(seqlen, segments=segments, window=window, device=device)
    if dtype is None:
        return allowed, None, None
    # additive form, built once per forward: SDPA would otherwise convert a boolean mask in every layer
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf")), None, None


MASK_LIMIT_BYTES = 1024**3


def check_mask_size(rows: int, seqlen: int, device: torch.device, dtype: torch.dtype | None) -> None:
    """SDPA needs a materialised ``[B, 1, S, S]`` mask for packed or windowed attention (2 GiB per bf16 row at
    32k tokens) and computes every score of it; a varlen kernel needs neither. On a GPU a mask above
    :data:`MASK_LIMIT_BYTES` is refused with the fix rather than run out of memory (or crawl) later."""
    size = rows * seqlen * seqlen * (torch.empty((), dtype=dtype).element_size() if dtype is not None else 1)
    if device.type != "cuda" or size <= MASK_LIMIT_BYTES:
        return
    raise RuntimeError(
        f"attention without a varlen kernel needs a {rows} x 1 x {seqlen} x {seqlen} mask ({size / 1024**3:.1f} "
        f"GiB per forward, and quadratic work): use torch >= 2.10 with bf16/fp16 and attention dropout 0 (torch's "
        "varlen_attn), or install flash-attn (requirements-gpu.txt), or lower max_length / batch_size")


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H_kv, D]`` → ``[B, S, H, D]``: each kv head serves ``H / H_kv`` consecutive query heads."""
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     window: int | None) -> torch.Tensor:
    """torch's ``varlen_attn`` on flattened tokens ``[T, H, D]``: causal, inside the window, GQA. The keywords
    are those this torch's signature has (2.10: ``is_causal``; 2.11+: ``window_size``; 2.12+: ``enable_gqa``,
    else k/v are repeated)."""
    params = _varlen_params(torch_varlen_attn)
    kw: dict = {}
    if "window_size" in params:
        kw["window_size"] = (window - 1, 0) if window is not None else (-1, 0)  # a tuple: (-1, 0) means causal
    elif window is not None:
        raise RuntimeError("this torch's varlen_attn has no window_size: a sliding window needs torch >= 2.11")
    else:
        kw["is_causal"] = True
    heads = q.shape[1]
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    return torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    window: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention. ``q [B, S, H, D]``, ``k, v [B, S, H_kv, D]`` → ``[B, S, H, D]``.

    ``cu_seqlens`` without a mask selects a varlen kernel (:func:`select_kernel`; a mask is built when none can
    run); a mask (from :func:`prepare_attention`) selects SDPA; neither means causal per row.
    """
    batch, seqlen, heads, dim = q.shape
    if cu_seqlens is not None and mask is None:
        kernel = select_kernel(q, dropout_p, window)
        flat = lambda t: t.reshape(batch * seqlen, t.shape[2], dim)  # noqa: E731
        if kernel == "varlen" and dropout_p == 0 and torch_varlen_supports(window):
            out = varlen_attention(flat(q), flat(k), flat(v), cu_seqlens.to(torch.int32), max_seqlen, window)
            return out.view(batch, seqlen, heads, dim)
        if kernel != "sdpa" and flash_attn_varlen_func is not None:
            window_size = (window - 1, 0) if window is not None else (-1, -1)
            out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                         dropout_p, causal=True, window_size=window_size)
            return out.view(batch, seqlen, heads, dim)
        mask = causal_mask(seqlen, segments=segment_ids(cu_seqlens, batch, seqlen), window=window, device=q.device)
    elif mask is None and window is not None:
        mask = causal_mask(seqlen, window=window, device=q.device)
    elif mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # autocast / mixed precision: SDPA wants an additive mask in q's dtype
    if mask is not None:  # with a mask and GQA, SDPA would fall back to its math kernel
        k, v = _repeat_kv(k, heads), _repeat_kv(v, heads)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=mask is None,
        enable_gqa=k.shape[2] != heads,
    )
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with rotary positions.

    ``names`` are the attribute paths of the q, k, v and output projections (checkpoint layout):
    dragonfly ``project_q project_k project_v attention_out``, spark ``q_proj k_proj v_proj
    out_proj``. Called as ``attn(x, cos, sin, mask, cu_seqlens, max_seqlen, kv_cache)``.

    ``qk_norm``: each head's query and key go through an RMSNorm over ``dim_head`` (weights ``q_norm``, ``k_norm``,
    shared by the heads; eps ``norm_eps``) before the rotation, as Qwen3 does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        dim_head: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        window: int | None = None,
        names: tuple[str, str, str, str] = DRAGONFLY_NAMES,
        init_std: float = 0.02,
        dropout_p: float = 0.0,
        layer_idx: int = 0,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.dim_head = dim_head
        self.window = window
        self.names = names
        self.init_std = init_std
        self.dropout_p = dropout_p
        self.layer_idx = layer_idx
        kw = dict(device=device, dtype=dtype)
        set_submodule(self, names[0], nn.Linear(dim, num_heads * dim_head, bias=qkv_bias, **kw))
        set_submodule(self, names[1], nn.Linear(dim, num_kv_heads * dim_head, bias=qkv_bias, **kw))
        set_submodule(self, names[2], nn.Linear(dim, num_kv_heads * dim_head, bias=qkv_bias, **kw))
        set_submodule(self, names[3], nn.Linear(num_heads * dim_head, dim, bias=out_bias, **kw))
        self.q_norm = RMSNorm(dim_head, norm_eps, **kw) if qk_norm else None
        self.k_norm = RMSNorm(dim_head, norm_eps, **kw) if qk_norm else None

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return tuple(self.get_submodule(n) for n in self.names)  # type: ignore[return-value]

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for proj in self.projections():
            init_linear(proj, self.init_std, generator)
        if self.q_norm is not None:
            self.q_norm.init_weights()
            self.k_norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        proj_q, proj_k, proj_v, proj_o = self.projections()
        q = proj_q(x).view(batch, seqlen, self.num_heads, self.dim_head)
        k = proj_k(x).view(batch, seqlen, self.num_kv_heads, self.dim_head)
        v = proj_v(x).view(batch, seqlen, self.num_kv_heads, self.dim_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v)
        else:
            dropout_p = self.dropout_p if self.training else 0.0
            out = attention(q, k, v, mask, cu_seqlens, max_seqlen, self.window, dropout_p)
        return proj_o(out.reshape(batch, seqlen, self.num_heads * self.dim_head))
