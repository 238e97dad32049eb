"""Distributed engines: ``build_engine("auto" | "bmtrain" | "fsdp", **opts) -> Engine``.

``auto`` picks bmtrain when CUDA and an importable bmtrain are present, else fsdp (CPU/gloo or GPU/nccl).
"""

from __future__ import annotations

from typing import Any

from fm.distributed.base import Engine

ENGINE_NAMES = ("auto", "bmtrain", "fsdp")


def bmtrain_usable() -> bool:
    """True when CUDA is available and ``import bmtrain`` works (it needs CUDA + NCCL to init)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import bmtrain  # noqa: F401
    except Exception:  # bmtrain raises various errors when its CUDA extension cannot load
        return False
    return True


def resolve_engine_name(name: str) -> str:
    key = name.lower()
    if key not in ENGINE_NAMES:
        raise ValueError(f"engine {name!r} is not one of {ENGINE_NAMES}: set engine to auto, bmtrain or fsdp")
    if key == "auto":
        return "bmtrain" if bmtrain_usable() else "fsdp"
    return key


def build_engine(name: str = "auto", **opts: Any) -> Engine:
    """Engine by name. ``opts`` go to the engine's constructor (e.g. ``seed``, ``backend``, ``loss_scale``)."""
    key = resolve_engine_name(name)
    if key == "bmtrain":
        from fm.distributed.bmtrain import BMTrainEngine

        return BMTrainEngine(**opts)
    from fm.distributed.fsdp import FSDPEngine

    return FSDPEngine(**opts)


__all__ = ["Engine", "build_engine", "resolve_engine_name", "bmtrain_usable", "ENGINE_NAMES"]
