"""Shared helpers of the engine tests: a tiny model with the engine contract's structure, batches,
the single-process reference every engine must reproduce, and a free port for rendezvous."""

from __future__ import annotations

import copy
import socket

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, LAYERS = 64, 16, 3
LR, MAX_NORM = 1e-2, 0.05


# ---------------------------------------------------------------- a stand-in model with the contract's structure
class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w_in = nn.Linear(dim, 2 * dim, bias=False)
        self.w_out = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        pos = (position_ids.unsqueeze(-1).float() + 1.0).log()  # uses the extra positional arg like rotary would
        return h + self.w_out(F.silu(self.w_in(self.norm(h) + 0.01 * pos.to(h.dtype))))

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.w_in.weight, std=0.2)
        nn.init.normal_(self.w_out.weight, std=0.2)


class TinyEncoder(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TinyBlock(dim) for _ in range(n))
        self.output_layernorm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, *args)
        return self.output_layernorm(h)


class TinyLM(nn.Module):
    """Tied head (logits = h @ Eᵀ) and a non-persistent buffer that init_weights must restore."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, n: int = LAYERS) -> None:
        super().__init__()
        self.input_embedding = nn.Embedding(vocab, dim)
        self.encoder = TinyEncoder(dim, n)
        self.register_buffer("emb_scale", torch.empty(()), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.input_embedding.weight, std=0.5)
        for layer in self.encoder.layers:
            layer.init_weights()
        self.encoder.output_layernorm.reset_parameters()
        self.emb_scale.fill_(2.0)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = self.input_embedding(input_ids) * self.emb_scale.to(self.input_embedding.weight.dtype)
        h = self.encoder(h, position_ids)
        return F.linear(h, self.input_embedding.weight)


def make_meta_model() -> TinyLM:
    with torch.device("meta"):
        return TinyLM()


def param_groups(model: nn.Module, shapes: dict | None = None) -> list[dict]:
    """Matrices decayed, vectors not and at half the lr. ``shapes``: full shapes (``engine.param_shapes``) of a
    sharded model whose local parameters are flat (bmtrain)."""
    ndim = {n: len(shapes[n]) if shapes else p.ndim for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if ndim[n] == 2]
    no_decay = [p for n, p in model.named_parameters() if ndim[n] < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr_scale": 0.5}]


def make_batches(steps: int = 2, batch: int = 4, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        inputs = torch.randint(0, VOCAB, (batch, seq), generator=g)
        targets = torch.randint(0, VOCAB, (batch, seq), generator=g)
        targets[torch.rand(batch, seq, generator=g) < 0.3] = -100  # uneven token counts per rank
        pos = torch.arange(seq).repeat(batch, 1)
        out.append({"inputs": inputs, "targets": targets, "position_ids": pos})
    return out


def rank_slice(b: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    n = b["inputs"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_step(engine, model, batch) -> tuple[float, float]:
    logits = model(batch["inputs"], batch["position_ids"])
    per_token = engine.loss(logits, batch["targets"])
    total = engine.all_reduce(float((batch["targets"] != -100).sum()))
    engine.backward(per_token.sum() / total)
    loss = engine.all_reduce(per_token.sum().item()) / total
    norm = engine.clip_grad_norm(MAX_NORM)
    engine.optimizer_step()
    engine.zero_grad()
    return float(loss), float(norm)


def reference_run(init_sd: dict, batches) -> tuple[list[tuple[float, float]], list[dict]]:
    """Plain single-process torch: the numbers the engine must reproduce."""
    model = TinyLM()
    model.load_state_dict(init_sd)
    groups = param_groups(model)
    for g in groups:
        g["lr"] = LR * g.get("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    stats, states = [], []
    for b in batches:
        logits = model(b["inputs"], b["position_ids"])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), b["targets"].reshape(-1), ignore_index=-100)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        stats.append((loss.item(), norm.item()))
        states.append(copy.deepcopy(model.state_dict()))
    return stats, states


def assert_sd_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
