"""The Hugging Face Llama format of dragonfly checkpoints (stock ``LlamaForCausalLM``): names, muP folding,
``config.json``, safetensors shards and tokenizer files. The commands that use it are :mod:`fm.export.hf`.

Export folds the muP factors into the weights, so transformers and vLLM load the directory with
no custom code:

* ``embed_tokens = E · scale_emb``
* ``o_proj = W_o · scale_depth/√L`` and ``down_proj = W_out · scale_depth/√L`` (the residual branch scale)
* ``lm_head = E / scale_width`` (or the untied head / scale_width), written untied
  (``tie_word_embeddings: false``), because the input and output scales differ.

The original config (its muP factors) is recorded under ``"fm_dragonfly"`` in ``config.json`` (ignored by other tools),
so ``import`` restores the original parameterisation exactly up to fp rounding. A Llama directory
without that record imports as a plain model: ``scale: false`` and the head untied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fm.io import load_torch
from fm.models.dragonfly import DragonflyConfig
from fm.models.registry import load_model_config

log = logging.getLogger("fm.export.llama")

MUP_KEY = "fm_dragonfly"  # config.json entry holding the original config (muP factors)

LAYER_MAP = {  # ours (after "encoder.layers.{i}.") -> HF (after "model.layers.{i}.")
    "self_att.layernorm_before_attention.weight": "input_layernorm.weight",
    "self_att.self_attention.project_q.weight": "self_attn.q_proj.weight",
    "self_att.self_attention.project_k.weight": "self_attn.k_proj.weight",
    "self_att.self_attention.project_v.weight": "self_attn.v_proj.weight",
    "self_att.self_attention.project_q.bias": "self_attn.q_proj.bias",
    "self_att.self_attention.project_k.bias": "self_attn.k_proj.bias",
    "self_att.self_attention.project_v.bias": "self_attn.v_proj.bias",
    "self_att.self_attention.attention_out.weight": "self_attn.o_proj.weight",
    "ffn.layernorm_before_ffn.weight": "post_attention_layernorm.weight",
    "ffn.ffn.w_in.w_0.weight": "mlp.gate_proj.weight",
    "ffn.ffn.w_in.w_1.weight": "mlp.up_proj.weight",
    "ffn.ffn.w_out.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "input_embedding.weight": "model.embed_tokens.weight",
    "encoder.output_layernorm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Residual-branch outputs carry the muP depth scale.
_DEPTH_SCALED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def as_config(cfg: Any, source: str = "<dict>") -> Any:
    """A :class:`~fm.models.dragonfly.DragonflyConfig` from a config object or an upstream-keyed dict."""
    if isinstance(cfg, DragonflyConfig):
        return cfg
    config = load_model_config(dict(cfg), "dragonfly")
    config.source = source
    return config


def mup_factors(config: Any) -> tuple[float, float, float]:
    """(embedding multiplier, residual-branch multiplier, logit divisor), exactly as the model applies them."""
    return (float(config.scale_emb) if config.scale else 1.0, float(config.residual_scale), float(config.scale_width))


def hf_config_from_dragonfly(config: Any, dtype: torch.dtype, bos_id: int = 1, eos_id: int = 2,
                             pad_id: int | None = None) -> dict[str, Any]:
    config = as_config(config)
    where = config.source
    if config.activate_fn != "silu":
        raise ValueError(f"{where}: activate_fn {config.activate_fn!r} — stock Llama needs 'silu'")
    if config.sliding_window is not None:
        raise ValueError(f"{where}: sliding_window={config.sliding_window} has no stock Llama equivalent")
    rope_theta = float(config.base)
    dt = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim_model,
        "intermediate_size": config.dim_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_length,
        "rms_norm_eps": config.eps,
        "rope_theta": rope_theta,  # read by transformers 4.x and older vLLM
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},  # transformers 5.x
        "attention_bias": config.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": dt,
        "dtype": dt,
        MUP_KEY: {"config": config.to_dict(), "folded": {"embed_tokens": mup_factors(config)[0],
                                                         "o_proj,down_proj": mup_factors(config)[1],
                                                         "lm_head": 1.0 / mup_factors(config)[2]}},
    }


def dragonfly_config_from_hf(hf: Mapping[str, Any]) -> Any:
    """Our config for a Llama ``config.json``: the recorded original when we exported it, else plain
    (``scale: false``, no residual scaling, head tied as in the HF config)."""
    if hf.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"not a Llama checkpoint (model_type={hf.get('model_type')!r}); only Llama imports")
    record = hf.get(MUP_KEY)
    if isinstance(record, Mapping) and "config" in record:
        return as_config(record["config"], "config.json:" + MUP_KEY)
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true Llama models have no dragonfly equivalent")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"config.json: rope scaling {rope or hf.get('rope_scaling')} is not supported by dragonfly")
    heads = int(hf["num_attention_heads"])
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return as_config({
        "vocab_size": int(hf["vocab_size"]),
        "dim_model": int(hf["hidden_size"]),
        "dim_ff": int(hf["intermediate_size"]),
        "dim_head": int(hf.get("head_dim") or hf["hidden_size"] // heads),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "num_layers": int(hf["num_hidden_layers"]),
        "activate_fn": hf.get("hidden_act", "silu"),
        "eps": float(hf.get("rms_norm_eps", 1e-6)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "scale": False,
        "scale_emb": 1.0,
        "scale_depth": -1.0,
        "tie_lm_head": bool(hf.get("tie_word_embeddings", False)),
        "base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "qkv_bias": bool(hf.get("attention_bias", False)),
        "max_length": int(hf.get("max_position_embeddings", 4096)),
        "dtype": str(dtype).removeprefix("torch."),
    }, "config.json")


# ------------------------------------------------------------------------------- weights


def dragonfly_to_hf(state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our (upstream-named) state dict → Llama state dict with the muP factors folded in."""
    cfg = as_config(cfg)
    emb_scale, depth_scale, width = mup_factors(cfg)
    target = dtype or next(iter(state.values())).dtype
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        m = _LAYER_RE.match(key)
        if m and m.group(2) in LAYER_MAP:
            hf_key = f"model.layers.{m.group(1)}.{LAYER_MAP[m.group(2)]}"
        elif key in _GLOBAL_MAP:
            hf_key = _GLOBAL_MAP[key]
        else:
            unknown.append(key)
            continue
        factor = (emb_scale if hf_key == "model.embed_tokens.weight" else
                  depth_scale if hf_key.endswith(_DEPTH_SCALED) else
                  1.0 / width if hf_key == "lm_head.weight" else 1.0)
        out[hf_key] = _scaled(value, factor, target)
    if unknown:
        raise KeyError(f"state dict keys with no Llama equivalent: {unknown[:8]}{' …' if len(unknown) > 8 else ''}")
    if "model.embed_tokens.weight" not in out:
        raise KeyError("state dict has no input_embedding.weight: is this a dragonfly checkpoint?")
    if "lm_head.weight" not in out:
        # Tied head: logits = (h / scale_width) @ Eᵀ.
        out["lm_head.weight"] = _scaled(state["input_embedding.weight"], 1.0 / width, target)
    if cfg.qkv_bias:
        # Llama's attention_bias also gives o_proj a bias: ours has none, so it is zero.
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.dim_model, dtype=target)
    _check_layers(out, cfg.num_layers, "model.layers.{i}.", [v for v in LAYER_MAP.values()
                                                             if cfg.qkv_bias or not v.endswith("bias")])
    return out


def _scaled(value: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``value · factor`` computed in fp32 and stored as ``dtype``, one tensor at a time (a 2.4B
    model never sits whole in fp32)."""
    if factor == 1.0:
        return value.detach().to(dtype).contiguous()
    return (value.detach().to(torch.float32) * factor).to(dtype).contiguous()


def hf_to_dragonfly(hf_state: Mapping[str, torch.Tensor], hf_cfg: Mapping[str, Any],
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Llama state dict → (our state dict, our config); unfolds muP when we exported it."""
    cfg = dragonfly_config_from_hf(hf_cfg)
    emb_scale, depth_scale, width = mup_factors(cfg)
    inv_layer = {v: k for k, v in LAYER_MAP.items()}
    inv_global = {v: k for k, v in _GLOBAL_MAP.items()}
    target = dtype or next(iter(hf_state.values())).dtype
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in hf_state.items():
        if key.endswith("rotary_emb.inv_freq") or key.endswith("o_proj.bias"):
            continue  # buffers of old exports; o_proj bias is zero in ours (checked below)
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in inv_layer:
            our_key = f"encoder.layers.{m.group(1)}.{inv_layer[m.group(2)]}"
        elif key in inv_global:
            our_key = inv_global[key]
        else:
            unknown.append(key)
            continue
        factor = (1.0 / emb_scale if key == "model.embed_tokens.weight" else
                  1.0 / depth_scale if key.endswith(_DEPTH_SCALED) else
                  width if key == "lm_head.weight" else 1.0)
        out[our_key] = _scaled(value, factor, target)
    if unknown:
        raise KeyError(f"Llama keys with no dragonfly equivalent: {unknown[:8]}{' …' if len(unknown) > 8 else ''}")
    for key, value in hf_state.items():
        if key.endswith("o_proj.bias") and bool(value.detach().float().abs().max() > 0):
            raise ValueError(f"{key} is non-zero: dragonfly has no output-projection bias")
    if cfg.tie_lm_head:
        head = out.pop("lm_head.weight", None)
        emb = out["input_embedding.weight"]
        # both were rounded to the export dtype after scaling: allow a few ulps of it
        rtol = 4 * torch.finfo(hf_state["lm_head.weight"].dtype).eps if head is not None else 0.0
        if head is not None and not torch.allclose(head.float(), emb.float(), rtol=rtol, atol=1e-6):
            raise ValueError("config says the head is tied but lm_head differs from embed_tokens·scale_width")
    return out, cfg


def _check_layers(state: Mapping[str, Any], num_layers: int, prefix: str, names: Sequence[str]) -> None:
    missing = [prefix.format(i=i) + n for i in range(num_layers) for n in names if prefix.format(i=i) + n not in state]
    if missing:
        raise KeyError(f"{len(missing)} keys missing, e.g. {missing[:6]}: checkpoint and config disagree "
                       f"(num_layers={num_layers}?)")


# ------------------------------------------------------------------------------- files


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.I)
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB")
    unit = m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _save_file(save_file: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from fm.io import as_if_created

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as exc:  # safetensors reports a full disk as "I/O error: ... (os error 28)"
        errno = re.search(r"os error (\d+)", str(exc))
        if errno is None:
            raise
        raise OSError(int(errno.group(1)), os.strerror(int(errno.group(1))), str(path)) from exc
    as_if_created(path)  # safetensors creates its file 0600: a serving job under another uid could not read it


def save_safetensors_sharded(state: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index when bigger than one shard."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        _save_file(save_file, shards[0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _save_file(save_file, shard, out_dir / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def load_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(hf_dir / f)))
        return state
    if (hf_dir / "model.safetensors").is_file():
        return load_file(str(hf_dir / "model.safetensors"))
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(load_torch(b))
        return state
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")


# ------------------------------------------------------------------------------- tokenizer


# Written by transformers 5's save_pretrained but runtime state, or spelled so transformers 4 cannot read it.
_DROP_KEYS = ("is_local", "local_files_only", "backend")
CHAT_SAMPLES = ([{"role": "user", "content": "你好，介绍一下你自己。"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\n\tWho are you?"},
                 {"role": "assistant", "content": "A model."}, {"role": "user", "content": "2 + 2 = ?"}])


def write_tokenizer_files(sp_model: Path, out_dir: Path, chat_format: str | None = "fm9g") -> None:
    """``tokenizer.model`` + ``tokenizer_config.json`` (and ``tokenizer.json`` via transformers when
    it is installed, which vLLM and fast loaders prefer). ``add_prefix_space`` follows the
    SentencePiece normalizer, otherwise transformers would prepend "▁" that SentencePiece does not.

    ``chat_format`` (see fm.chat) becomes the ``chat_template``, checked to give the ids fm generate feeds the
    model. The config loads in transformers 4.4x–4.57 and 5.x alike: the special tokens are listed as
    ``additional_special_tokens`` (transformers 5 reads that name and writes ``extra_special_tokens``, a list
    that transformers 4 takes for a dict).
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from fm.chat import jinja_template, render

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if chat_format is not None:
        tok_cfg["chat_template"] = jinja_template(chat_format)
    _write_config(out_dir, tok_cfg)
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a test dependency
        log.warning("transformers not installed: wrote tokenizer.model only (no tokenizer.json)")
        return
    hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
    sample = "Hello world. 你好，世界！\n\tdef f(x): return x  # 😀"
    if hf_tok(sample).input_ids != [sp.bos_id()] + sp.encode(sample):
        log.warning("transformers' tokenizer encodes differently from SentencePiece; kept tokenizer.model only")
        return
    hf_tok.save_pretrained(str(out_dir))
    saved = json.loads((out_dir / "tokenizer_config.json").read_text())
    specials = saved.pop("extra_special_tokens", None) or saved.pop("additional_special_tokens", None)
    if isinstance(specials, dict):  # named extra tokens (transformers 4's meaning of the key): keep them named
        saved["extra_special_tokens"] = specials
    elif specials:
        saved["additional_special_tokens"] = list(specials)
    for k in _DROP_KEYS:
        saved.pop(k, None)
    # save_pretrained rewrites tokenizer_config.json: keep our explicit flags (and the template) in it.
    saved.update({k: tok_cfg[k] for k in ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")})
    if chat_format is not None:
        saved["chat_template"] = tok_cfg["chat_template"]
        (out_dir / "chat_template.jinja").unlink(missing_ok=True)  # one home: tokenizer_config.json
    _write_config(out_dir, saved)
    if chat_format is not None:
        hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
        for messages in CHAT_SAMPLES:
            want = [sp.bos_id()] + sp.encode(render(messages, chat_format))
            got = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            got = got["input_ids"] if isinstance(got, Mapping) else list(got)
            if got != want:
                raise ValueError(f"the {chat_format} chat template tokenizes {messages} as {got}, but fm generate "
                                 f"feeds {want}: the tokenizer {sp_model} does not hold the format's markers as "
                                 "single pieces; export with --chat-template none")


def _write_config(out_dir: Path, cfg: Mapping[str, Any]) -> None:
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def special_ids(sp_model: Path | None) -> tuple[int, int, int | None]:
    """``(bos, eos, pad or None)`` of a SentencePiece model; Llama's 1, 2 and no pad without one."""
    if sp_model is None:
        return 1, 2, None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pad = sp.pad_id()
    return sp.bos_id(), sp.eos_id(), pad if pad >= 0 else None
