"""LoRA with PEFT: inject adapters into our models before an engine shards them, count, save, load, merge.

Adapters come from ``peft`` (``inject_adapter_in_model``), so they are PEFT's own ``lora.Linear``
modules and an adapter directory is PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_{A,B}.weight`` (written, read and merged by
:mod:`fm.train.lora_adapter`). ``PeftModel.from_pretrained(model, DIR)`` and ``set_peft_model_state_dict``
read it back onto a freshly built model.

Flow in the trainer (``lora: true``)::

    meta = build_model(config, device="meta")
    peft_cfg = inject(meta, LoraSettings(r=8, alpha=16, targets=("q", "k", "v")))  # base frozen
    model = engine.shard(meta, ...)           # fsdp / bmtrain shard base + adapters layer by layer
    load_base_weights(engine, "base.pt")      # base weights map onto ``…q_proj.base_layer.weight``
    ... train: only lora_A / lora_B have requires_grad ...
    adapter_parts(engine, step, ...)          # checkpoints hold the adapter only (+ optimizer, data state)

Target names (``lora_targets``) are short aliases resolved per model family — ``q k v out fc0/gate
fc1/up fc2/down`` — or the module names themselves (spark ``q_proj … fc2``; dragonfly ``project_q …
w_out``; Hugging Face names ``q_proj … down_proj`` for dragonfly too).

Merge: ``W += (B @ A) · alpha / r`` (``alpha / √r`` with ``use_rslora``), the rule PEFT and Spark's
released merge script use. ``dragonfly_adapter_to_hf`` renames a dragonfly adapter to the Hugging Face
Llama export's module names and folds the muP residual scale into ``lora_B`` of ``o_proj`` and
``down_proj`` (the export folds ``scale_depth/√L`` into those weights, so the adapter's delta must carry
it too).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fm.train.lora_adapter import ADAPTER_CONFIG, LoraError, load_adapter, save_adapter, write_adapter_files

if TYPE_CHECKING:
    from peft import LoraConfig

    from fm.distributed.base import Engine

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"

# Short target names → module names, per model family.
TARGET_ALIASES: dict[str, dict[str, str]] = {
    "spark": {
        "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "out": "out_proj",
        "fc0": "fc0", "gate": "fc0", "fc1": "fc1", "up": "fc1", "fc2": "fc2", "down": "fc2",
        "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "out_proj",
        "gate_proj": "fc0", "up_proj": "fc1", "down_proj": "fc2",
    },
    "dragonfly": {
        "q": "project_q", "k": "project_k", "v": "project_v", "o": "attention_out", "out": "attention_out",
        "fc0": "w_in.w_0", "gate": "w_in.w_0", "fc1": "w_in.w_1", "up": "w_in.w_1", "fc2": "w_out", "down": "w_out",
        "project_q": "project_q", "project_k": "project_k", "project_v": "project_v",
        "attention_out": "attention_out", "w_0": "w_in.w_0", "w_1": "w_in.w_1", "w_in.w_0": "w_in.w_0",
        "w_in.w_1": "w_in.w_1", "w_out": "w_out",
        "q_proj": "project_q", "k_proj": "project_k", "v_proj": "project_v", "o_proj": "attention_out",
        "gate_proj": "w_in.w_0", "up_proj": "w_in.w_1", "down_proj": "w_out",
    },
}  # fmt: skip

# Wrappers that insert name parts (bmtrain Block, activation-checkpoint wrappers, torch.compile).
_WRAPPER_PARTS = ("._module.", "._checkpoint_wrapped_module.", "._orig_mod.", "._fsdp_wrapped_module.")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise LoraError(f"lora_r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise LoraError(f"lora_alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LoraError("lora_targets is empty: name at least one module, e.g. \"q,k,v\"")


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q,k,v"``, ``"q k v"`` or MindFormers' ``"q_proj|v_proj|k_proj"``."""
    return tuple(t for t in re.split(r"[,\s|]+", text.strip()) if t)


def settings_from_train_config(cfg: Any) -> LoraSettings:
    """From the train config's ``lora`` section (:class:`fm.train.config.LoraSection`)."""
    return LoraSettings(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets)


def _family(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_family", "dragonfly"))


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Module names PEFT should adapt; every target must match at least one ``nn.Linear`` of ``model``."""
    family = _family(model)
    aliases = TARGET_ALIASES.get(family, {})
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out: list[str] = []
    for t in targets:
        name = aliases.get(t, t)
        if not any(n == name or n.endswith("." + name) for n in linears):
            known = sorted({k for k in aliases if len(k) <= 5}) or ["<module names>"]
            raise LoraError(f"lora target {t!r} matches no linear layer of the {family} model; use one of "
                            f"{known} or a module name such as {linears[0].rsplit('.', 1)[-1] if linears else '?'}")
        if name not in out:
            out.append(name)
    return out


def peft_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=resolve_targets(model, settings.targets), bias="none")


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B"))


def canonical_name(name: str) -> str:
    """The model's own parameter name (wrapper parts removed)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, ".")
    return name


def reset_adapters(module: nn.Module) -> None:
    """PEFT's initialisation of every adapter under ``module`` (A: Kaiming uniform, B: zeros)."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoraLayer):
                for name in m.lora_A:
                    m.reset_lora_parameters(name, True)


def _init_with_adapters(layer: nn.Module):
    inner = layer.init_weights

    def init_weights(*args: Any, **kwargs: Any) -> None:
        inner(*args, **kwargs)
        reset_adapters(layer)

    return init_weights


def inject(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """Put LoRA adapters into ``model`` in place (meta or real), freeze everything else; return the LoraConfig.

    Each ``encoder.layers[i].init_weights`` is extended to initialise its adapters as PEFT does, so an
    engine that materialises a meta model layer by layer (``to_empty`` + ``init_weights``) gets proper
    adapters (random A, zero B: the model starts equal to its base)."""
    from peft import inject_adapter_in_model

    cfg = peft_config(model, settings)
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name))
    for layer in model.encoder.layers:
        layer.init_weights = _init_with_adapters(layer)
    if not any(p.device.type == "meta" for p in model.parameters()):
        reset_adapters(model)
    return cfg


def count_parameters(model: nn.Module, shapes: Mapping[str, torch.Size] | None = None) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (a tied weight counted once). ``shapes`` gives full shapes
    when ``model`` is sharded (``engine.param_shapes``)."""
    seen: set[int] = set()
    trainable = total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = math.prod(shapes[name]) if shapes and name in shapes else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe(trainable: int, total: int) -> str:
    pct = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


# ----------------------------------------------------------------------------- key names
def model_key_to_peft(name: str) -> str:
    """``encoder….q_proj.lora_A.default.weight`` → ``base_model.model.encoder….q_proj.lora_A.weight``."""
    return PEFT_PREFIX + canonical_name(name).replace(f".{ADAPTER_NAME}.", ".")


def peft_key_to_model(key: str) -> str:
    """Inverse of :func:`model_key_to_peft`."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER_NAME}.", key)


def base_key(name: str) -> str:
    """Parameter name in the plain model (``….q_proj.base_layer.weight`` → ``….q_proj.weight``)."""
    return canonical_name(name).replace(".base_layer.", ".")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-format adapter state (fp32, CPU) of a plain (unsharded) model."""
    return _peft_state({n: p.detach() for n, p in model.named_parameters() if is_lora_name(n)})


def gather_adapter_state(engine: Engine) -> dict[str, torch.Tensor]:
    """PEFT-format adapter state (fp32, CPU) of the engine's sharded model, gathered the way the engine
    gathers the whole model (under bmtrain an adapter inside a ``bmt.Block`` exists whole only while its
    block is gathered). Collective; ``{}`` on ranks other than 0."""
    state = engine.model_state_dict(keys=is_lora_name)
    return _peft_state(state) if engine.is_main else {}


def _peft_state(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not named:
        raise LoraError("the model has no LoRA adapter parameters (was fm.train.lora.inject called?)")
    # a copy: the tensors can be the live parameters (async saves write them later)
    return {model_key_to_peft(k): v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in named.items()}


def settings_from_adapter_config(cfg: Mapping[str, Any]) -> LoraSettings:
    targets = cfg.get("target_modules") or ()
    targets = parse_targets(targets) if isinstance(targets, str) else tuple(targets)
    return LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        targets=targets)


# ----------------------------------------------------------------------------- engine glue
def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Dense weights from any checkpoint form (:func:`fm.checkpoint.open.open_checkpoint`)."""
    from fm.checkpoint.open import open_checkpoint

    try:
        return open_checkpoint(path).state_dict()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_model: {path} does not exist (give a .pt state dict, a checkpoint or run "
                                "directory, or a Hugging Face export)") from None


def merge_adapter(adapter_dir: str | Path, base: str | Path | None = None, output: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict of an adapter folded into its base (``base``, else the adapter's recorded base);
    with ``output``, also written there (atomically) with its model config and tokenizer beside it
    (``<output stem>.json``, ``<output stem>.tokenizer.model`` or for a Hugging Face tokenizer the directory
    ``<output stem>.tokenizer/``)."""
    from fm.checkpoint.open import CheckpointFormError, open_checkpoint, write_config_beside, write_tokenizer_beside

    ck = open_checkpoint(adapter_dir, base=base)
    if ck.kind != "lora":
        raise LoraError(f"{adapter_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG}); it is a {ck.describe()}")
    merged = ck.state_dict()
    if dtype is not None:
        merged = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in merged.items()}
    if output is not None:
        from fm.io import atomic_torch_save

        atomic_torch_save({k: v.contiguous() for k, v in merged.items()}, output)
        try:
            write_config_beside(output, ck.model_config)
        except CheckpointFormError as e:  # an upstream adapter and base with no config anywhere: weights only
            log.warning("%s; wrote the weights only", e)
        if ck.tokenizer is not None:  # so fm generate / export / eval find it without --tokenizer
            write_tokenizer_beside(output, ck.tokenizer)
    return merged


def load_base_weights(engine: Engine, path: str | Path) -> None:
    """Load a dense state dict (``.pt`` or checkpoint dir) into the engine's model, adapters or not.

    With adapters the base weights land on ``….base_layer.*``; every non-adapter parameter must be in
    the file (and nothing else), else ``KeyError`` names the differences."""
    from fm.distributed.fsdp import check_keys

    sd = _read_state(path)
    own = [canonical_name(k) for k in engine.state_dict_keys]  # names only: reading state_dict() would gather
    base_names = {base_key(k): k for k in own if not is_lora_name(k)}
    check_keys(set(base_names), set(sd), f"load_model({path})")
    mapped = {base_names[k]: v for k, v in sd.items()}
    has_lora = len(base_names) != len(own)
    engine.load_model(mapped, strict=not has_lora)
    log.info("base weights loaded from %s (%d tensors)", path, len(mapped))


def load_adapter_into(engine: Engine, directory: str | Path) -> None:
    """Load a PEFT adapter directory (a LoRA checkpoint) into the engine's injected model."""
    _, state = load_adapter(directory)
    own = {canonical_name(k) for k in engine.state_dict_keys if is_lora_name(k)}
    mapped = {peft_key_to_model(k): v for k, v in state.items()}
    from fm.distributed.fsdp import check_keys

    check_keys(own, set(mapped), f"adapter {directory}")
    engine.load_model(mapped, strict=False)


def adapter_parts(engine: Engine, step: int, *, lora_config: Any, log_ckpt: dict[str, Any],
                  dataset_state: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                  model_config: dict[str, Any] | None = None, tokenizer_path: str | Path | None = None,
                  scheduler_state: Any = None, save_optimizer: bool = True) -> list:
    """Checkpoint parts of a LoRA run: :func:`fm.checkpoint.commit.standard_parts` with the adapter files
    (PEFT format, in the step directory itself) instead of the full model. Collective."""
    from fm.checkpoint import commit as ck

    state = gather_adapter_state(engine)
    base = (config or {}).get("model", {}).get("init_from") or None
    if base and os.path.exists(base):
        base = os.path.abspath(base)  # the adapter's base_model_name_or_path: found from wherever it is opened

    def write_adapter(d: Path) -> list[str]:
        return write_adapter_files(d, state, lora_config, base) if engine.is_main else []

    return ck.standard_parts(engine, step, log_ckpt=log_ckpt, dataset_state=dataset_state, config=config,
                             model_config=model_config, tokenizer_path=tokenizer_path, scheduler_state=scheduler_state,
                             save_optimizer=save_optimizer, model=write_adapter)


# ----------------------------------------------------------------------------- Hugging Face export
def dragonfly_adapter_to_hf(adapter_dir: str | Path, output: str | Path, model_config: Any,
                            base_model: str | None = None) -> Path:
    """A dragonfly adapter → an adapter for the Hugging Face Llama export (``fm.export.hf``).

    Module paths are renamed to Llama's (``model.layers.{i}.self_attn.q_proj`` …) and ``lora_B`` of
    ``o_proj``/``down_proj`` is multiplied by ``scale_depth/√L``, the factor the export folded into
    those weights, so ``PeftModel.from_pretrained(LlamaForCausalLM, output)`` equals our model + adapter."""
    from fm.export.llama import LAYER_MAP, as_config, mup_factors

    cfg_d, state = load_adapter(adapter_dir)
    mc = as_config(model_config)
    _, residual, _ = mup_factors(mc)
    module_map = {k[: -len(".weight")]: v[: -len(".weight")] for k, v in LAYER_MAP.items() if k.endswith(".weight")}
    out: dict[str, torch.Tensor] = {}
    hf_targets: set[str] = set()
    for key, t in state.items():
        m = re.match(r"^(?:base_model\.model\.)?encoder\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight$", key)
        if m is None or m.group(2) not in module_map:
            raise LoraError(f"{adapter_dir}: adapter key {key!r} has no Hugging Face Llama counterpart")
        hf_mod = module_map[m.group(2)]
        if m.group(3) == "lora_B" and hf_mod in ("self_attn.o_proj", "mlp.down_proj"):
            t = t * residual
        out[f"{PEFT_PREFIX}model.layers.{m.group(1)}.{hf_mod}.{m.group(3)}.weight"] = t.contiguous()
        hf_targets.add(hf_mod.rsplit(".", 1)[-1])
    cfg_d = dict(cfg_d)
    cfg_d["target_modules"] = sorted(hf_targets)
    cfg_d["task_type"] = "CAUSAL_LM"
    return save_adapter(output, out, cfg_d, base_model)


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fm.train.lora export-hf --adapter DIR --config MODEL.json --output OUT [--base-model HF_DIR]``
    (a dragonfly adapter for the Hugging Face Llama export) or ``merge --base B --lora DIR --output OUT.pt``."""
    import argparse

    from fm.models.config import DTYPES, resolve_dtype

    p = argparse.ArgumentParser(prog="fm lora", description="LoRA adapter tools: fold an adapter into dense weights, "
                                "or convert a dragonfly adapter for the Hugging Face Llama export.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-hf", help="dragonfly adapter → adapter for the Hugging Face Llama export")
    e.add_argument("--adapter", required=True, help="PEFT adapter directory (a LoRA checkpoint directory)")
    e.add_argument("--config", help="dragonfly model config json or shipped name (default: the adapter's own)")
    e.add_argument("--output", required=True, help="adapter directory to write")
    e.add_argument("--base-model", help="the exported Hugging Face directory (recorded in adapter_config.json)")
    m = sub.add_parser("merge", help="fold an adapter into a dense state dict")
    m.add_argument("--lora", required=True, help="PEFT adapter directory (a LoRA checkpoint directory)")
    m.add_argument("--base", help="base weights, any checkpoint form (default: the adapter's base_model_name_or_path)")
    m.add_argument("--output", required=True, help="merged state dict .pt to write (its model config goes beside it)")
    m.add_argument("--dtype", choices=sorted(DTYPES), help="cast the merged weights (default: the base's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "export-hf":
            from fm.checkpoint.open import open_checkpoint

            config = open_checkpoint(args.adapter, model_config=args.config, family="dragonfly").model_config
            out = dragonfly_adapter_to_hf(args.adapter, args.output, config, args.base_model)
        else:
            out = Path(args.output)
            merge_adapter(args.lora, args.base, out, resolve_dtype(args.dtype) if args.dtype else None)
    except (LoraError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
