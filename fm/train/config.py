"""Typed pretraining config: defaults < JSON file (upstream key names) < ``--key value`` on the command line.

Every key upstream's ``pretrain_dragonfly.sh`` / ``train_configs/*.json`` knew is listed in
``UPSTREAM_KEYS`` and is either implemented, a documented no-op (logged at start), or rejected with a
message saying why (``REJECTED``).  Unknown keys are errors that name the file and the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant")


class ConfigError(ValueError):
    """A config file or command-line value is wrong; the message says where and how to fix it."""


@dataclass
class TrainConfig:
    # ---- run identity and inputs (upstream keys) ----
    model_unique: str = "fm9g_run"  # run name: <save>/<model_unique>/ and <tensorboard>/<exp_group><model_unique>/
    config: str = "2.4b"  # model config: a name under apps/fm9g_2b/model_configs/ or a path to a JSON file
    dataset_config: str = ""  # mixture config JSON (dataset_configs/*.json)
    tokenizer_path: str = "demo"
    resume_ckpt: str = ""  # "" = fresh; "latest"; a step number; or a checkpoint directory path
    exp_group: str = ""  # tensorboard directory prefix
    # ---- shape of the work ----
    max_length: int = 4096
    batch_size: int = 1  # rows (packed sequences) per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    train_iters: int = 10000  # optimizer steps
    save_iters: int = 500
    inspect_iters: int = 100  # parameter/gradient statistics table every N steps (0 = never)
    # ---- optimizer and schedule ----
    lr: float = 1e-2
    lr_scheduler: str = "cosine"  # cosine | warmupstabledrop | warmupstableexp | linear | constant (case-insensitive)
    warmup_iters: float = 0.01  # < 1: fraction of train_iters
    drop_iters: float = 0.1  # < 1: fraction of train_iters
    drop_begin: int = -1  # warmupstableexp: first step of the decay; < 0 means train_iters - drop_iters
    drop_rate: float = 0.5
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still measured)
    eps: float = 1e-8  # AdamW epsilon
    seed: int = 1234
    resume_no_optimze: int = 0  # after a resume, re-warm the lr linearly over this many steps (upstream spelling)
    # ---- resume behaviour ----
    only_load_model: bool = False  # resume only the weights: step 0, fresh optimizer, schedule and data
    load_dataloader_ckpt: bool = True  # restore the data position when resuming
    load_grad: bool = False  # rejected when true: see REJECTED
    strict_state_dict: bool = True  # model weights must match the model exactly when loading
    # ---- engine and memory ----
    engine: Literal["auto", "bmtrain", "fsdp"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    flash: str = "cuda"  # documented no-op: the model picks its attention kernel (varlen flash on CUDA)
    use_checkpoint: bool = False  # activation checkpointing of every transformer layer
    tp_size: int = 1  # > 1 rejected: ZeRO-3 sharding only
    ignore_cuda_oom: bool = False  # true rejected: see REJECTED
    # ---- data loader ----
    dataloader_num_workers: int = 0
    dataloader_prefetch_factor: int = 2
    dataloader_num_threads: int = 1  # documented no-op
    dataloader_prefetch: int = 1  # documented no-op (prefetch depth is dataloader_prefetch_factor)
    parallel_load_datastate: int = 1  # documented no-op (our data state is a few KB)
    stop_when_end: bool = True  # documented: training always ends cleanly when every dataset is exhausted
    only_run_dataloader: bool = False  # run the data path alone and report throughput
    # ---- outputs ----
    save: str = "data/checkpoints"  # checkpoint root directory
    tensorboard: str = "data/tensorboard"  # tensorboard root directory ("" disables)
    tensorboard_all_tasks: bool = True  # also write Loss/train/<task> per task
    async_save: bool = False  # write checkpoint files in a background thread
    keep_last_n: int = 0  # keep only the newest N checkpoints (0 = keep all)
    log_iters: int = 1  # console line every N steps
    max_skipped_steps: int = 10  # consecutive non-finite steps before stopping with an error
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = guess from the device (see docs/training.md)
    # ---- validation during training (fm.eval.validation; docs/evaluation.md) ----
    eval_dataset_config: str = ""  # mixture config JSON of held-out data (same format as dataset_config)
    eval_iters: int = 10  # batches per rank in the fixed validation set (built once at start-up)
    eval_interval: int = 0  # validation loss every N optimizer steps and at the end of training (0 = off)
    # ---- accepted upstream keys that mean nothing here ----
    local: bool = True  # documented no-op (upstream: read data from local disk rather than HDFS)
    dataloader: str = "indexed"  # only "indexed" exists
    grad_ckpt_num: int = 0  # documented no-op (use_checkpoint applies to every layer)
    # ---- fine-tuning (spark_13b sft / LoRA; fm.train.lora) ----
    load_model: str = ""  # initial weights (.pt or checkpoint dir) when not resuming; with lora: the frozen base
    eos_token: str = ""  # piece appended to every sample instead of the tokenizer's EOS (Spark: "<end>")
    lora: bool = False  # train PEFT LoRA adapters only; checkpoints hold the adapter (PEFT format)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v"  # q k v out fc0/gate fc1/up fc2/down, or module names

    # resolved at validation time (not user keys)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------------------------------------
    def resolved_warmup(self) -> int:
        return frac_or_steps(self.warmup_iters, self.train_iters)

    def resolved_drop(self) -> int:
        return frac_or_steps(self.drop_iters, self.train_iters)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra", None)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, sort_keys=False)


def frac_or_steps(value: float, train_iters: int) -> int:
    """Upstream rule: a value below 1 is a fraction of ``train_iters``; otherwise a step count."""
    if value < 0:
        raise ConfigError(f"expected a non-negative step count or fraction, got {value}")
    if value < 1:
        return int(round(value * train_iters))
    return int(value)


# Upstream keys (FM9G pretrain_dragonfly.sh / README parameter list).  The test enumerates these.
UPSTREAM_KEYS = (
    "model_unique", "resume_ckpt", "config", "flash", "max_length", "batch_size", "save_iters", "train_iters",
    "dataset_config", "tokenizer_path", "lr", "warmup_iters", "drop_iters", "lr_scheduler", "drop_begin",
    "drop_rate", "only_load_model", "load_dataloader_ckpt", "load_grad", "resume_no_optimze", "inspect_iters",
    "exp_group", "stop_when_end", "only_run_dataloader", "ignore_cuda_oom", "tensorboard_all_tasks",
    "strict_state_dict", "tp_size", "async_save", "use_checkpoint", "dataloader_num_workers",
    "dataloader_num_threads", "dataloader_prefetch", "dataloader_prefetch_factor", "parallel_load_datastate",
    "grad_accum", "clip_grad", "seed", "weight_decay", "save", "local", "dataloader", "grad_ckpt_num", "eps",
)  # fmt: skip

# Keys accepted for compatibility that change nothing; logged at start so nobody thinks they act.
NO_OPS: dict[str, str] = {
    "flash": "the model picks its attention kernel itself (varlen flash-attn on CUDA when installed, SDPA otherwise)",
    "dataloader_num_threads": "tokenization runs in the loader workers; set dataloader_num_workers instead",
    "dataloader_prefetch": "the prefetch depth is dataloader_prefetch_factor (batches per worker)",
    "parallel_load_datastate": "the data-loader state is a few KB (positions, not bitsets) and loads at once",
    "stop_when_end": "training always ends cleanly, with a final checkpoint, once every dataset is exhausted",
    "local": "data is always read from the local filesystem (no HDFS)",
    "grad_ckpt_num": "use_checkpoint applies activation checkpointing to every layer",
}

# Values that are rejected, with the reason (checked in validate()).
REJECTED: dict[str, str] = {
    "tp_size": "tensor parallelism is not supported: tp_size must be 1; the engines shard with ZeRO-3 "
    "(bmtrain) or FSDP2, which fits the 2.4B and 13B models without it",
    "load_grad": "gradients are never saved: checkpoints are taken at optimizer-step boundaries where the "
    "accumulated gradient is zero, so there is nothing to load; set load_grad false",
    "ignore_cuda_oom": "skipping a step after an out-of-memory error cannot be made safe under ZeRO-3/FSDP "
    "(the other ranks wait forever in the collective the failing rank left); lower batch_size or max_length, "
    "or set use_checkpoint true; set ignore_cuda_oom false",
    "dataloader": 'only the "indexed" dataloader exists (convert data with quick_start/convert_json2index.py)',
}

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n", ""}


def _field_types() -> dict[str, Any]:
    hints = get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig) if f.name != "extra"}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f'; did you mean "{close[0]}"?' if close else ""


def _coerce(key: str, value: Any, typ: Any, where: str, *, from_cli: bool) -> Any:
    """Convert ``value`` to the field type. Strings ("true", "1", "4096") are converted only at the CLI
    edge; inside a JSON file the value must already have the right JSON type."""
    origin = get_origin(typ)
    if origin is Literal:
        choices = get_args(typ)
        v = str(value).lower() if isinstance(value, str) else value
        if v not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {list(choices)}")
        return v
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if from_cli and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: {key}={value!r} must be a JSON boolean: write {key}: true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and from_cli:
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: {key}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} must be a number")
        if isinstance(value, str) and not from_cli:
            raise ConfigError(f"{where}: {key}={value!r} must be a JSON number, not a string")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key}={value!r} must be a number") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a string, got {type(value).__name__}")
        return str(value)
    return value


def _apply(values: dict[str, Any], cfg: dict[str, Any], where: str, *, from_cli: bool) -> None:
    types = _field_types()
    known = sorted(types)
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, known)}")
        if key == "resume_ckpt" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if key == "save" and (isinstance(value, bool) or str(value).strip().lower() in ("true", "false", "1", "0")):
            # Upstream docs set save="True" (a flag); ours is the checkpoint root directory.
            log.warning('%s: save=%r is upstream\'s flag form; using the default directory "data/checkpoints"',
                        where, value)
            value = "data/checkpoints"
        cfg[key] = _coerce(key, value, types[key], where, from_cli=from_cli)


def _is_train_config_file(value: str) -> bool:
    """``--config X``: X is the *train* config when it is a JSON file holding train keys (the launcher's
    form); otherwise ``config`` is the upstream key naming the *model* config."""
    p = Path(value)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and bool({"train_iters", "dataset_config", "model_unique", "lr"} & raw.keys())


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """Split argv into the train config JSON path and ``--key value`` / ``--key=value`` string overrides.

    The JSON is ``--train_config X`` (also ``--config-file X``), or ``--config X`` when X is a JSON file
    with train keys; any other ``--config`` is the model config key."""
    path: str | None = None
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; use --key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{key} needs a value")
            val = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key in ("train_config", "config_file") or (key == "config" and _is_train_config_file(val)):
            path = val  # a later train config replaces an earlier one (the launcher's default comes first)
        else:
            out[key] = val
    return path, out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, cli: dict[str, str] | None = None, validate_: bool = True) -> TrainConfig:
    """Defaults < JSON file at ``path`` < ``overrides`` (typed, from code) < ``cli`` (strings)."""
    cfg: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"train config {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a JSON object of key: value")
        _apply(raw, cfg, str(p), from_cli=False)
    if overrides:
        _apply(overrides, cfg, "overrides", from_cli=False)
    if cli:
        _apply(cli, cfg, "command line", from_cli=True)
    out = TrainConfig(**cfg)
    if validate_:
        validate(out, source=str(path) if path else "config")
    return out


def config_from_argv(argv: list[str] | None = None) -> TrainConfig:
    path, cli = parse_cli(list(sys.argv[1:] if argv is None else argv))
    return load_config(path, cli=cli)


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Check values once; normalise the scheduler name; reject unsupported values with the reason."""
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {msg}")

    name = cfg.lr_scheduler.strip().lower().replace("_", "").replace("-", "")
    if name not in SCHEDULERS:
        raise bad("lr_scheduler", f"{cfg.lr_scheduler!r} is not one of {list(SCHEDULERS)} (case-insensitive)"
                  f"{_suggest(name, list(SCHEDULERS))}")
    cfg.lr_scheduler = name
    if cfg.tp_size != 1:
        raise bad("tp_size", REJECTED["tp_size"])
    if cfg.load_grad:
        raise bad("load_grad", REJECTED["load_grad"])
    if cfg.ignore_cuda_oom:
        raise bad("ignore_cuda_oom", REJECTED["ignore_cuda_oom"])
    if cfg.dataloader != "indexed":
        raise bad("dataloader", REJECTED["dataloader"])
    for key in ("max_length", "batch_size", "grad_accum", "train_iters"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("save_iters", "inspect_iters", "keep_last_n", "resume_no_optimze", "dataloader_num_workers",
                "max_skipped_steps", "log_iters"):
        if getattr(cfg, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.eval_iters < 1:
        raise bad("eval_iters", f"must be >= 1 (batches per rank in the validation set), got {cfg.eval_iters}")
    if cfg.eval_interval < 0:
        raise bad("eval_interval", f"must be >= 0 (0 = no validation), got {cfg.eval_interval}")
    if cfg.eval_interval > 0 and not cfg.eval_dataset_config:
        raise bad("eval_interval", f"{cfg.eval_interval} needs eval_dataset_config (a mixture config of held-out "
                  "data); set eval_dataset_config or eval_interval 0")
    if cfg.eval_dataset_config and cfg.eval_interval == 0:
        log.warning("%s: eval_dataset_config is set but eval_interval is 0: no validation (set eval_interval > 0)",
                    source)
    if not cfg.lr > 0:
        raise bad("lr", f"must be > 0, got {cfg.lr}")
    if not 0 < cfg.drop_rate <= 1 and cfg.lr_scheduler == "warmupstableexp":
        raise bad("drop_rate", f"must be in (0, 1], got {cfg.drop_rate}")
    for key in ("warmup_iters", "drop_iters"):
        if getattr(cfg, key) < 0:
            raise bad(key, f"must be a step count (>= 1) or a fraction of train_iters (< 1), got {getattr(cfg, key)}")
    w, d = frac_or_steps(cfg.warmup_iters, cfg.train_iters), frac_or_steps(cfg.drop_iters, cfg.train_iters)
    if w > cfg.train_iters:
        raise bad("warmup_iters", f"{w} steps > train_iters {cfg.train_iters}")
    if cfg.lr_scheduler in ("warmupstabledrop", "warmupstableexp") and d < 1:
        raise bad("drop_iters", f"{cfg.lr_scheduler} needs drop_iters >= 1 step, got {cfg.drop_iters}")
    if not cfg.model_unique or "/" in cfg.model_unique:
        raise bad("model_unique", f"{cfg.model_unique!r} must be a non-empty name without '/'")
    if cfg.only_load_model and not cfg.resume_ckpt:
        log.warning("%s: only_load_model is set but resume_ckpt is empty: training starts from scratch", source)
    return cfg


def log_no_ops(cfg: TrainConfig, logger: logging.Logger = log) -> None:
    for key, why in NO_OPS.items():
        logger.info("config: %s=%r has no effect here: %s", key, getattr(cfg, key), why)
