"""Typed pretraining config: defaults < JSON file (upstream key names) < ``--key value`` on the command line.

Every key upstream's ``pretrain_dragonfly.sh`` / ``train_configs/*.json`` knew is listed in
``UPSTREAM_KEYS`` and is either implemented, a documented no-op (logged at start), or rejected with a
message saying why (``REJECTED``).  Unknown keys are errors that name the file and the closest key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fm.schema import check, fields_of, format_problems, help_rows, key, show_default, suggest

log = logging.getLogger(__name__)

Scheduler = Literal["cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant"]
SCHEDULERS = get_args(Scheduler)


def _scheduler_name(text: str) -> str:
    """``Cosine``, ``warmup_stable_drop``, ``WarmupStableDrop`` → the canonical name (upstream's spellings vary)."""
    return text.strip().lower().replace("_", "").replace("-", "")


class ConfigError(ValueError):
    """A config file or command-line value is wrong; the message says where and how to fix it."""


# Values that are rejected, with the reason (checked in validate()).
REJECTED: dict[str, str] = {
    "tp_size": "tensor parallelism is not supported: tp_size must be 1; the engines shard with ZeRO-3 "
    "(bmtrain) or FSDP2, which fits the 2.4B and 13B models without it",
    "load_grad": "gradients are never saved: checkpoints are taken at optimizer-step boundaries where the "
    "accumulated gradient is zero, so there is nothing to load; set load_grad false",
    "ignore_cuda_oom": "skipping a step after an out-of-memory error cannot be made safe under ZeRO-3/FSDP "
    "(the other ranks wait forever in the collective the failing rank left); lower batch_size or max_length, "
    "or set use_checkpoint true; set ignore_cuda_oom false",
    "dataloader": 'only the "indexed" dataloader exists (convert data with fm convert)',
}

@dataclass
class TrainConfig:
    """Every train key: its type, default and meaning (``fm train --help`` and docs/training.md come from here)."""

    # ---- run identity and inputs (upstream keys) ----
    model_unique: str = key("fm9g_run", "run name: checkpoints in `<save>/<model_unique>/`, tensorboard in "
                            "`<tensorboard>/<exp_group><model_unique>/`")
    config: str = key("2.4b", "model config: a JSON path, or a shipped name (`2.4b`, `tiny`, `skywork_13b`, "
                      "`spark/13b`, `spark/tiny`; unqualified names are dragonfly's)")
    dataset_config: str = key("", "mixture config JSON (see docs/mixtures.md); checked before launch")
    tokenizer_path: str = key("demo", "SentencePiece model file, or `demo` (the shipped demo tokenizer); copied "
                              "into every checkpoint")
    resume_ckpt: str = key("", '`""` fresh start; `latest` newest complete checkpoint (fresh if none yet); a step '
                           "number; a checkpoint directory; or a bare `.pt` (weights only)")
    exp_group: str = key("", "tensorboard directory prefix")
    # ---- shape of the work ----
    max_length: int = key(4096, "tokens per packed row", min=1)
    batch_size: int = key(1, "rows (packed sequences) per micro-batch per process", min=1)
    grad_accum: int = key(1, "micro-batches per optimizer step", min=1)
    train_iters: int = key(10000, "optimizer steps (iterations)", min=1)
    save_iters: int = key(500, "checkpoint every N iterations and at the end; 0 = none, except on a stop signal, "
                          "at the end of data and at the non-finite stop", min=0)
    inspect_iters: int = key(100, "parameter/gradient statistics table every N iterations (0 = never)", min=0)
    log_iters: int = key(1, "console line every N iterations (tensorboard and jsonl get every step)", min=0)
    # ---- optimizer and schedule ----
    lr: float = key(1e-2, "peak learning rate (hidden matrices use `lr / scale_width`, muP)", gt=0)
    lr_scheduler: Scheduler = key("cosine", "`cosine`, `warmupstabledrop`, `warmupstableexp`, `linear`, "
                                  "`constant`; case, `_` and `-` are ignored (`Cosine`, `warmup_stable_drop` work)",
                                  normalise=_scheduler_name)
    warmup_iters: float = key(0.01, "linear warmup; a value < 1 is a fraction of `train_iters`", min=0)
    drop_iters: float = key(0.1, "length of the final drop (`warmupstabledrop`) / decay period "
                            "(`warmupstableexp`); < 1: fraction of `train_iters`", min=0)
    drop_begin: int = key(-1, "`warmupstableexp`: first step of the decay; < 0 means `train_iters - drop_iters`")
    drop_rate: float = key(0.5, "`warmupstableexp` factor per `drop_iters` steps, in (0, 1]")
    weight_decay: float = key(0.1, "AdamW decoupled weight decay, on every parameter as upstream", min=0)
    clip_grad: float = key(1.0, "max global gradient norm; <= 0 measures without clipping")
    eps: float = key(1e-8, "AdamW epsilon", gt=0)
    seed: int = key(1234, "weights init and data order")
    resume_no_optimze: int = key(0, "(upstream spelling) N > 0: on resume, do not load the optimizer state and "
                                 "re-warm the lr linearly over N steps", min=0)
    # ---- resume behaviour ----
    only_load_model: bool = key(False, "on resume take only the weights: iteration 0, fresh optimizer, schedule "
                                "and data")
    load_dataloader_ckpt: bool = key(True, "on resume restore the data position (exact continuation); false: data "
                                     "starts from the beginning (logged)")
    load_grad: bool = key(False, "rejected when true")
    strict_state_dict: bool = key(True, "model weights must match exactly (missing/unexpected keys are errors "
                                  "naming them)")
    # ---- engine and memory ----
    engine: Literal["auto", "bmtrain", "fsdp"] = key("auto", "`bmtrain` (GPU ZeRO-3), `fsdp` (FSDP2; CPU/gloo or "
                                                      "GPU), `auto` (bmtrain when CUDA + bmtrain, else fsdp)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = key("auto", "`bf16`, `fp16` (loss scaling), `fp32`; auto = "
                                                          "bf16 on CUDA, fp32 on CPU")
    flash: Literal["cuda", "triton", "1d", "none"] = key("cuda", "accepted, no effect")
    use_checkpoint: bool = key(False, "activation checkpointing of transformer layers (all of them, or every "
                               "`checkpoint_every`-th): recompute in backward, for memory")
    checkpoint_every: int = key(1, "with `use_checkpoint`: checkpoint layers 0, k, 2k, ... only (1 = every layer); "
                                "selective checkpointing trades memory back for speed", min=1)
    offload: bool = key(False, "keep optimizer state on the CPU (upstream's `--offload`): bmtrain's "
                        "AdamOffloadOptimizer; fsdp's CPUOffloadPolicy (parameters, gradients and optimizer state)")
    compile: bool = key(False, "compile each transformer layer with torch.compile before the engine wraps it "
                        "(fsdp: before sharding; bmtrain: the layer inside its bmt.Block)")
    loss_chunk: int = key(1024, "tokens of the LM head and cross-entropy computed at a time (recomputed in "
                          "backward), so the full-vocabulary logits never exist; 0 = all logits at once (the "
                          "engine's loss: more memory, no recompute)", min=0)
    tp_size: int = key(1, "rejected when > 1")
    ignore_cuda_oom: bool = key(False, "rejected when true")
    # ---- data loader ----
    dataloader_num_workers: int = key(0, "loader worker processes per rank", min=0)
    dataloader_prefetch_factor: int = key(2, "batches prefetched per worker", min=1)
    dataloader_num_threads: int = key(1, "accepted, no effect")
    dataloader_prefetch: int = key(1, "accepted, no effect")
    parallel_load_datastate: int = key(1, "accepted, no effect")
    stop_when_end: bool = key(True, "accepted, no effect")
    only_run_dataloader: bool = key(False, "run the data path alone (`train_iters x grad_accum` batches) and "
                                    "report batches/s and tokens/s")
    # ---- outputs ----
    save: str = key("data/checkpoints", "checkpoint root (upstream's `save=\"True\"` form is accepted and means "
                    "this default)")
    tensorboard: str = key("data/tensorboard", 'tensorboard root; `""` disables')
    tensorboard_all_tasks: bool = key(True, "also write `Loss/train/<task>`")
    async_save: bool = key(False, "write checkpoint files in a background thread (the snapshot is taken "
                           "synchronously)")
    keep_last_n: int = key(0, "keep only the newest N complete checkpoints (0 = all)", min=0)
    max_skipped_steps: int = key(10, "consecutive non-finite steps before training stops with an error", min=0)
    peak_tflops: float = key(0.0, "per-device peak for MFU; 0 = bf16 dense peak by GPU name (H100/H200/H800 989, "
                             "A100/A800 312, ...); MFU is not reported on CPU", min=0)
    # ---- validation during training (fm.eval.validation; docs/evaluation.md) ----
    eval_dataset_config: str = key("", "mixture config of held-out data for the validation loss (same format as "
                                   "`dataset_config`)")
    eval_iters: int = key(10, "batches per process in the fixed validation set (built once at start-up)", min=1)
    eval_interval: int = key(0, "validation loss every N iterations and once more at the end of training; 0 = off; "
                             "> 0 needs `eval_dataset_config`", min=0)
    # ---- accepted upstream keys that mean nothing here ----
    local: bool = key(True, "accepted, no effect")
    dataloader: Literal["indexed"] = key("indexed", "the data loader", why=REJECTED["dataloader"])
    grad_ckpt_num: int = key(0, "accepted, no effect")
    # ---- fine-tuning (spark_13b sft / LoRA; fm.train.lora) ----
    load_model: str = key("", "initial weights when not resuming (any checkpoint form: `.pt`, run or step "
                          "directory, Hugging Face export); with `lora`: the frozen base")
    eos_token: str = key("", 'piece appended to every sample instead of the tokenizer\'s EOS (Spark: `"<end>"`)')
    lora: bool = key(False, "train PEFT LoRA adapters only; checkpoints hold the adapter (PEFT format)")
    lora_r: int = key(8, "LoRA rank", min=1)
    lora_alpha: float = key(16.0, "LoRA scale `alpha / r`", gt=0)
    lora_dropout: float = key(0.0, "dropout on the adapter input, in [0, 1)", min=0)
    lora_targets: tuple[str, ...] = key(("q", "k", "v"), "modules to adapt: a list or a comma string of `q k v out "
                                        "fc0 fc1 fc2` (aliases `o`, `gate`=fc0, `up`=fc1, `down`=fc2) or module names")

    # not a user key: the keys the user set (file, overrides, command line), so a no-op key is reported only then
    given: frozenset[str] = field(default_factory=frozenset, repr=False)

    # -------------------------------------------------------------------------------------------
    def resolved_warmup(self) -> int:
        return frac_or_steps(self.warmup_iters, self.train_iters)

    def resolved_drop(self) -> int:
        return frac_or_steps(self.drop_iters, self.train_iters)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("given", None)
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
    "grad_ckpt_num": "use_checkpoint with checkpoint_every chooses the checkpointed layers",
}

def _apply(values: dict[str, Any], cfg: dict[str, Any], where: str, problems: list[tuple[str, str]], *,
           from_cli: bool) -> None:
    """Convert ``values`` into ``cfg``; every problem goes to ``problems`` as ``(where, message)``."""
    values = dict(values)
    if "resume_ckpt" in values and isinstance(values["resume_ckpt"], int) and not isinstance(values["resume_ckpt"],
                                                                                              bool):
        values["resume_ckpt"] = str(values["resume_ckpt"])  # a step number
    save = values.get("save")
    if save is not None and (isinstance(save, bool) or str(save).strip().lower() in ("true", "false", "1", "0")):
        # Upstream docs set save="True" (a flag); ours is the checkpoint root directory.
        log.warning('%s: save=%r is upstream\'s flag form; using the default directory "data/checkpoints"',
                    where, save)
        values["save"] = "data/checkpoints"
    converted, found = check(TrainConfig, values, from_cli=from_cli, ignore=("given",))
    cfg.update(converted)
    problems.extend((where, p) for p in found)


def _raise(problems: list[tuple[str, str]]) -> None:
    if not problems:
        return
    wheres = {w for w, _ in problems}
    if len(wheres) == 1:
        raise ConfigError(format_problems(wheres.pop(), [p for _, p in problems]))
    raise ConfigError(format_problems("train config", [f"{w}: {p}" for w, p in problems]))


def is_train_config_file(value: str) -> bool:
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
    with train keys; any other ``--config`` is the model config key. A boolean key given bare (``--offload``, as
    upstream's launchers pass it, followed by another ``--key`` or nothing) means true."""
    path: str | None = None
    out: dict[str, str] = {}
    flags = {name for name, (_, tp) in fields_of(TrainConfig).items() if tp is bool}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; use --key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            if bare and key.replace("-", "_") in flags:
                val = "true"
            elif i + 1 >= len(argv):
                raise ConfigError(f"command line: --{key} needs a value")
            else:
                val = argv[i + 1]
                i += 1
        i += 1
        key = key.replace("-", "_")
        if key in ("train_config", "config_file") or (key == "config" and is_train_config_file(val)):
            path = val  # a later train config replaces an earlier one (the launcher's default comes first)
        else:
            out[key] = val
    return path, out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, cli: dict[str, str] | None = None, validate_: bool = True,
                collect: list[str] | None = None) -> TrainConfig:
    """Defaults < JSON file at ``path`` < ``overrides`` (typed, from code) < ``cli`` (strings). Every problem of
    every layer is reported at once (one :class:`ConfigError`), or, with ``collect``, appended to it as
    ``"<where>: <problem>"`` lines and the config returned with the faulty keys at their defaults."""
    cfg: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
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
        _apply(raw, cfg, str(p), problems, from_cli=False)
    if overrides:
        _apply(overrides, cfg, "overrides", problems, from_cli=False)
    if cli:
        _apply(cli, cfg, "command line", problems, from_cli=True)
    # the keys with problems keep their defaults, so the checks across keys still run
    out = TrainConfig(**cfg, given=frozenset(cfg))
    if validate_:
        problems += [(str(path) if path else "config", p) for p in cross_problems(out, str(path) if path else "config")]
    if collect is not None:
        collect += [f"{w}: {p}" for w, p in problems]
        return out
    _raise(problems)
    return out


def config_from_argv(argv: list[str] | None = None) -> TrainConfig:
    path, cli = parse_cli(list(sys.argv[1:] if argv is None else argv))
    return load_config(path, cli=cli)


def qualify_model_config(cfg: TrainConfig, family: str | None) -> TrainConfig:
    """An app of one family reads an unqualified shipped name as its own (``config: "tiny"`` in a Spark config
    is ``spark/tiny``); elsewhere unqualified names are dragonfly's."""
    if family and "/" not in cfg.config and not Path(cfg.config).is_file():
        cfg.config = f"{family}/{cfg.config}"
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Raise one :class:`ConfigError` with every problem :func:`cross_problems` finds."""
    problems = cross_problems(cfg, source)
    if problems:
        raise ConfigError(format_problems(source, problems))
    return cfg


def cross_problems(cfg: TrainConfig, source: str = "config") -> list[str]:
    """The checks that span keys, and the rejected values with their reasons. (Types, choices and single-key
    ranges are checked while loading, from the field declarations.)"""
    problems: list[str] = []

    def bad(key: str, msg: str) -> None:
        problems.append(f"{key}: {msg}")

    cfg.lr_scheduler = _scheduler_name(cfg.lr_scheduler)
    if cfg.lr_scheduler not in SCHEDULERS:
        bad("lr_scheduler", f"{cfg.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}"
            f"{suggest(cfg.lr_scheduler, list(SCHEDULERS))}")
    if cfg.tp_size != 1:
        bad("tp_size", REJECTED["tp_size"])
    if cfg.load_grad:
        bad("load_grad", REJECTED["load_grad"])
    if cfg.ignore_cuda_oom:
        bad("ignore_cuda_oom", REJECTED["ignore_cuda_oom"])
    if cfg.dataloader != "indexed":
        bad("dataloader", REJECTED["dataloader"])
    if cfg.eval_interval > 0 and not cfg.eval_dataset_config:
        bad("eval_interval", f"{cfg.eval_interval} needs eval_dataset_config (a mixture config of held-out data); "
            "set eval_dataset_config or eval_interval 0")
    if cfg.eval_dataset_config and cfg.eval_interval == 0:
        log.warning("%s: eval_dataset_config is set but eval_interval is 0: no validation (set eval_interval > 0)",
                    source)
    if not 0 < cfg.drop_rate <= 1 and cfg.lr_scheduler == "warmupstableexp":
        bad("drop_rate", f"must be in (0, 1], got {cfg.drop_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora and not cfg.lora_targets:
        bad("lora_targets", 'is empty: name at least one module, e.g. "q,k,v"')
    if cfg.warmup_iters >= 0 and cfg.drop_iters >= 0:
        w, d = frac_or_steps(cfg.warmup_iters, cfg.train_iters), frac_or_steps(cfg.drop_iters, cfg.train_iters)
        if w > cfg.train_iters:
            bad("warmup_iters", f"{w} steps > train_iters {cfg.train_iters}")
        if cfg.lr_scheduler in ("warmupstabledrop", "warmupstableexp") and d < 1:
            bad("drop_iters", f"{cfg.lr_scheduler} needs drop_iters >= 1 step, got {cfg.drop_iters}")
    if not cfg.model_unique or "/" in cfg.model_unique:
        bad("model_unique", f"{cfg.model_unique!r} must be a non-empty name without '/'")
    if cfg.only_load_model and not cfg.resume_ckpt:
        log.warning("%s: only_load_model is set but resume_ckpt is empty: training starts from scratch", source)
    return problems


def log_no_ops(cfg: TrainConfig, logger: logging.Logger = log) -> None:
    """One line per no-op key the user set (a key left at its default says nothing)."""
    for name, why in NO_OPS.items():
        if name in cfg.given:
            logger.info("config: %s=%r has no effect here: %s", name, getattr(cfg, name), why)


# ---------------------------------------------------------------------------------------------- help
def _rows() -> list[tuple[str, str, Any, str]]:
    """help_rows with the reason of every no-op and rejected key appended."""
    return [(name, typ, default, text + (f": {NO_OPS.get(name) or REJECTED.get(name)}"
                                        if name in NO_OPS or name in REJECTED else ""))
            for name, typ, default, text in help_rows(TrainConfig)]


def keys_markdown() -> str:
    """The key table of docs/training.md (a test keeps the two identical)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, typ, default, text in _rows():
        lines.append(f"| `{name}` | {typ.replace('|', '/')} | `{show_default(default)}` | {text} |")
    return "\n".join(lines)


def keys_help(width: int = 100) -> str:
    """Every train key with its type, default and meaning, for ``fm train --help``."""
    import textwrap

    out = []
    for name, typ, default, text in _rows():
        metavar = ("{" + typ.removeprefix("one of ").replace(", ", ",") + "}") if typ.startswith("one of") else \
            typ.upper().replace(" ", "_")
        out.append(f"  --{name} {metavar}  [default {show_default(default)}]")
        out += textwrap.wrap(text.replace("`", ""), width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


if __name__ == "__main__":  # python -m fm.train.config: the docs/training.md key table
    print(keys_markdown())
