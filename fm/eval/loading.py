"""Find and load the model to evaluate: our checkpoints or an exported Hugging Face directory.

Accepted ``--checkpoint`` forms (checked in this order):

1. a ``.pt`` file holding a full state dict (ours or upstream's key names; ``{"model": sd}`` or
   ``{"state_dict": sd}`` wrappers and a ``module.`` prefix are unwrapped). The model config is
   ``--model-config`` or ``config.json`` next to the file;
2. a checkpoint directory ``<save>/<model_unique>/<step>/`` with ``fm9g_live_checkpoint-<step>.pt``
   and ``config.json``;
3. a run directory ``<save>/<model_unique>/``: its highest numeric ``<step>/`` is used;
4. a Hugging Face directory (``config.json`` + ``*.safetensors`` or ``pytorch_model*.bin``), loaded
   with ``transformers.AutoModelForCausalLM`` (what ``fm.export`` writes is a plain Llama, so any
   transformers-loadable causal LM works). Its tokenizer defaults to ``DIR/tokenizer.model``.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

CKPT_RE = re.compile(r"fm9g_live_checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    pass


@dataclass
class ModelSource:
    kind: str  # "pt" or "hf"
    path: str  # the .pt file or the HF directory
    config: str | None  # model config path/name (kind "pt")


def _is_hf_dir(path: str) -> bool:
    has_weights = bool(glob.glob(os.path.join(path, "*.safetensors")) or
                       glob.glob(os.path.join(path, "pytorch_model*.bin")))
    return has_weights and os.path.isfile(os.path.join(path, "config.json"))


def _checkpoint_in(directory: str) -> str | None:
    found = [(int(m.group(1)), f) for f in glob.glob(os.path.join(directory, "fm9g_live_checkpoint-*.pt"))
             if (m := CKPT_RE.search(os.path.basename(f)))]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str, model_config: str | None = None) -> ModelSource:
    """Which of the accepted forms ``path`` is (see the module docstring)."""
    if os.path.isfile(path):
        config = model_config or os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if model_config is None and not os.path.isfile(config):
            raise CheckpointError(f"{path}: no config.json next to it; pass --model-config (a model config "
                                  "json such as apps/fm9g_2b/model_configs/2.4b.json, or a config name)")
        return ModelSource("pt", path, config)
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    ckpt = _checkpoint_in(path)
    if ckpt is None:
        steps = [d for d in os.listdir(path) if d.isdigit() and _checkpoint_in(os.path.join(path, d))]
        if steps:
            return resolve_checkpoint(os.path.join(path, max(steps, key=int)), model_config)
        if _is_hf_dir(path):
            return ModelSource("hf", path, None)
        raise CheckpointError(f"--checkpoint {path}: not a checkpoint. Accepted: a .pt state dict; a directory "
                              "<save>/<model_unique>/<step>/ with fm9g_live_checkpoint-<step>.pt and config.json; "
                              "a run directory with numeric <step>/ subdirectories; a Hugging Face directory "
                              "(config.json + *.safetensors or pytorch_model*.bin)")
    config = model_config or os.path.join(path, "config.json")
    if model_config is None and not os.path.isfile(config):
        raise CheckpointError(f"{path}: no config.json; pass --model-config")
    return ModelSource("pt", ckpt, config)


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter name -> tensor)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_pt_model(source: ModelSource, *, family: str | None, device: torch.device, dtype: torch.dtype
                  ) -> nn.Module:
    from fm.models.registry import build_model, load_model_config

    config = load_model_config(source.config, family)
    state = _unwrap_state_dict(torch.load(source.path, map_location="cpu", weights_only=True), source.path)
    model = build_model(config, device="cpu", dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source.path} does not match the model config {source.config}: "
                              f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                              f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}; "
                              "check --model-config")
    return model.to(device=device, dtype=dtype).eval()


class HFCausalLM(nn.Module):
    """Adapter giving a transformers causal LM our call signature ``model(input_ids, position_ids) -> logits``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        self.config = SimpleNamespace(vocab_size=cfg.vocab_size,
                                      max_length=getattr(cfg, "max_position_embeddings", None))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, kv_cache: Any = None
                ) -> torch.Tensor:
        if cu_seqlens is not None and cu_seqlens.numel() != input_ids.shape[0] + 1:
            raise NotImplementedError("packed batches (cu_seqlens) are not supported for Hugging Face models")
        return self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def load_hf_model(path: str, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return HFCausalLM(hf).to(device).eval()


def load_model(path: str, *, model_config: str | None = None, family: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ModelSource]:
    source = resolve_checkpoint(path, model_config)
    device = torch.device(device)
    if source.kind == "hf":
        return load_hf_model(source.path, device=device, dtype=dtype), source
    return load_pt_model(source, family=family, device=device, dtype=dtype), source


def default_tokenizer(source: ModelSource) -> str | None:
    """``tokenizer.model`` in the HF directory or next to the checkpoint, if there is one."""
    directory = source.path if source.kind == "hf" else os.path.dirname(os.path.abspath(source.path))
    candidate = os.path.join(directory, "tokenizer.model")
    return candidate if os.path.isfile(candidate) else None
