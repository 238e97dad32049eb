"""Load the model to evaluate: any checkpoint :func:`fm.checkpoint.open.open_checkpoint` opens.

Our checkpoints (run or step directory, ``.pt``, LoRA adapter) build our model; a Hugging Face directory
(``config.json`` + ``*.safetensors``/``pytorch_model*.bin``) loads with ``transformers.AutoModelForCausalLM``, so any
transformers-loadable causal LM can be scored, not only what ``fm export`` writes. The model config and tokenizer
come with the checkpoint unless ``--model-config``/``--tokenizer`` are given.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fm.checkpoint.open import Checkpoint, CheckpointFormError, open_checkpoint

CheckpointError = CheckpointFormError  # the name fm.eval's CLI catches


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


def load_hf_model(path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from fm.io import load_torch

    # transformers refuses a pickled .bin that would run code too, but with a traceback that names no file: read
    # each one with fm's loader first (memory-mapped, so cheap), which refuses it in one line naming the file
    for weights in sorted(Path(path).glob("pytorch_model*.bin")):
        load_torch(weights, mmap=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return HFCausalLM(hf).to(device).eval()


def load_model(path: str, *, model_config: str | None = None, family: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[nn.Module, Checkpoint, str]:
    """(model in eval mode, the opened checkpoint, where its config came from)."""
    ck = open_checkpoint(path, model_config=model_config, family=family)
    device = torch.device(device)
    if ck.kind == "hf" and model_config is None:
        return load_hf_model(ck.path, device=device, dtype=dtype), ck, str(ck.path / "config.json")
    model = ck.build_model(device="cpu", dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), ck, ck.config_source
