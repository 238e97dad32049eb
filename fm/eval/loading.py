"""Find and load the model to evaluate: our checkpoints or an exported Hugging Face directory.

Accepted ``--checkpoint`` forms (checked in this order):

1. a ``.pt`` file holding a full state dict (ours or upstream's key names; ``{"model": sd}`` or
   ``{"state_dict": sd}`` wrappers and a ``module.`` prefix are unwrapped);
2. a checkpoint directory ``<save>/<model_unique>/<step>/`` with ``fm9g_live_checkpoint-<step>.pt``;
3. a run directory ``<save>/<model_unique>/``: its highest numeric ``<step>/`` is used (complete
   saves first: those with a ``.complete``/``COMPLETE`` marker);
4. a Hugging Face directory (``config.json`` + ``*.safetensors`` or ``pytorch_model*.bin``), loaded
   with ``transformers.AutoModelForCausalLM`` (what ``fm.export`` writes is a plain Llama, so any
   transformers-loadable causal LM works). Its tokenizer defaults to ``DIR/tokenizer.model``.

The model config of 1-3 is ``--model-config`` (a JSON file or a shipped name), else, in the
checkpoint's directory, ``model_config.json`` or ``config.json``: a model config itself (has
``dim_model`` and ``num_layers``), one nested under ``model_config``/``model``, or the train config
the trainer saves there, whose ``config`` key names the model config (a path, tried as given and
relative to the checkpoint directory, or a shipped name).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

CKPT_RE = re.compile(r"fm9g_live_checkpoint-(\d+)\.pt$")
COMPLETE_MARKERS = (".complete", "COMPLETE")  # written last by a finished save


class CheckpointError(ValueError):
    pass


@dataclass
class ModelSource:
    kind: str  # "pt" or "hf"
    path: str  # the .pt file or the HF directory
    config: str | None  # explicit --model-config, else None (found beside the checkpoint)


def _is_hf_dir(path: str) -> bool:
    has_weights = bool(glob.glob(os.path.join(path, "*.safetensors")) or
                       glob.glob(os.path.join(path, "pytorch_model*.bin")))
    return has_weights and os.path.isfile(os.path.join(path, "config.json"))


def _checkpoint_in(directory: str) -> str | None:
    found = [(int(m.group(1)), f) for f in glob.glob(os.path.join(directory, "fm9g_live_checkpoint-*.pt"))
             if (m := CKPT_RE.search(os.path.basename(f)))]
    return max(found)[1] if found else None


def _latest_step_dir(path: str) -> str | None:
    steps = [d for d in os.listdir(path) if d.isdigit() and _checkpoint_in(os.path.join(path, d))]
    complete = [d for d in steps if any(os.path.exists(os.path.join(path, d, m)) for m in COMPLETE_MARKERS)]
    pool = complete or steps
    return os.path.join(path, max(pool, key=int)) if pool else None


def resolve_checkpoint(path: str, model_config: str | None = None) -> ModelSource:
    """Which of the accepted forms ``path`` is (see the module docstring)."""
    if os.path.isfile(path):
        return ModelSource("pt", path, model_config)
    if not os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    ckpt = _checkpoint_in(path)
    if ckpt is not None:
        return ModelSource("pt", ckpt, model_config)
    step_dir = _latest_step_dir(path)
    if step_dir is not None:
        return resolve_checkpoint(step_dir, model_config)
    if _is_hf_dir(path):
        return ModelSource("hf", path, None)
    raise CheckpointError(f"--checkpoint {path}: not a checkpoint. Accepted: a .pt state dict; a directory "
                          "<save>/<model_unique>/<step>/ with fm9g_live_checkpoint-<step>.pt; a run directory with "
                          "numeric <step>/ subdirectories; a Hugging Face directory (config.json + *.safetensors "
                          "or pytorch_model*.bin)")


def _is_model_config(d: Any) -> bool:
    return isinstance(d, dict) and "dim_model" in d and "num_layers" in d


def _load_named(name: str, family: str | None, base_dir: str) -> Any:
    from fm.models.config import ModelConfigError
    from fm.models.registry import load_model_config

    for candidate in (name, os.path.join(base_dir, name)):
        if os.path.isfile(candidate):
            return load_model_config(candidate, family)
    try:
        return load_model_config(name, family)
    except ModelConfigError:
        if family is not None:
            raise
        return load_model_config(name, "dragonfly")  # the trainer resolves names under apps/fm9g_2b first


def find_model_config(source: ModelSource, family: str | None) -> tuple[Any, str]:
    """(typed model config, where it came from) for a ``.pt`` source; see the module docstring."""
    from fm.models.registry import load_model_config

    directory = os.path.dirname(os.path.abspath(source.path))
    if source.config is not None:
        return _load_named(source.config, family, os.getcwd()), source.config
    for name in ("model_config.json", "config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if _is_model_config(data):
            return load_model_config(path, family), path
        for key in ("model_config", "model"):
            if isinstance(data, dict) and _is_model_config(data.get(key)):
                return load_model_config(data[key], family), f"{path}:{key}"
        if isinstance(data, dict) and isinstance(data.get("config"), str):  # the train config the trainer saved
            return _load_named(data["config"], family, directory), f"{path}:config={data['config']}"
    raise CheckpointError(f"no model config beside {source.path} (model_config.json, or config.json holding a model "
                          "config or a train config with a 'config' key); pass --model-config "
                          "(e.g. apps/fm9g_2b/model_configs/2.4b.json)")


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter name -> tensor)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_pt_model(source: ModelSource, *, family: str | None, device: torch.device, dtype: torch.dtype
                  ) -> tuple[nn.Module, str]:
    from fm.models.registry import build_model

    config, where = find_model_config(source, family)
    from fm.io import load_torch

    state = _unwrap_state_dict(load_torch(source.path), source.path)
    model = build_model(config, device="cpu", dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source.path} does not match the model config {where}: "
                              f"missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                              f"unexpected keys {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}; "
                              "check --model-config")
    return model.to(device=device, dtype=dtype).eval(), where


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
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[nn.Module, ModelSource, str]:
    """(model in eval mode, where the weights came from, where its config came from)."""
    source = resolve_checkpoint(path, model_config)
    device = torch.device(device)
    if source.kind == "hf":
        return load_hf_model(source.path, device=device, dtype=dtype), source, os.path.join(path, "config.json")
    model, where = load_pt_model(source, family=family, device=device, dtype=dtype)
    return model, source, where


def default_tokenizer(source: ModelSource) -> str | None:
    """``tokenizer.model`` in the HF directory or next to the checkpoint, if there is one."""
    directory = source.path if source.kind == "hf" else os.path.dirname(os.path.abspath(source.path))
    candidate = os.path.join(directory, "tokenizer.model")
    return candidate if os.path.isfile(candidate) else None
