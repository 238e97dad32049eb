"""Gated MLP: ``down(act(gate(x)) * up(x))`` with silu or gelu (exact erf or tanh)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fm.nn.utils import init_linear, set_submodule

Activation = Literal["silu", "gelu", "gelu_tanh"]


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu  # exact (erf), as torch.nn.GELU() upstream and the Spark GPU code
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}: choose one of silu, gelu, gelu_tanh")


class GatedMLP(nn.Module):
    """Gated feed-forward block.

    ``names`` gives the (dotted) attribute paths of the gate, up and down projections so that each
    model keeps its checkpoint layout: dragonfly uses ``("w_in.w_0", "w_in.w_1", "w_out")`` (upstream
    BMTrain keys), spark ``("fc0", "fc1", "fc2")`` (MindFormers names). Projections are resolved by
    name at call time so adapters injected later (PEFT LoRA replaces the children) are used.
    """

    def __init__(
        self,
        dim: int,
        dim_ff: int,
        activation: Activation = "silu",
        bias: bool = False,
        *,
        names: tuple[str, str, str] = ("gate", "up", "down"),
        init_std: float = 0.02,
        dropout_p: float = 0.0,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.names = names
        self.act = activation_fn(activation)
        self.activation = activation
        self.init_std = init_std
        self.dropout_p = dropout_p
        kw = dict(bias=bias, device=device, dtype=dtype)
        set_submodule(self, names[0], nn.Linear(dim, dim_ff, **kw))
        set_submodule(self, names[1], nn.Linear(dim, dim_ff, **kw))
        set_submodule(self, names[2], nn.Linear(dim_ff, dim, **kw))

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return tuple(self.get_submodule(n) for n in self.names)  # type: ignore[return-value]

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for proj in self.projections():
            init_linear(proj, self.init_std, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        h = self.act(gate(x)) * up(x)
        if self.dropout_p and self.training:
            h = F.dropout(h, self.dropout_p)
        return down(h)
