"""Key/value cache for incremental decoding: per-layer buffers, per-row positions, padding, rolling window."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value buffers ``[B, H_kv, capacity, D]`` for incremental decoding.

    Create it with ``model.new_kv_cache(batch_size, max_len, device, dtype)`` and call
    ``model(input_ids, position_ids, kv_cache=cache)`` repeatedly: each call attends over what is
    cached plus the new tokens, then appends the new tokens.

    Positions and padding (for batched prompts of different lengths):

    * Every row has its own positions. ``position_ids`` default to ``cache.lengths[:, None] +
      arange(S)`` (continue each row where it stopped).
    * A token whose position id is **negative is padding**: it is never written to the cache and no
      other token attends to it (its own output is garbage, ignore it). Recommended: **left-pad**
      the prompts with ``pad_id`` and position ``-1`` and give real tokens ``0..n_b-1``; then
      ``logits[:, -1]`` is the next-token distribution of every row, and each later step passes one
      token per row with the default positions. Right-padding works too (pads at the end with
      position ``-1``; read row ``b``'s logits at index ``n_b - 1``).
    * ``cache.lengths[b]`` = next position of row ``b`` (number of real tokens seen).

    Sliding-window models keep a rolling buffer of the last ``window`` positions (slot =
    position % window), so memory does not grow past the window; a prompt longer than the buffer
    is fine (its queries see the full window during that call). Without a window the capacity is
    ``max_len`` and positions ``>= max_len`` raise.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        dim_head: int,
        max_len: int,
        *,
        window: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.window = window
        self.rolling = window is not None and window < max_len
        self.capacity = window if self.rolling else max_len
        shape = (batch_size, num_kv_heads, self.capacity, dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.slot_pos = torch.full((batch_size, self.capacity), -1, device=device, dtype=torch.long)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.long)
        self._plan: tuple | None = None
        self._next_slot_pos: torch.Tensor | None = None
        self._next_lengths: torch.Tensor | None = None

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.lengths.zero_()
        self._plan = None

    def next_positions(self, seqlen: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(seqlen, device=self.lengths.device)

    def begin(self, position_ids: torch.Tensor) -> None:
        """Plan one forward step for new tokens at ``position_ids [B, S]`` (called by the model)."""
        pos = position_ids.to(device=self.slot_pos.device, dtype=torch.long)
        if pos.shape[0] != self.batch_size:
            raise ValueError(f"KV cache was built for batch {self.batch_size}, got {pos.shape[0]} rows")
        seqlen = pos.shape[1]
        valid = pos >= 0
        pos_or_pad = torch.where(valid, pos, torch.full_like(pos, -1))
        row_max = pos_or_pad.max(dim=1, keepdim=True).values
        if not self.rolling and int(row_max.max()) >= self.capacity:
            raise ValueError(f"KV cache is full: position {int(row_max.max())} >= max_len {self.max_len}")
        # a chunk longer than a rolling buffer: only its last `capacity` positions are stored
        keep = valid & (pos > row_max - self.capacity)
        b_idx, s_idx = keep.nonzero(as_tuple=True)
        slots = pos[b_idx, s_idx] % self.capacity
        next_slot_pos = self.slot_pos.clone()
        next_slot_pos[b_idx, slots] = pos[b_idx, s_idx]
        # writing before attending is safe unless a rolling write evicts a key that an earlier
        # query of the same chunk still needs; then attend over [old buffer, new keys] first
        write_first = not self.rolling or seqlen == 1
        if write_first:
            used = self.capacity if self.rolling else max(int(next_slot_pos.max()) + 1, 1)
            key_pos = next_slot_pos[:, :used]
        else:
            used = self.capacity
            key_pos = torch.cat([self.slot_pos, pos_or_pad], dim=1)
        qp = pos_or_pad[:, :, None]
        kp = key_pos[:, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            mask = mask & (qp - kp < self.window)
        # padding queries see nothing; let them see slot 0 so the softmax has no NaN
        empty = ~mask.any(dim=-1, keepdim=True)
        mask[..., :1] |= empty
        self._plan = (b_idx, s_idx, slots, write_first, used, mask[:, None])
        self._next_slot_pos = next_slot_pos
        self._next_lengths = torch.maximum(self.lengths, row_max.squeeze(1) + 1)

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b_idx, s_idx, slots = self._plan[:3]
        self.k[layer_idx][b_idx, :, slots] = k[b_idx, s_idx].to(self.k[layer_idx].dtype)
        self.v[layer_idx][b_idx, :, slots] = v[b_idx, s_idx].to(self.v[layer_idx].dtype)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [B, S, H, D]``, new ``k, v [B, S, H_kv, D]`` → ``[B, S, H, D]``; stores k, v."""
        if self._plan is None:
            raise RuntimeError("KVCache.attend called outside a model forward (begin() not called)")
        write_first, used, mask = self._plan[3:]
        if write_first:
            self._write(layer_idx, k, v)
            keys = self.k[layer_idx][:, :, :used]
            values = self.v[layer_idx][:, :, :used]
        else:
            keys = torch.cat([self.k[layer_idx], k.transpose(1, 2).to(self.k[layer_idx].dtype)], dim=2)
            values = torch.cat([self.v[layer_idx], v.transpose(1, 2).to(self.v[layer_idx].dtype)], dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=mask,
            enable_gqa=keys.shape[1] != q.shape[2],
        )
        if not write_first:
            self._write(layer_idx, k, v)
        return out.transpose(1, 2)

    def end(self) -> None:
        """Commit the step planned by :meth:`begin` (called by the model after the last layer)."""
        self.slot_pos = self._next_slot_pos
        self.lengths = self._next_lengths
        self._plan = None
