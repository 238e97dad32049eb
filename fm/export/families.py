"""The open checkpoint families ``fm import`` maps onto dragonfly and ``fm export`` writes back: one entry of
:data:`FAMILIES` per Hugging Face ``model_type``.

Every family here stores its weights under Llama's names (:mod:`fm.export.llama`); what differs is
``config.json``. An entry says how its keys become dragonfly keys (``read``), how a dragonfly config becomes
its keys again (``write``; None: exported as stock Llama with the muP factors folded in), and the defaults
transformers assumes for keys a ``config.json`` leaves out.

==========  ==========================  ===============================================================
model_type  class                       maps to dragonfly
==========  ==========================  ===============================================================
llama       LlamaForCausalLM            plain; ``attention_bias`` → ``qkv_bias`` (o_proj bias must be
                                        zero); ``rope_type: llama3`` → ``rope_scaling_type: llama3``
qwen2       Qwen2ForCausalLM            ``qkv_bias: true``; a sliding window only on every layer
qwen3       Qwen3ForCausalLM            ``qk_norm: true``, ``head_dim`` → ``dim_head``
mistral     MistralForCausalLM          ``sliding_window`` (same convention: ``window`` keys, itself included)
minicpm     (remote code; exported as   ``scale: true`` with ``scale_emb``, ``scale_depth``,
            LlamaForCausalLM, folded)   ``dim_model_base`` (MiniCPM's muP is dragonfly's)
fm9g,       (upstream FM9G 4B / 7B,     MiniCPM's mapping when the config has the muP keys, else plain;
fm9g7b      remote code; exported as    ``attention_bias`` (or ``qkv_bias``) → ``qkv_bias``; multi-head
            LlamaForCausalLM, folded)   latent attention keys (``q_lora_rank`` …) refused
==========  ==========================  ===============================================================

Common to all: ``tie_word_embeddings`` → ``tie_lm_head``; refused with the file, the key and the reason:
an unknown ``model_type``, other rope types (yarn, longrope, dynamic, linear …), ``partial_rotary_factor``,
MoE keys, ``mlp_bias``, an activation other than SiLU. The weights are checked against the model the config
describes (missing, unexpected, shape) by :func:`fm.export.llama.hf_to_dragonfly_weights` before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fm.errors import FmError
from fm.export.llama import MUP_KEY, as_config, hf_to_dragonfly_weights, mup_factors

MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "n_shared_experts", "shared_expert_intermediate_size", "decoder_sparse_step", "moe_layer_freq")
ROPE_KEYS_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class an export names (None-writer families: LlamaForCausalLM)
    read: Callable[[Mapping[str, Any], str], dict[str, Any]]  # config.json (defaults filled) → dragonfly keys
    write: Callable[[Any, str], dict[str, Any]] | None  # dragonfly config → its own config.json keys
    defaults: Mapping[str, Any] = field(default_factory=dict)  # transformers' defaults for absent keys


class HFFormatError(FmError, ValueError):
    """A Hugging Face directory fm cannot map exactly; the message names the file, the key and the reason."""


def _refuse(where: str, key: str, value: Any, reason: str) -> HFFormatError:
    return HFFormatError(f"{where}: {key}={value!r}: {reason}")


# ------------------------------------------------------------------------------- config.json → dragonfly


def rope_keys_from_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``base`` and the rope scaling keys. transformers 5 writes ``rope_parameters`` (theta inside), 4.x
    ``rope_theta`` + ``rope_scaling`` (``rope_type`` or the older ``type``)."""
    params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
    rope = dict(params or legacy or {})
    type_of = lambda d: (d or {}).get("rope_type", (d or {}).get("type", "default"))  # noqa: E731
    if params and legacy and type_of(params) != type_of(legacy):
        raise _refuse(where, "rope_scaling", legacy, f"disagrees with rope_parameters {params}")
    kind = type_of(rope)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _refuse(where, "partial_rotary_factor", partial, "dragonfly rotates the whole head")
    out: dict[str, Any] = {"base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return out
    if kind != "llama3":
        raise _refuse(where, "rope_type", kind, "only the default rotary and llama3 scaling are implemented "
                      "(yarn, longrope, dynamic, linear … are not)")
    missing = [k for k in ROPE_KEYS_LLAMA3 if k not in rope]
    if missing:
        raise _refuse(where, "rope_parameters", rope, f"llama3 scaling without {', '.join(missing)}")
    return {**out, "rope_scaling_type": "llama3", "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_length": int(rope["original_max_position_embeddings"])}


def _common_from_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key in MOE_KEYS:
        if hf.get(key):
            raise _refuse(where, key, hf[key], "mixture-of-experts models have no dragonfly equivalent")
    if hf.get("mlp_bias"):
        raise _refuse(where, "mlp_bias", True, "dragonfly's MLP has no biases")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, "hidden_act", act, "dragonfly's gated MLP is SiLU here (SwiGLU)")
    heads = int(hf["num_attention_heads"])
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return {
        "vocab_size": int(hf["vocab_size"]),
        "dim_model": int(hf["hidden_size"]),
        "dim_ff": int(hf["intermediate_size"]),
        "dim_head": int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "num_layers": int(hf["num_hidden_layers"]),
        "activate_fn": "silu",
        "eps": float(hf.get("rms_norm_eps", 1e-6)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "scale": False,
        "scale_emb": 1.0,
        "scale_depth": -1.0,
        "tie_lm_head": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": False,
        "max_length": int(hf.get("max_position_embeddings", 4096)),
        "dtype": str(dtype).removeprefix("torch."),
        **rope_keys_from_hf(hf, where),
    }


def _read_llama(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {"qkv_bias": bool(hf.get("attention_bias", False))}


def _qwen_window(hf: Mapping[str, Any], where: str) -> int | None:
    """Qwen2/3 slide only with ``use_sliding_window``, and then on the layers ``layer_types`` (default: from
    ``max_window_layers`` on) marks: dragonfly has one window for all layers."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window") or window is None:
        return None
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else
                                      "full_attention" for i in range(n)]
    if all(t == "sliding_attention" for t in types):
        return int(window)
    if all(t == "full_attention" for t in types):
        return None
    raise _refuse(where, "use_sliding_window", True, f"a window of {window} on some layers only (layer_types / "
                  "max_window_layers): dragonfly applies one window to every layer")


def _read_qwen2(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {"qkv_bias": True, "sliding_window": _qwen_window(hf, where)}


def _read_qwen3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {"qkv_bias": bool(hf.get("attention_bias", False)), "qk_norm": True,
            "sliding_window": _qwen_window(hf, where)}


def _read_mistral(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    # transformers' Mistral mask: key j is visible to query i when i - window < j <= i, dragonfly's convention
    window = hf.get("sliding_window")
    return {"sliding_window": None if window is None else int(window)}


def _read_minicpm(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """MiniCPM's forward: embeddings × scale_emb, each branch × scale_depth/√L, head input ÷ (hidden/dim_model_base):
    dragonfly's ``scale: true`` exactly (which applies the branch scale only when scale_depth > 0)."""
    for key in ("scale_emb", "scale_depth", "dim_model_base"):
        if key not in hf:
            raise _refuse(where, key, None, "a MiniCPM config needs it (its forward applies it)")
    if float(hf["scale_depth"]) <= 0:
        raise _refuse(where, "scale_depth", hf["scale_depth"], "dragonfly applies the branch scale only when > 0")
    if hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise _refuse(where, "rope_scaling", hf.get("rope_scaling") or hf.get("rope_parameters"),
                      "MiniCPM's rope scaling is not implemented")
    return {"qkv_bias": bool(hf.get("attention_bias", False)), "scale": True, "scale_emb": float(hf["scale_emb"]),
            "scale_depth": float(hf["scale_depth"]), "dim_model_base": int(hf["dim_model_base"])}


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")


def _read_fm9g(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Upstream FM9G's Hugging Face checkpoints (``fm9g``: the 4B, ``fm9g7b``: the 7B; ``FM9GForCausalLM``, remote
    code). Their weights carry Llama's names (upstream's ``hgface_2_bmtrain.py`` renames them onto dragonfly's,
    as :mod:`fm.export.llama` does, with no scaling); the muP keys, when the config has them, are MiniCPM's, and
    the q/k/v biases are ``attention_bias`` (or ``qkv_bias``, dragonfly's own spelling)."""
    for key in MLA_KEYS:
        if hf.get(key):
            raise _refuse(where, key, hf[key], "multi-head latent attention (MiniCPM3-style) has no dragonfly "
                          "equivalent")
    bias = bool(hf.get("attention_bias", hf.get("qkv_bias", False)))
    present = [k for k in MUP_KEYS if hf.get(k) is not None]
    if not present or hf.get("use_mup") is False:
        return {"qkv_bias": bias}
    if len(present) < len(MUP_KEYS):
        missing = next(k for k in MUP_KEYS if k not in present)
        raise _refuse(where, missing, None, f"muP needs all of {', '.join(MUP_KEYS)} (the config has "
                      f"{', '.join(present)})")
    return {**_read_minicpm(hf, where), "qkv_bias": bias}


# ------------------------------------------------------------------------------- dragonfly → config.json


def _window_keys(config: Any, where: str, family: str) -> dict[str, Any]:
    w = config.sliding_window
    if w is None:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_layers}
    return {"use_sliding_window": True, "sliding_window": w, "max_window_layers": 0,
            "layer_types": ["sliding_attention"] * config.num_layers}


def _require(where: str, ok: bool, key: str, value: Any, family: str, reason: str) -> None:
    if not ok:
        raise _refuse(where, key, value, f"{family} {reason}")


def _write_llama(config: Any, where: str) -> dict[str, Any]:
    _require(where, not config.qk_norm, "qk_norm", True, "Llama", "has no q/k norm")
    _require(where, config.sliding_window is None, "sliding_window", config.sliding_window, "Llama",
             "has no sliding window (stock Llama attends to the whole context)")
    return {"attention_bias": config.qkv_bias, "mlp_bias": False}


def _write_qwen2(config: Any, where: str) -> dict[str, Any]:
    _require(where, config.qkv_bias, "qkv_bias", False, "Qwen2", "always has q/k/v biases")
    _require(where, not config.qk_norm, "qk_norm", True, "Qwen2", "has no q/k norm")
    return _window_keys(config, where, "Qwen2")


def _write_qwen3(config: Any, where: str) -> dict[str, Any]:
    _require(where, config.qk_norm, "qk_norm", False, "Qwen3", "always has q/k norms")
    return {"attention_bias": config.qkv_bias, **_window_keys(config, where, "Qwen3")}


def _write_mistral(config: Any, where: str) -> dict[str, Any]:
    _require(where, not config.qkv_bias, "qkv_bias", True, "Mistral", "has no attention biases")
    _require(where, not config.qk_norm, "qk_norm", True, "Mistral", "has no q/k norm")
    return {"sliding_window": config.sliding_window}


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _read_llama, _write_llama,
           {"max_position_embeddings": 2048}),
    Family("qwen2", "Qwen2ForCausalLM", _read_qwen2, _write_qwen2,
           {"max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 4096}),
    Family("qwen3", "Qwen3ForCausalLM", _read_qwen3, _write_qwen3,
           {"max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 4096, "head_dim": 128}),
    Family("mistral", "MistralForCausalLM", _read_mistral, _write_mistral,
           {"max_position_embeddings": 4096 * 32, "sliding_window": 4096, "num_key_value_heads": 8}),
    Family("minicpm", "LlamaForCausalLM", _read_minicpm, None,  # remote code: exported as stock Llama, muP folded
           {"tie_word_embeddings": True}),
    # upstream FM9G (remote code): exported as stock Llama, muP folded
    Family("fm9g", "LlamaForCausalLM", _read_fm9g, None, {"tie_word_embeddings": True}),
    Family("fm9g7b", "LlamaForCausalLM", _read_fm9g, None, {"tie_word_embeddings": True}),
)}


def family_of(hf: Mapping[str, Any], where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(where, "model_type", model_type, f"not a family fm maps (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def dragonfly_config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> Any:
    """Our config for a family's ``config.json``: the recorded original when fm exported it (muP folded into the
    weights), else the family's mapping (``hf_model_type`` recording where it came from)."""
    record = hf.get(MUP_KEY)
    if isinstance(record, Mapping) and "config" in record:
        return as_config(record["config"], f"{where}:{MUP_KEY}")
    family = family_of(hf, where)
    full = {**family.defaults, **hf}
    return as_config({**_common_from_hf(full, where), **family.read(full, where),
                      "hf_model_type": family.model_type}, where)


def hf_to_dragonfly(hf_state: Mapping[str, torch.Tensor], hf_cfg: Mapping[str, Any],
                    dtype: torch.dtype | None = None, *, where: str = "config.json",
                    sources: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """A family's weights and ``config.json`` → (our state dict, our config), checked against each other.
    ``sources``: the file each weight came from (named in errors)."""
    cfg = dragonfly_config_from_hf(hf_cfg, where)
    folded = isinstance(hf_cfg.get(MUP_KEY), Mapping)
    state = hf_to_dragonfly_weights(hf_state, cfg, dtype, folded=folded, sources=sources or {},
                                    where=str(Path(where).parent))
    return state, cfg


def tied_export(config: Any) -> bool:
    """A tied head exports tied (one tensor, ``tie_word_embeddings: true``) when no muP factor separates the
    input embedding from the head; otherwise ``lm_head`` is written as its own, scaled, tensor."""
    emb, _, width = mup_factors(config)
    return bool(config.tie_lm_head) and emb == 1.0 and width == 1.0


def export_family(config: Any) -> Family | None:
    """The family ``fm export`` writes: the one it was imported from; None (stock Llama, muP folded) for
    dragonfly's own checkpoints and families without a transformers class (MiniCPM)."""
    name = config.hf_model_type
    if name is None:
        return None
    if name not in FAMILIES:
        raise _refuse(config.source, "hf_model_type", name, f"not a known family ({', '.join(FAMILIES)})")
    family = FAMILIES[name]
    return family if family.write is not None else None


def hf_config_from_dragonfly(config: Any, dtype: torch.dtype, bos_id: int | None = 1, eos_id: int | None = 2,
                             pad_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of an export: the source family's class and keys, or stock Llama with muP folded."""
    config = as_config(config)
    where = config.source
    if config.activate_fn != "silu":
        raise _refuse(where, "activate_fn", config.activate_fn, "the exported families need 'silu'")
    family = export_family(config)
    if family is None:
        keys, model_type, arch = _write_llama(config, where), "llama", "LlamaForCausalLM"
    else:
        keys, model_type, arch = family.write(config, where), family.model_type, family.architecture
    rope_theta = float(config.base)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    legacy_scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**legacy_scaling, "rope_theta": rope_theta}
    dt = str(dtype).removeprefix("torch.")
    emb, residual, width = mup_factors(config)
    return {
        "architectures": [arch],
        "model_type": model_type,
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
        **({"rope_scaling": legacy_scaling} if legacy_scaling else {}),  # idem: 4.x reads the llama3 parameters here
        "rope_parameters": rope,  # transformers 5.x
        **keys,
        "tie_word_embeddings": tied_export(config),
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": dt,
        "dtype": dt,
        MUP_KEY: {"config": config.to_dict(), "folded": {"embed_tokens": emb, "o_proj,down_proj": residual,
                                                         "lm_head": 1.0 / width}},
    }
