"""The Hugging Face Llama tensor layout of dragonfly checkpoints (every family of :mod:`fm.export.families` uses
it): names, muP folding, the checks of imported weights, safetensors shards and tokenizer files. The commands that
use it are :mod:`fm.export.hf`; each family's ``config.json`` is :mod:`fm.export.families`'.

Export folds the muP factors into the weights, so transformers and vLLM load the directory with
no custom code:

* ``embed_tokens = E · scale_emb``
* ``o_proj = W_o · scale_depth/√L`` and ``down_proj = W_out · scale_depth/√L`` (the residual branch scale)
* ``lm_head = E / scale_width`` (or the untied head / scale_width), written untied
  (``tie_word_embeddings: false``), because the input and output scales differ; a tied head without muP
  factors is written tied (one tensor).

The original config (its muP factors) is recorded under ``"fm_dragonfly"`` in ``config.json`` (ignored by other tools),
so ``import`` restores the original parameterisation exactly up to fp rounding. A directory without that record
imports through its family's mapping (plain Llama: ``scale: false``, the head tied as its config says).
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
    "self_att.self_attention.q_norm.weight": "self_attn.q_norm.weight",  # qk_norm (Qwen3)
    "self_att.self_attention.k_norm.weight": "self_attn.k_norm.weight",
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


# ------------------------------------------------------------------------------- weights


def dragonfly_to_hf(state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dtype: torch.dtype | None = None,
                    *, tied: bool = False, o_bias: bool | None = None) -> dict[str, torch.Tensor]:
    """Our (upstream-named) state dict → Llama-named state dict with the muP factors folded in.

    ``tied``: write no ``lm_head`` (the export says ``tie_word_embeddings: true``; only without muP factors).
    ``o_bias``: write a zero ``o_proj.bias`` (Llama-style ``attention_bias`` gives o_proj one too; default:
    when the q/k/v projections have biases)."""
    cfg = as_config(cfg)
    emb_scale, depth_scale, width = mup_factors(cfg)
    if tied and not (cfg.tie_lm_head and emb_scale == 1.0 and width == 1.0):
        raise ValueError(f"{cfg.source}: a tied export needs a tied head without muP factors")
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
    if "lm_head.weight" not in out and not tied:
        # Tied head: logits = (h / scale_width) @ Eᵀ; its own tensor (safetensors refuses shared storage).
        out["lm_head.weight"] = _scaled(state["input_embedding.weight"], 1.0 / width, target).clone()
    if cfg.qkv_bias if o_bias is None else o_bias:
        # Llama's attention_bias also gives o_proj a bias: ours has none, so it is zero.
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.dim_model, dtype=target)
    _check_layers(out, cfg.num_layers, "model.layers.{i}.", [v for k, v in LAYER_MAP.items() if _expected(k, cfg)])
    return out


def _expected(layer_key: str, cfg: Any) -> bool:
    """Whether a dragonfly layer has ``layer_key`` (LAYER_MAP's keys) under ``cfg``."""
    if layer_key.endswith("bias"):
        return cfg.qkv_bias
    if "_norm." in layer_key:
        return cfg.qk_norm
    return True


def _scaled(value: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``value · factor`` computed in fp32 and stored as ``dtype``, one tensor at a time (a 2.4B
    model never sits whole in fp32)."""
    if factor == 1.0:
        return value.detach().to(dtype).contiguous()
    return (value.detach().to(torch.float32) * factor).to(dtype).contiguous()


def hf_to_dragonfly_weights(hf_state: Mapping[str, torch.Tensor], cfg: Any, dtype: torch.dtype | None = None, *,
                            folded: bool = False, sources: Mapping[str, str] | None = None,
                            where: str = "") -> dict[str, torch.Tensor]:
    """Llama-named weights → our state dict for ``cfg``; ``folded``: fm exported them (muP folded in, undone here).

    Refused, naming the file and the key: a weight with no dragonfly place, a non-zero ``o_proj.bias``, a
    missing weight, a shape other than the config's, a "tied" head that differs from the embedding."""
    from fm.models.registry import build_model

    sources = sources or {}
    file_of = lambda k: sources.get(k, where or "weights")  # noqa: E731
    emb_scale, depth_scale, width = mup_factors(cfg) if folded else (1.0, 1.0, 1.0)
    inv_layer = {v: k for k, v in LAYER_MAP.items()}
    inv_global = {v: k for k, v in _GLOBAL_MAP.items()}
    target = dtype or next(iter(hf_state.values())).dtype
    out: dict[str, torch.Tensor] = {}
    hf_name: dict[str, str] = {}  # ours → theirs, for the messages
    unknown = []
    for key, value in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # buffers of old exports
        if key.endswith("o_proj.bias"):
            if bool(value.detach().float().abs().max() > 0):
                raise ValueError(f"{file_of(key)}: {key} is non-zero: dragonfly has no output-projection bias")
            continue
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
        hf_name[our_key] = key
    if unknown:
        raise KeyError(f"{file_of(unknown[0])}: {unknown[0]}: no dragonfly equivalent"
                       + (f" (and {len(unknown) - 1} more: {unknown[1:8]})" if len(unknown) > 1 else ""))
    if cfg.tie_lm_head and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        emb = out.get("input_embedding.weight")
        # both were rounded to the export dtype after scaling: allow a few ulps of it
        rtol = 4 * torch.finfo(hf_state["lm_head.weight"].dtype).eps
        if emb is not None and not (head.shape == emb.shape and torch.allclose(head.float(), emb.float(), rtol=rtol,
                                                                               atol=1e-6)):
            raise ValueError(f"{file_of('lm_head.weight')}: lm_head.weight: config.json says the head is tied "
                             "(tie_word_embeddings) but it differs from model.embed_tokens.weight")
    want = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    hf_name.update({v: k for k, v in _hf_names(want).items() if v not in hf_name})
    missing = [hf_name[k] for k in want if k not in out]
    if missing:
        raise KeyError(f"{where or 'weights'}: {missing[0]}: missing (config.json describes it"
                       + (f"; {len(missing) - 1} more missing, e.g. {missing[1:6]})" if len(missing) > 1 else ")"))
    for k, v in out.items():
        if k not in want:  # a layer index past num_hidden_layers
            raise KeyError(f"{file_of(hf_name[k])}: {hf_name[k]}: unexpected (config.json has "
                           f"num_hidden_layers={cfg.num_layers})")
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{file_of(hf_name[k])}: {hf_name[k]}: shape {list(v.shape)}, but config.json "
                             f"describes {list(want[k])}")
    return out


def _hf_names(keys) -> dict[str, str]:
    """HF name → our name for our ``keys`` (inverse of the renaming above)."""
    names = {}
    for key in keys:
        m = _LAYER_RE.match(key)
        if m and m.group(2) in LAYER_MAP:
            names[f"model.layers.{m.group(1)}.{LAYER_MAP[m.group(2)]}"] = key
        elif key in _GLOBAL_MAP:
            names[_GLOBAL_MAP[key]] = key
    return names


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


def load_hf_state_dict(hf_dir: Path, sources: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face directory; ``sources`` (when given) is filled with each key's file."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else load_torch(f)
        state.update(part)
        if sources is not None:
            sources.update(dict.fromkeys(part, str(f)))
    return state


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
