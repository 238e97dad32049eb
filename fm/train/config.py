"""The train config: typed sections, each component receiving only its own.

A train config JSON is either fm's form, one object per section::

    {"run": {"name": "fm9g_run", "train_iters": 10000}, "optim": {"lr": 0.01}, "schedule": {"name": "cosine"}, ...}

or upstream FM9G's flat form (``{"model_unique": ..., "lr": ..., "resume_no_optimze": ...}``), which
:mod:`fm.compat.upstream` translates key by key at the edge (its table is in docs/training.md). Layers:
defaults < the JSON file < ``overrides`` (from code) < the command line (``--optim.lr 0.1`` or upstream's
``--lr 0.1``). Every problem of every layer is reported at once, naming the file or flag and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fm.errors import ConfigError
from fm.schema import build, check, format_problems, help_rows, key, show_default

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "TrainConfig", "load_config", "qualify_model_config", "frac_or_steps", "tokenizer_source"]

Scheduler = Literal["cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant"]
SCHEDULERS = get_args(Scheduler)


def _scheduler_name(text: str) -> str:
    """``Cosine``, ``warmup_stable_drop``, ``WarmupStableDrop`` → the canonical name (upstream's spellings vary)."""
    return text.strip().lower().replace("_", "").replace("-", "")


def frac_or_steps(value: float, train_iters: int) -> int:
    """Upstream rule: a value below 1 is a fraction of ``train_iters``; otherwise a step count."""
    if value < 0:
        raise ConfigError(f"expected a non-negative step count or fraction, got {value}")
    if value < 1:
        return int(round(value * train_iters))
    return int(value)


def section(cls: type, help: str) -> Any:  # noqa: A002
    return field(default_factory=cls, metadata={"help": help, "section": True})


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """What the run is called, how long it trains, where its outputs go and what it reports."""

    name: str = key("fm9g_run", "run name: checkpoints in `<save_dir>/<name>/`, tensorboard in "
                    "`<tensorboard_dir>/<exp_group><name>/`")
    exp_group: str = key("", "tensorboard directory prefix")
    seed: int = key(1234, "weights init and data order")
    train_iters: int = key(10000, "optimizer steps (iterations)", min=1)
    grad_accum: int = key(1, "micro-batches per optimizer step", min=1)
    save_dir: str = key("data/checkpoints", "checkpoint root")
    tensorboard_dir: str = key("data/tensorboard", 'tensorboard root; `""` disables')
    tensorboard_all_tasks: bool = key(True, "also write `Loss/train/<task>`")
    log_iters: int = key(1, "console line every N iterations (tensorboard and jsonl get every step)", min=0)
    inspect_iters: int = key(100, "parameter/gradient statistics table every N iterations (0 = never)", min=0)
    max_skipped_steps: int = key(10, "consecutive non-finite steps before training stops with an error", min=0)
    peak_tflops: float = key(0.0, "per-device peak for MFU; 0 = bf16 dense peak by GPU name (H100/H200/H800 989, "
                             "A100/A800 312, ...); MFU is not reported on CPU", min=0)
    only_run_dataloader: bool = key(False, "run the data path alone (`train_iters x grad_accum` batches) and "
                                    "report batches/s and tokens/s")

    def dir(self) -> Path:
        """``<save_dir>/<name>``: the run's checkpoints, loss curve and step log."""
        return Path(self.save_dir) / self.name


@dataclass
class DataStage:
    """One later data stage: from iteration ``start_iter`` on, every micro-batch comes from ``mixture``
    (docs/mixtures.md, "Data stages")."""

    start_iter: int | Literal["decay"] = key(help="the first iteration of the stage (optimizer steps done), > 0 and < "
                                             "run.train_iters; `decay`: the first step of the schedule's decay")
    mixture: str = key(help="mixture config JSON of the stage")


@dataclass
class DataConfig:
    mixture: str = key("", "mixture config JSON (see docs/mixtures.md); checked before launch; with `data.stages` it "
                       "is stage 0, from iteration 0")
    stages: list[DataStage] = key(
        help='later data stages, in increasing order: `[{"start_iter": 9000, "mixture": "decay.json"}]`; '
        '`"start_iter": "decay"` is the first step of the decay of `warmupstabledrop`/`warmupstableexp`. Datasets '
        "of both stages continue where they were, new ones start at their beginning (docs/mixtures.md)",
        default_factory=list)
    tokenizer: str = key("", "SentencePiece `.model`, `tokenizer.json` or Hugging Face tokenizer directory, or "
                         "`demo` (the shipped demo tokenizer); copied into every checkpoint (its files as read at "
                         "the start). Empty (the default): the tokenizer the checkpoint of `checkpoint.resume.source`, "
                         "else of `model.init_from`, carries; with neither, `demo`")
    max_length: int = key(4096, "tokens per packed row", min=1)
    batch_size: int = key(1, "rows (packed sequences) per micro-batch per process", min=1)
    num_workers: int = key(0, "loader worker processes per rank", min=0)
    prefetch_factor: int = key(2, "batches prefetched per worker", min=1)
    eos_token: str = key("", 'token appended to every sample instead of the tokenizer\'s EOS (Spark: `"<end>"`; '
                         'a Hugging Face added token such as `"<|im_end|>"`)')


@dataclass
class ModelSection:
    config: str = key("2.4b", "model config: a JSON path, or a shipped name (`2.4b`, `tiny`, `skywork_13b`, "
                      "`spark/13b`, `spark/tiny`; unqualified names are dragonfly's)")
    init_from: str = key("", "initial weights when not resuming (any checkpoint form: `.pt`, run or step "
                         "directory, Hugging Face export); with `lora.enabled`: the frozen base")


@dataclass
class OptimConfig:
    lr: float = key(1e-2, "peak learning rate (hidden matrices use `lr / scale_width`, muP)", gt=0)
    weight_decay: float = key(0.1, "AdamW decoupled weight decay, on every parameter as upstream", min=0)
    eps: float = key(1e-8, "AdamW epsilon", gt=0)
    clip_grad: float = key(1.0, "max global gradient norm; <= 0 measures without clipping")
    z_loss: float = key(0.0, "z-loss coefficient (PaLM): `z_loss * logsumexp(logits)^2` per target token added to "
                        "the loss, averaged like the cross-entropy; logged as `Loss/z_loss` (`Loss/train` stays the "
                        "cross-entropy); 0 = off, PaLM used 1e-4", min=0)


@dataclass
class StabilityConfig:
    """Early warnings of instability (:mod:`fm.train.stability`; docs/training.md)."""

    spike_zscore: float = key(0.0, "a step whose loss exceeds the mean of the last `spike_window` good losses by more "
                              "than this many standard deviations is a loss spike (logged, `Stability/spikes`); "
                              "0 = off", min=0)
    spike_window: int = key(50, "good (finite, non-spike) steps the running mean and deviation are over; no "
                            "detection until the window is full", min=2)
    skip_spikes: bool = key(False, "skip a spike's update everywhere (gradients dropped, schedule not advanced), as a "
                            "non-finite step is")
    max_consecutive_spikes: int = key(0, "this many consecutive spikes stop training with an error naming the last "
                                      "good checkpoint; 0 = never", min=0)


@dataclass
class ScheduleConfig:
    name: Scheduler = key("cosine", "`cosine`, `warmupstabledrop`, `warmupstableexp`, `linear`, `constant`; case, "
                          "`_` and `-` are ignored (`Cosine`, `warmup_stable_drop` work)", normalise=_scheduler_name)
    warmup_iters: float = key(0.01, "linear warmup; a value < 1 is a fraction of `run.train_iters`", min=0)
    drop_iters: float = key(0.1, "length of the final drop (`warmupstabledrop`) / decay period (`warmupstableexp`); "
                            "< 1: fraction of `run.train_iters`", min=0)
    drop_begin: int = key(-1, "`warmupstableexp`: first step of the decay; < 0 means `train_iters - drop_iters`")
    drop_rate: float = key(0.5, "`warmupstableexp` factor per `drop_iters` steps, in (0, 1]")


@dataclass
class ResumeSpec:
    """Where a run resumes from and what it takes from there (:mod:`fm.checkpoint.checkpointer`)."""

    source: str = key("", '`""` fresh start; `latest` newest complete checkpoint (fresh if none yet); a step '
                      "number; a checkpoint directory; or a bare `.pt` (weights only)")
    weights_only: bool = key(False, "take only the weights: iteration 0, fresh optimizer, schedule and data")
    load_data: bool = key(True, "restore the data position (exact continuation); false: data starts from the "
                          "beginning (logged)")
    rewarm_iters: int = key(0, "N > 0: do not load the optimizer state and re-warm the lr linearly over N steps",
                            min=0)
    strict: bool = key(True, "model weights must match exactly (missing/unexpected keys are errors naming them)")


@dataclass
class CheckpointConfig:
    every: int = key(500, "checkpoint every N iterations and at the end; 0 = none, except on a stop signal, at the "
                     "end of data and at the non-finite stop", min=0)
    keep_last_n: int = key(0, "keep only the newest N complete checkpoints up to the step just saved (0 = all); "
                           "newer steps left by a run resumed from an earlier step are neither counted nor deleted",
                           min=0)
    merge_last_n: int = key(0, "after each save, once N complete checkpoints exist up to it, rank 0 writes their "
                            "uniform average (fp32 accumulation) as `<run dir>/merged_last_<N>.pt` with its config and "
                            "tokenizer beside it (in a background thread that the next save joins); 0 = off", min=0)
    async_save: bool = key(False, "write checkpoint files in a background thread (the snapshot is taken "
                           "synchronously)")
    resume: ResumeSpec = section(ResumeSpec, "what to resume from")


@dataclass
class EngineConfig:
    name: Literal["auto", "bmtrain", "fsdp"] = key("auto", "`bmtrain` (GPU ZeRO-3), `fsdp` (FSDP2; CPU/gloo or GPU), "
                                                   "`auto` (bmtrain when CUDA + bmtrain, else fsdp)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = key("auto", "`bf16`, `fp16` (loss scaling), `fp32`; auto = "
                                                          "bf16 on CUDA, fp32 on CPU")
    activation_checkpointing: bool = key(False, "activation checkpointing of transformer layers (all of them, or "
                                         "every `checkpoint_every`-th): recompute in backward, for memory")
    checkpoint_every: int = key(1, "with `activation_checkpointing`: checkpoint layers 0, k, 2k, ... only (1 = every "
                                "layer); selective checkpointing trades memory back for speed", min=1)
    offload: bool = key(False, "keep optimizer state on the CPU: bmtrain's AdamOffloadOptimizer; fsdp's "
                        "CPUOffloadPolicy (parameters, gradients and optimizer state)")
    compile: bool = key(False, "compile each transformer layer with torch.compile before the engine wraps it "
                        "(fsdp: before sharding; bmtrain: the layer inside its bmt.Block)")
    loss_chunk: int = key(1024, "tokens of the LM head and cross-entropy computed at a time (recomputed in "
                          "backward), so the full-vocabulary logits never exist; 0 = all logits at once (the "
                          "engine's loss: more memory, no recompute)", min=0)


@dataclass
class EvalConfig:
    """Validation during training (:mod:`fm.eval.validation`; docs/evaluation.md)."""

    mixture: str = key("", "mixture config of held-out data for the validation loss (same format as "
                       "`data.mixture`)")
    iters: int = key(10, "batches per process in the fixed validation set (built once at start-up)", min=1)
    interval: int = key(0, "validation loss every N iterations and once more at the end of training; 0 = off; "
                        "> 0 needs `eval.mixture`", min=0)
    downstream_interval: int = key(0, "C-Eval/CMMLU/MMLU accuracy (`Eval/<task>/accuracy`) on a fixed subset every N "
                                   "iterations and at the end of training; 0 = off; > 0 needs a `*_dir`", min=0)
    downstream_limit: int = key(10, "the first N questions of every subject (as `fm eval --limit N`)", min=1)
    downstream_subjects: str = key("", "comma-separated subjects to score (as `fm eval --subjects`); empty = all")
    downstream_shots: int = key(0, "few-shot examples per question, the first K of each subject's dev split (as "
                                "`fm eval --shots`)", min=0)
    downstream_batch_size: int = key(8, "prompts per forward", min=1)
    ceval_dir: str = key("", "C-Eval directory (`dev/ val/ test/`, `fm eval --ceval-dir`); scored on `val`")
    cmmlu_dir: str = key("", "CMMLU directory (`dev/ test/`, `fm eval --cmmlu-dir`); scored on `test`")
    mmlu_dir: str = key("", "MMLU `data/` directory (`dev/ test/`, `fm eval --mmlu-dir`); scored on `test`")


@dataclass
class LoraSection:
    """PEFT LoRA fine-tuning (:mod:`fm.train.lora`)."""

    enabled: bool = key(False, "train PEFT LoRA adapters only; checkpoints hold the adapter (PEFT format)")
    r: int = key(8, "LoRA rank", min=1)
    alpha: float = key(16.0, "LoRA scale `alpha / r`", gt=0)
    dropout: float = key(0.0, "dropout on the adapter input, in [0, 1)", min=0)
    targets: tuple[str, ...] = key(("q", "k", "v"), "modules to adapt: a list or a comma string of `q k v out fc0 "
                                   "fc1 fc2` (aliases `o`, `gate`=fc0, `up`=fc1, `down`=fc2) or module names")


@dataclass
class TrainConfig:
    """Every train key: its section, type, default and meaning (``fm train --help`` and docs/training.md come from
    here)."""

    run: RunConfig = section(RunConfig, "run identity, length and outputs")
    data: DataConfig = section(DataConfig, "the training data")
    model: ModelSection = section(ModelSection, "the model and its initial weights")
    optim: OptimConfig = section(OptimConfig, "AdamW")
    stability: StabilityConfig = section(StabilityConfig, "loss-spike detection")
    schedule: ScheduleConfig = section(ScheduleConfig, "learning-rate schedule")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "saving and resuming")
    engine: EngineConfig = section(EngineConfig, "parallelism, precision and memory")
    eval: EvalConfig = section(EvalConfig, "validation and downstream evaluation during training")
    lora: LoraSection = section(LoraSection, "LoRA fine-tuning")
    # not user keys: what translating upstream's keys had to say (no-op keys the user set), logged by rank 0
    notes: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """fm's form (sections), as a checkpoint records it and ``load_config`` reads it back."""
        d = dataclasses.asdict(self)
        d.pop("notes", None)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def warmup_steps(self) -> int:
        return frac_or_steps(self.schedule.warmup_iters, self.run.train_iters)

    def drop_steps(self) -> int:
        return frac_or_steps(self.schedule.drop_iters, self.run.train_iters)

    def decay_start(self) -> int | None:
        """The first step of the schedule's decay (``warmupstabledrop``: ``train_iters - drop_steps``;
        ``warmupstableexp``: ``drop_begin``, or the same when < 0); None for schedules without one."""
        sch, T = self.schedule, self.run.train_iters
        if sch.name == "warmupstabledrop" or (sch.name == "warmupstableexp" and sch.drop_begin < 0):
            return T - self.drop_steps()
        if sch.name == "warmupstableexp":
            return sch.drop_begin
        return None

    def stage_starts(self) -> list[int]:
        """The first iteration of every data stage: ``[0, data.stages[0].start_iter, ...]`` with ``decay``
        resolved. ConfigError for ``decay`` under a schedule without a decay start (cross_problems says more)."""
        starts = [0]
        for i, st in enumerate(self.data.stages):
            if st.start_iter == "decay":
                decay = self.decay_start()
                if decay is None:
                    raise ConfigError(f"data.stages[{i}].start_iter: \"decay\" needs a schedule with a decay "
                                      f"(warmupstabledrop or warmupstableexp), not {self.schedule.name}")
                starts.append(decay)
            else:
                starts.append(int(st.start_iter))
        return starts

    def stage_mixtures(self) -> list[str]:
        """The mixture config of every data stage, stage 0 (``data.mixture``) first."""
        return [self.data.mixture, *(st.mixture for st in self.data.stages)]


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("section"))


# ---------------------------------------------------------------------------------------------- loading
def _layer(data: dict[str, Any], where: str, *, from_cli: bool, problems: list[str],
           notes: list[str]) -> dict[str, Any]:
    """One layer (a file, the overrides, the command line) as checked nested values. Its keys may be fm's
    (sections, or ``section.key`` on the command line) or upstream's flat keys, translated here once."""
    from fm.compat.upstream import rename_problem, to_sections

    nested, found, said, aliases = to_sections(data, where, TrainConfig)
    notes += said
    values, more = check(TrainConfig, nested, from_cli=from_cli, ignore=("notes",))
    problems += [f"{where}: {rename_problem(p, aliases)}" for p in found + more]
    return values


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def read_json_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train config {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a JSON object of key: value")
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                *, cli: dict[str, str] | list[tuple[str, str]] | None = None, validate_: bool = True,
                collect: list[str] | None = None) -> TrainConfig:
    """Defaults < JSON file at ``path`` < ``overrides`` (typed, from code) < ``cli`` (strings from the command line,
    see :mod:`fm.compat.argv`); each in fm's or upstream's form. Every problem of every layer is reported at once
    (one :class:`ConfigError`), or, with ``collect``, appended to it and the config returned with the faulty keys
    at their defaults."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    notes: list[str] = []
    if path is not None:
        _merge(values, _layer(read_json_config(path), str(path), from_cli=False, problems=problems, notes=notes))
    if overrides:
        _merge(values, _layer(dict(overrides), "overrides", from_cli=False, problems=problems, notes=notes))
    if cli:
        _merge(values, _layer(dict(cli), "command line", from_cli=True, problems=problems, notes=notes))
    cfg = dataclasses.replace(build(TrainConfig, values), notes=tuple(dict.fromkeys(notes)))
    if validate_:
        where = str(path) if path else "config"
        problems += [f"{where}: {p}" for p in cross_problems(cfg, where)]
    if collect is not None:
        collect += problems
        return cfg
    if problems:
        raise ConfigError(format_problems("train config", problems) if len(problems) > 1 else problems[0])
    return cfg


def qualify_model_config(cfg: TrainConfig, family: str | None) -> TrainConfig:
    """An app of one family reads an unqualified shipped name as its own (``config: "tiny"`` in a Spark config
    is ``spark/tiny``); elsewhere unqualified names are dragonfly's."""
    name = cfg.model.config
    if family and "/" not in name and not Path(name).is_file():
        cfg.model.config = f"{family}/{name}"
    return cfg


def cross_problems(cfg: TrainConfig, source: str = "config") -> list[str]:
    """The checks that span keys (types, choices and single-key ranges are checked while loading, from the field
    declarations). Reads the config, never changes it."""
    problems: list[str] = []
    run, sch, ev, lora = cfg.run, cfg.schedule, cfg.eval, cfg.lora
    if ev.interval > 0 and not ev.mixture:
        problems.append(f"eval.interval: {ev.interval} needs eval.mixture (a mixture config of held-out data); set "
                        "eval.mixture or eval.interval 0")
    if ev.mixture and ev.interval == 0:
        log.warning("%s: eval.mixture is set but eval.interval is 0: no validation (set eval.interval > 0)", source)
    if ev.downstream_interval > 0 and not (ev.ceval_dir or ev.cmmlu_dir or ev.mmlu_dir):
        problems.append(f"eval.downstream_interval: {ev.downstream_interval} needs eval.ceval_dir, eval.cmmlu_dir "
                        "or eval.mmlu_dir; set one or eval.downstream_interval 0")
    if not 0 < sch.drop_rate <= 1 and sch.name == "warmupstableexp":
        problems.append(f"schedule.drop_rate: must be in (0, 1], got {sch.drop_rate}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {lora.dropout}")
    if lora.enabled and not lora.targets:
        problems.append('lora.targets: is empty: name at least one module, e.g. "q,k,v"')
    w, d = cfg.warmup_steps(), cfg.drop_steps()
    if w > run.train_iters:
        problems.append(f"schedule.warmup_iters: {w} steps > run.train_iters {run.train_iters}")
    if sch.name in ("warmupstabledrop", "warmupstableexp") and d < 1:
        problems.append(f"schedule.drop_iters: {sch.name} needs drop_iters >= 1 step, got {sch.drop_iters}")
    problems += _stage_problems(cfg)
    if not run.name or "/" in run.name:
        problems.append(f"run.name: {run.name!r} must be a non-empty name without '/'")
    ck = cfg.checkpoint
    if ck.merge_last_n and ck.keep_last_n and ck.keep_last_n < ck.merge_last_n:
        problems.append(f"checkpoint.merge_last_n: {ck.merge_last_n} needs that many checkpoints kept, but "
                        f"checkpoint.keep_last_n is {ck.keep_last_n}; set keep_last_n >= merge_last_n (or 0)")
    if ck.merge_last_n and lora.enabled:
        problems.append("checkpoint.merge_last_n: a LoRA run's checkpoints hold adapters, not the model; average them "
                        "after training with fm merge (it folds each adapter into its base)")
    if cfg.checkpoint.resume.weights_only and not cfg.checkpoint.resume.source:
        log.warning("%s: checkpoint.resume.weights_only is set but checkpoint.resume.source is empty: training "
                    "starts from scratch", source)
    return problems


def _stage_problems(cfg: TrainConfig) -> list[str]:
    """``data.stages``: each names a mixture and starts inside the run, after the one before; ``decay`` only under a
    schedule with a decay start. Every problem at once."""
    problems: list[str] = []
    previous, T = 0, cfg.run.train_iters
    for i, st in enumerate(cfg.data.stages):
        where = f"data.stages[{i}].start_iter (stage {i + 1})"
        if not st.mixture:
            problems.append(f"data.stages[{i}].mixture (stage {i + 1}): is empty: name the stage's mixture config JSON")
        start = st.start_iter
        if start == "decay":
            start = cfg.decay_start()
            if start is None:
                problems.append(f'{where}: "decay" needs a schedule with a decay start '
                                f"(schedule.name warmupstabledrop or warmupstableexp); schedule.name is "
                                f"{cfg.schedule.name}: give the iteration number instead")
                continue
            what = f'"decay" (iteration {start})'
        else:
            what = str(start)
        if start <= 0:
            problems.append(f"{where}: {what} must be > 0 (data.mixture is the stage from iteration 0)")
        elif start >= T:
            problems.append(f"{where}: {what} must be < run.train_iters {T} (the stage would never run)")
        elif start <= previous:
            problems.append(f"{where}: {what} is not after the stage before it (iteration {previous}): "
                            "stages must be listed in increasing order of start_iter")
        previous = max(previous, start)
    return problems


def _carried_tokenizer(checkpoint: str | Path, named: str) -> str | None:
    """The tokenizer the checkpoint carries (a path), or None; ConfigError naming the key when it cannot be opened."""
    from fm.checkpoint.layout import CheckpointError
    from fm.checkpoint.open import open_checkpoint

    try:
        tok = open_checkpoint(checkpoint).tokenizer
    except (OSError, ValueError, CheckpointError) as e:
        raise ConfigError(f"data.tokenizer is empty and {named} cannot be opened: {e}") from None
    return None if tok is None else str(tok)


def tokenizer_source(cfg: TrainConfig) -> tuple[str, str]:
    """``(tokenizer spec, where it comes from)`` of a run: ``data.tokenizer`` when set; when empty, the tokenizer the
    resume checkpoint (``checkpoint.resume.source``, if it names one that exists) carries, else ``model.init_from``'s.
    ``demo`` when it is empty and neither names a checkpoint; ConfigError when a named checkpoint carries none (an
    upstream ``.pt`` alone: which tokenizer made its data is for the user to say). The preflight and the trainer both
    use this."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer, "data.tokenizer"
    from fm.checkpoint.layout import resolve_checkpoint

    tried = []
    spec = cfg.checkpoint.resume.source.strip()
    if spec:
        try:
            resume = Path(spec) if Path(spec).is_file() else resolve_checkpoint(cfg.run.dir(), spec)
        except (OSError, ValueError):
            resume = None
        if resume is not None:
            tok = _carried_tokenizer(resume, f"checkpoint.resume.source {spec!r} ({resume})")
            if tok is not None:
                return tok, f"checkpoint.resume.source {resume}"
            tried.append(f"checkpoint.resume.source {resume}")
    if cfg.model.init_from:
        tok = _carried_tokenizer(cfg.model.init_from, f"model.init_from {cfg.model.init_from!r}")
        if tok is not None:
            return tok, f"model.init_from {cfg.model.init_from}"
        tried.append(f"model.init_from {cfg.model.init_from}")
    if not tried:  # a fresh run from scratch: the shipped demo tokenizer, as fm always defaulted to
        return "demo", "the default (data.tokenizer not set and no checkpoint to take it from)"
    raise ConfigError(f"data.tokenizer is empty and {' nor '.join(tried)} carries no tokenizer: set data.tokenizer "
                      "(a SentencePiece .model, tokenizer.json or Hugging Face tokenizer directory, or demo)")


# ---------------------------------------------------------------------------------------------- help
def _rows() -> list[tuple[str, str, str, Any, str]]:
    """``(key, upstream key, type, default, meaning)`` per key."""
    from fm.compat.upstream import upstream_name

    return [(name, upstream_name(name), typ, default, text) for name, typ, default, text in help_rows(TrainConfig)]


def keys_markdown() -> str:
    """The key tables of docs/training.md (a test keeps the two identical): fm's keys by section, with the upstream
    key each one is read from, then upstream's keys that do nothing or are refused."""
    from fm.compat.upstream import NO_OPS, REFUSED

    lines = ["| key | upstream key | type | default | meaning |", "|---|---|---|---|---|"]
    for name, up, typ, default, text in _rows():
        lines.append(f"| `{name}` | {f'`{up}`' if up else ''} | {typ.replace('|', '/')} | "
                     f"`{show_default(default)}` | {text} |")
    lines += ["", "| upstream key | accepted values | what fm does |", "|---|---|---|"]
    for name, why in NO_OPS.items():
        lines.append(f"| `{name}` | any | nothing: {why} (said once at start when set) |")
    for name, (legal, why) in REFUSED.items():
        lines.append(f"| `{name}` | `{show_default(legal)}` only | refused otherwise: {why} |")
    return "\n".join(lines)


def keys_help(width: int = 100) -> str:
    """Every train key with its type, default, upstream name and meaning, for ``fm train --help``."""
    import textwrap

    out = []
    for name, up, typ, default, text in _rows():
        metavar = ("{" + typ.removeprefix("one of ").replace(", ", ",") + "}") if typ.startswith("one of") else \
            typ.upper().replace(" ", "_")
        alias = f"  (upstream --{up})" if up else ""
        out.append(f"  --{name} {metavar}  [default {show_default(default)}]{alias}")
        out += textwrap.wrap(text.replace("`", ""), width, initial_indent="      ", subsequent_indent="      ")
    from fm.compat.upstream import NO_OPS, REFUSED

    out.append("\n  upstream keys accepted with no effect (said once at start when set):")
    for name, why in NO_OPS.items():
        out += textwrap.wrap(f"--{name}: {why}", width, initial_indent="    ", subsequent_indent="      ")
    out.append("  upstream keys refused unless at their one legal value:")
    for name, (legal, why) in REFUSED.items():
        out += textwrap.wrap(f"--{name} {show_default(legal)} only: {why}", width, initial_indent="    ",
                             subsequent_indent="      ")
    return "\n".join(out)


if __name__ == "__main__":  # python -m fm.train.config: the docs/training.md key tables
    print(keys_markdown())
