"""Import the released iFlytekSpark-13B Megatron-DeepSpeed checkpoints into our spark state dict.

The GPU release ships one ``mp_rank_XX_model_states.pt`` per tensor-parallel rank. Each holds
(usually under ``['module']``, sometimes ``['model']``) a ``language_model`` tree:
``embedding.word_embeddings.weight`` and ``encoder.layers.{i}.…`` /
``encoder.final_layernorm.{weight,bias}``, either as nested dicts or as flat dotted keys (both
are read). Merging the shards:

* column-parallel (split on dim 0): ``query_key_value``, ``dense_h_to_4h`` (weights and biases)
  and the vocab-parallel ``word_embeddings``;
* row-parallel (split on dim 1): ``dense``, ``dense_4h_to_h`` weights; their biases are
  replicated (taken from rank 0, checked equal);
* each shard's ``query_key_value`` rows are ``[Wq_r; Wk_r; Wv_r]`` (its own heads), so q, k and v
  are split per shard and then concatenated over shards;
* each shard's ``dense_h_to_4h`` rows interleave gate and up (even rows gate, odd rows up).

CLI (also ``python -m fm.export.spark_import``)::

    fm import-spark --megatron-dir DIR --output spark13b.pt [--config spark/13b] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fm.checkpoint.open import write_config_beside
from fm.errors import FmError
from fm.io import atomic_torch_save
from fm.models.config import DTYPES
from fm.models.registry import load_model_config
from fm.models.spark import MEGATRON_TO_SPARK  # the model module owns its checkpoint names

log = logging.getLogger("fm.export.spark_import")

_SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_PP_SHARD_RE = re.compile(r"^mp_rank_(\d+)_(\d+)_model_states\.pt$")

# Megatron names per layer (after "encoder.layers.{i}.") → canonical names used below.
MEGATRON_LAYER = {
    "input_layernorm.weight": "ln1.weight",
    "input_layernorm.bias": "ln1.bias",
    "self_attention.query_key_value.weight": "qkv.weight",
    "self_attention.query_key_value.bias": "qkv.bias",
    "self_attention.dense.weight": "o.weight",
    "self_attention.dense.bias": "o.bias",
    "post_attention_layernorm.weight": "ln2.weight",
    "post_attention_layernorm.bias": "ln2.bias",
    "mlp.dense_h_to_4h.weight": "h4h.weight",
    "mlp.dense_h_to_4h.bias": "h4h.bias",
    "mlp.dense_4h_to_h.weight": "down.weight",
    "mlp.dense_4h_to_h.bias": "down.bias",
}
MEGATRON_GLOBAL = {
    "embedding.word_embeddings.weight": "embed.weight",
    "output_layer.weight": "head.weight",  # only in untied checkpoints (vocab-parallel like the embedding)
    "encoder.final_layernorm.weight": "final_ln.weight",
    "encoder.final_layernorm.bias": "final_ln.bias",
}
# Keys that carry no weights we need (buffers, untied copies of the tied head).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq|\._extra_state)$")

_COLUMN = ("qkv.weight", "qkv.bias", "h4h.weight", "h4h.bias")
_ROW = ("o.weight", "down.weight")
_REPLICATED = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "o.bias", "down.bias")


class SparkImportError(FmError, ValueError):
    """The Megatron checkpoint cannot be imported; the message names the file and key."""


# ------------------------------------------------------------------------------- reading shards


def find_shards(megatron_dir: str | os.PathLike) -> list[Path]:
    """``mp_rank_00..NN_model_states.pt`` in ``DIR``, in ``DIR/<latest>`` or the last ``DIR/global_step*``."""
    root = Path(megatron_dir)
    if not root.is_dir():
        raise SparkImportError(f"{root}: not a directory (pass the folder holding mp_rank_XX_model_states.pt)")
    candidates = [root]
    latest = root / "latest"
    if latest.is_file():
        candidates.append(root / latest.read_text().strip())
    steps = sorted(root.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or -1))
    candidates += steps[::-1]
    for d in candidates:
        if not d.is_dir():
            continue
        if any(_PP_SHARD_RE.match(p.name) for p in d.iterdir()):
            raise SparkImportError(
                f"{d}: pipeline-parallel shards (mp_rank_XX_YYY_model_states.pt) are not "
                "supported; merge the pipeline stages with Megatron's tools first"
            )
        shards = sorted(
            (p for p in d.iterdir() if _SHARD_RE.match(p.name)), key=lambda p: int(_SHARD_RE.match(p.name).group(1))
        )
        if shards:
            ranks = [int(_SHARD_RE.match(p.name).group(1)) for p in shards]
            if ranks != list(range(len(ranks))):
                raise SparkImportError(
                    f"{d}: tensor-parallel ranks {ranks} are not 0..{len(ranks) - 1}: a shard file is missing"
                )
            return shards
    raise SparkImportError(f"{root}: no mp_rank_XX_model_states.pt (looked in {', '.join(map(str, candidates))})")


def _load(path: Path) -> Any:
    """A shard with tensors and plain data only, plus what Megatron-DeepSpeed pickles beside the weights: its
    ``args`` (an ``argparse.Namespace``) and numpy RNG states. Anything else is refused, never unpickled."""
    import argparse

    from fm.io import load_torch, numpy_array_globals

    return load_torch(path, allow=[argparse.Namespace, *numpy_array_globals()], mmap=True)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def language_model_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat ``language_model`` dict (``embedding.…``, ``encoder.…``) of one loaded shard."""
    if not isinstance(obj, Mapping):
        raise SparkImportError(f"{source}: expected a dict, got {type(obj).__name__}")
    for key in ("module", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    flat = _flatten(obj)
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        key = key.split("language_model.", 1)[1] if "language_model." in key else key
        if key.startswith("transformer."):  # older Megatron name of the encoder
            key = "encoder." + key.removeprefix("transformer.")
        key = key.replace(".attention.", ".self_attention.")
        out[key] = value
    if not any(k.startswith("encoder.") for k in out):
        raise SparkImportError(
            f"{source}: no language_model.encoder.* tensors; top-level keys: "
            f"{sorted(obj)[:10]} (is this a Megatron model-states file?)"
        )
    return out


def to_canonical(state: Mapping[str, torch.Tensor], num_layers: int, source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    layer_re = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
    for key, value in state.items():
        m = layer_re.match(key)
        if m and m.group(2) in MEGATRON_LAYER:
            layer = int(m.group(1))
            if layer >= num_layers:
                raise SparkImportError(f"{source}: {key} but the config has num_layers={num_layers}")
            out[f"layers.{layer}.{MEGATRON_LAYER[m.group(2)]}"] = value
        elif key in MEGATRON_GLOBAL:
            out[MEGATRON_GLOBAL[key]] = value
        elif not _IGNORED.search(key):
            unknown.append(key)
    if unknown:
        log.warning("%s: ignoring %d unexpected tensors, e.g. %s", source, len(unknown), unknown[:5])
    expected = [v for v in MEGATRON_GLOBAL.values() if v != "head.weight"] + [
        f"layers.{i}.{n}" for i in range(num_layers) for n in MEGATRON_LAYER.values()
    ]
    missing = [k for k in expected if k not in out]
    if missing:
        inv = {v: k for k, v in MEGATRON_LAYER.items()} | {v: k for k, v in MEGATRON_GLOBAL.items()}

        def megatron_name(k: str) -> str:
            m = re.match(r"^layers\.(\d+)\.(.+)$", k)
            return f"encoder.layers.{m.group(1)}.{inv[m.group(2)]}" if m else inv[k]

        names = [megatron_name(k) for k in missing]
        raise SparkImportError(
            f"{source}: {len(missing)} tensors missing under language_model, e.g. "
            f"{names[:6]} (is this a Spark checkpoint with num_layers={num_layers}?)"
        )
    return out


# ------------------------------------------------------------------------------- merging


def merge_shards(
    shards: Sequence[Mapping[str, torch.Tensor]], num_layers: int, sources: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Canonical per-shard dicts → one unsharded canonical dict with q/k/v and gate/up split."""
    sources = list(sources or [f"shard {r}" for r in range(len(shards))])
    merged: dict[str, torch.Tensor] = {}
    merged["embed.weight"] = torch.cat([s["embed.weight"] for s in shards], dim=0)
    if all("head.weight" in s for s in shards):
        merged["head.weight"] = torch.cat([s["head.weight"] for s in shards], dim=0)
    for name in ("final_ln.weight", "final_ln.bias"):
        merged[name] = _replicated(shards, name, sources)
    for i in range(num_layers):
        p = f"layers.{i}."
        for name in _REPLICATED:
            merged[p + name] = _replicated(shards, p + name, sources)
        for name in _ROW:
            merged[p + name] = torch.cat([s[p + name] for s in shards], dim=1)
        for kind in ("weight", "bias"):
            qkv = [s[f"{p}qkv.{kind}"] for s in shards]
            for r, t in enumerate(qkv):
                if t.shape[0] % 3:
                    raise SparkImportError(f"{sources[r]}: {p}qkv.{kind} has {t.shape[0]} rows, not a multiple of 3")
            thirds = [t.chunk(3, dim=0) for t in qkv]
            for j, name in enumerate(("q", "k", "v")):
                merged[f"{p}{name}.{kind}"] = torch.cat([th[j] for th in thirds], dim=0)
            h4h = [s[f"{p}h4h.{kind}"] for s in shards]
            merged[f"{p}gate.{kind}"] = torch.cat([t[0::2] for t in h4h], dim=0)
            merged[f"{p}up.{kind}"] = torch.cat([t[1::2] for t in h4h], dim=0)
    return merged


def _replicated(shards: Sequence[Mapping[str, torch.Tensor]], name: str, sources: Sequence[str]) -> torch.Tensor:
    first = shards[0][name]
    for r in range(1, len(shards)):
        if shards[r][name].shape != first.shape or not torch.equal(shards[r][name], first):
            raise SparkImportError(
                f"{sources[r]}: {name} differs from rank 0's copy, but it should be "
                "replicated across tensor-parallel ranks"
            )
    return first


# ------------------------------------------------------------------------------- spark names


def spark_key_map(num_layers: int) -> dict[str, str]:
    """Canonical name → our spark model's state-dict key."""

    out = {}
    for canon, ours in MEGATRON_TO_SPARK.items():
        if "{i}" in canon:
            for i in range(num_layers):
                out[canon.format(i=i)] = ours.format(i=i)
        else:
            out[canon] = ours
    return out


def canonical_to_spark(
    merged: Mapping[str, torch.Tensor], config: Any, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    key_map = spark_key_map(config.num_layers)
    vocab = int(config.vocab_size)
    merged = dict(merged)
    head = merged.pop("head.weight", None)
    if config.tie_lm_head:
        if head is not None and not torch.equal(head, merged["embed.weight"]):
            log.warning("the checkpoint has an output_layer that differs from the embedding, but the config ties "
                        "the head (tie_lm_head: true): output_layer is dropped")
    else:
        if head is None:
            raise SparkImportError("the config has tie_lm_head: false but the checkpoint has no "
                                   "language_model.output_layer.weight: use a tied config")
        merged["head.weight"] = head
        key_map = {**key_map, "head.weight": "lm_head.weight"}
    out: dict[str, torch.Tensor] = {}
    for canon, value in merged.items():
        if canon not in key_map:
            raise SparkImportError(f"no spark parameter for {canon}")
        if canon in ("embed.weight", "head.weight"):
            name = "word_embeddings" if canon == "embed.weight" else "output_layer"
            if value.shape[0] < vocab:
                raise SparkImportError(
                    f"{name} has {value.shape[0]} rows but the config's vocab_size is {vocab}: wrong config?"
                )
            if value.shape[0] > vocab:  # Megatron pads the vocabulary to a multiple of 128·TP
                log.info("dropping %d padding rows of %s", value.shape[0] - vocab, name)
                value = value[:vocab]
        out[key_map[canon]] = value.to(dtype) if dtype is not None else value
    return out


def import_megatron(
    megatron_dir: str | os.PathLike, config: Any, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read every TP shard in ``megatron_dir`` and return our spark state dict."""
    shards_paths = find_shards(megatron_dir)
    shards = []
    for path in shards_paths:
        lm = language_model_state(_load(path), str(path))
        shards.append(to_canonical(lm, config.num_layers, str(path)))
    log.info("merging %d tensor-parallel shard(s) from %s", len(shards), megatron_dir)
    merged = merge_shards(shards, config.num_layers, [str(p) for p in shards_paths])
    return canonical_to_spark(merged, config, dtype)


# ------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fm import-spark",
        description="Megatron-DeepSpeed iFlytekSpark checkpoint → our spark state dict",
    )
    p.add_argument("--megatron-dir", required=True, help="directory with mp_rank_XX_model_states.pt (any TP degree)")
    p.add_argument("--config", default="spark/13b", help="spark model config json or shipped name (default spark/13b)")
    p.add_argument("--output", required=True, help="state dict .pt to write (atomically); its model config goes "
                   "beside it (<output stem>.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the checkpoint's dtype)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_model_config(args.config, "spark")
    try:
        state = import_megatron(args.megatron_dir, config, DTYPES[args.dtype] if args.dtype else None)
    except SparkImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_torch_save(state, Path(args.output))
    write_config_beside(args.output, config)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {args.output}: {len(state)} tensors, {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
