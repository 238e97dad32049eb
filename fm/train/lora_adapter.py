"""PEFT LoRA adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
``base_model.model.<module path>.lora_{A,B}.weight``), written and read, and folded into dense weights.

This is the file format only (what :mod:`fm.checkpoint.open` opens); injecting adapters into a model, training
and the ``fm lora`` commands are :mod:`fm.train.lora`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fm.errors import FmError
from fm.io import atomic_dir, atomic_write_bytes

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraError(FmError, ValueError):
    """Bad LoRA settings or an adapter that does not fit the model; the message says how to fix it."""


def _config_json(cfg: LoraConfig | Mapping[str, Any], base_model: str | None) -> bytes:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    d["peft_type"] = str(getattr(d.get("peft_type"), "value", d.get("peft_type") or "LORA"))
    d["task_type"] = getattr(d.get("task_type"), "value", d.get("task_type"))
    if base_model is not None:
        d["base_model_name_or_path"] = base_model
    return (json.dumps(d, indent=2, ensure_ascii=False, default=str) + "\n").encode()


def write_adapter_files(directory: str | Path, state: Mapping[str, torch.Tensor], cfg: LoraConfig | Mapping[str, Any],
                        base_model: str | None = None) -> list[str]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory`` (each file atomically);
    returns their names."""
    from safetensors.torch import save as st_save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(st_save(dict(state), metadata={"format": "pt"}), d / ADAPTER_WEIGHTS)
    atomic_write_bytes(_config_json(cfg, base_model), d / ADAPTER_CONFIG)
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


def save_adapter(directory: str | Path, state: Mapping[str, torch.Tensor], cfg: LoraConfig | Mapping[str, Any],
                 base_model: str | None = None) -> Path:
    """A complete adapter directory at ``directory``, made in a temp dir and renamed (never half written)."""
    with atomic_dir(directory, overwrite=True) as tmp:
        write_adapter_files(tmp, state, cfg, base_model)
    return Path(directory)


def load_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config dict, PEFT-format state dict)`` from an adapter (or LoRA checkpoint) directory."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{d} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    return cfg, load_file(str(w_path))


def scaling(cfg: Mapping[str, Any]) -> float:
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


# ----------------------------------------------------------------------------- merge
def merge_state_dict(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
                     cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Dense state dict with the adapter folded in: ``W += (B @ A) · scale`` (in fp32, cast back)."""
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoraError("adapters with rank_pattern/alpha_pattern are not supported by this merge")
    scale = scaling(cfg)
    out = dict(base)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight$", key)
        if m is None:
            raise LoraError(f"adapter key {key!r} is not a LoRA A/B weight (bias adapters are not supported)")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    for mod, ab in sorted(modules.items()):
        wkey = f"{mod}.weight"
        if wkey not in out:
            raise LoraError(f"adapter module {mod!r} has no weight {wkey!r} in the base state dict: wrong base model?")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraError(f"adapter module {mod!r} lacks {sorted({'lora_A', 'lora_B'} - set(ab))}")
        w = out[wkey]
        delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * scale
        if delta.shape != w.shape:
            raise LoraError(f"{wkey}: adapter delta {tuple(delta.shape)} != weight {tuple(w.shape)}")
        out[wkey] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out
