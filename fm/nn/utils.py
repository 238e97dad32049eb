"""Small helpers shared by the layers."""

from __future__ import annotations

import torch
from torch import nn


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register ``module`` at ``dotted`` (``"w_in.w_0"``), creating plain containers on the way."""
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def init_linear(linear: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """N(0, std²) weight, zero bias. Works through wrappers that expose ``weight``/``bias``."""
    with torch.no_grad():
        torch.nn.init.normal_(linear.weight, mean=0.0, std=std, generator=generator)
        bias = getattr(linear, "bias", None)
        if bias is not None:
            bias.zero_()
