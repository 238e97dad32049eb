"""The pretraining loop: engine + model + mixture loader + schedule, with exact resume.

One optimizer step ("iteration") = ``grad_accum`` micro-batches of ``batch_size`` packed rows per rank.
The loss is normalised by the GLOBAL number of target tokens of the step (over micro-batches and
ranks), so the update equals one big batch's mean token loss whatever the split; the engines sum
gradients over ranks.

A step reads as::

    sums = forward_backward(micro-batches)       # device work only: per-token losses, per-task sums
    norm = engine.clip_grad_norm(clip_grad)      # on the device
    take the next step's micro-batches           # host work while the device computes
    agreed = agree(sums, norm, ...)              # ONE all-reduce and ONE copy to the host (fm.train.step)
    update(agreed)                               # apply or skip the optimizer step, advance the schedule
    log(agreed)

Through that agreement every rank learns the same things: the loss, whether any rank saw a non-finite
loss (or the grad norm is non-finite), whether any rank got a stop signal (SIGTERM/SIGUSR1), the
per-task losses, and the next step's global target count and whether every rank still has data. A
non-finite step is skipped everywhere (gradients dropped, schedule not advanced); ``max_skipped_steps``
consecutive ones stop training with an error after saving the last good state.

Validation (``eval_interval`` > 0): the fixed batches of ``eval_dataset_config`` (built once, see
``fm.eval.validation``) are evaluated every ``eval_interval`` steps and once more at the end of training
(``train_iters`` reached, or the data ran out), not after a stop signal or the non-finite limit.

Fault injection for tests: a :class:`fm.train.hooks.FaultHooks` object (``run`` builds it from the
``FM_TEST_*`` variables once).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fm.models.config import DTYPES, config_to_dict
from fm.train import checkpoint as ckpt_lib
from fm.train.config import TrainConfig, log_no_ops
from fm.train.guard import RunLock, RunLockError, watch_launcher
from fm.train.hooks import FaultHooks
from fm.train.metrics import (
    MetricsWriter,
    count_non_embedding_params,
    flops_per_token,
    format_inspect_table,
    guess_peak_tflops,
    inspect_stats,
    plot_loss_curve,
)
from fm.train.optim import mup_param_groups
from fm.train.schedules import build_scheduler
from fm.train.step import Agreement, StepSums, agree, host_counts, micro_to_device, to_host

log = logging.getLogger("fm.train")

EXIT_OK, EXIT_NONFINITE = 0, 3


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


# --------------------------------------------------------------------------------------- checkpoints
def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.save) / cfg.model_unique


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """``resume_ckpt``: "" → None; "latest" → newest complete checkpoint (None if there is none yet);
    a step number → ``<save>/<model_unique>/<step>``; a checkpoint directory; or a bare ``.pt`` model file."""
    spec = cfg.resume_ckpt.strip()
    if not spec:
        return None
    p = Path(spec)
    if p.is_file():
        return p
    return ckpt_lib.resolve_checkpoint(run_dir(cfg), spec)


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return DTYPES[name]


def checkpoint_model_config(model_config, trained_length: int) -> dict:
    """The model config a checkpoint records: ``max_length`` (the context an export declares) is at least the
    rows the model was trained on."""
    out = config_to_dict(model_config)
    if "max_length" in out:
        out["max_length"] = max(int(out["max_length"]), trained_length)
    return out


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_fm_train", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                         "%H:%M:%S"))
        h._fm_train = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("fm").setLevel(level)


@dataclass
class TrainerState:
    """The trainer's resumable counters; a checkpoint's ``.log_ckpt`` holds them (upstream key names)."""

    iteration: int = 0  # optimizer steps attempted (taken + skipped)
    skipped_total: int = 0
    consumed_tokens: int = 0  # non-padding tokens consumed, all ranks
    task_tokens: dict[str, int] = field(default_factory=dict)  # target tokens per task, all ranks


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds a run from its config (:meth:`setup`) and trains it (:meth:`train`). ``engine``: an initialised
    engine to use instead of building one; ``hooks``: fault injection for tests."""

    def __init__(self, cfg: TrainConfig, engine=None, hooks: FaultHooks | None = None):
        self.cfg = cfg
        self.engine = engine
        self.hooks = hooks or FaultHooks()
        self.state = TrainerState()
        self.skipped_consecutive = 0
        self.to_host = to_host  # the step's one device-to-host copy (tests with a stand-in device replace it)
        self._stop_signal = 0
        self.ckpt: ckpt_lib.CheckpointManager | None = None
        self._last_saved = -1
        self.loader_state: dict | None = None  # this rank's loader state after the last finished step
        self.model = None
        self.loader = None
        self.metrics: MetricsWriter | None = None
        self.val_batches: list[dict] = []  # fixed validation batches of this rank (same count on every rank)
        self.val_tasks: list[str] = []
        self._last_eval = -1  # iteration of the last validation
        self._batches: Any = None  # the loader's iterator
        self._micros: list[dict] = []  # the next step's micro-batches (taken during the previous step)
        self._agreed: Agreement | None = None  # the last agreement: the next step's target count, data left
        self.lock: RunLock | None = None  # rank 0's lock on the run directory

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = TrainerState(iteration=int(d["iteration"]), skipped_total=int(d.get("skipped_total", 0)),
                                  consumed_tokens=int(d.get("consumed_tokens", 0)),
                                  task_tokens={k: int(v) for k, v in d.get("task_tokens", {}).items()})

    @property
    def iteration(self) -> int:
        return self.state.iteration

    # ------------------------------------------------------------------ build
    def setup_engine(self) -> None:
        if self.engine is None:
            from fm.distributed import build_engine

            self.engine = build_engine(self.cfg.engine, seed=self.cfg.seed)
            self.engine.init()
        setup_logging(self.engine.rank)
        if self.engine.is_main:
            # one line, whole: a multi-line record can be cut or interleaved by what collects the workers' output
            log.info("resolved train config: %s", json.dumps(self.cfg.to_dict(), ensure_ascii=False))
            log_no_ops(self.cfg, log)

    def build_loader(self):
        from fm.data.loader import build_train_loader
        from fm.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(self.cfg.tokenizer_path)
        if self.cfg.eos_token:  # e.g. Spark's "<end>": the piece every sample ends with (and is trained on)
            eos = self.tokenizer.piece_to_id(self.cfg.eos_token)
            if eos == self.tokenizer.unk_id:
                raise ValueError(f"eos_token {self.cfg.eos_token!r} is not a piece of {self.cfg.tokenizer_path}")
            self.tokenizer.eos_id = eos
        e = self.engine
        self.loader = build_train_loader(
            self.cfg.dataset_config, self.tokenizer, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
            rank=e.rank, world_size=e.world_size, num_workers=self.cfg.dataloader_num_workers,
            prefetch_factor=self.cfg.dataloader_prefetch_factor, seed=self.cfg.seed,
            vocab_size=self._vocab_size())
        return self.loader

    def _vocab_size(self) -> int | None:
        """The model's vocabulary, which the loader checks every dataset's token ids against."""
        mc = getattr(self, "model_config", None)
        if mc is None and self.cfg.config:
            from fm.models.registry import load_model_config

            mc = load_model_config(self.cfg.config)
        return getattr(mc, "vocab_size", None)

    def build_validation(self) -> None:
        """The fixed validation set: the first ``eval_iters`` batches per rank of ``eval_dataset_config``
        (seed ``seed``), kept in memory. After :meth:`build_loader`: its tokenizer, so ``eos_token`` applies
        here too. Collective."""
        from fm.eval.validation import fixed_batches

        cfg, e = self.cfg, self.engine
        if not (cfg.eval_interval and cfg.eval_dataset_config):
            return
        batches = fixed_batches(cfg.eval_dataset_config, self.tokenizer, batch_size=cfg.batch_size,
                                max_length=cfg.max_length, n_batches=cfg.eval_iters, rank=e.rank,
                                world_size=e.world_size, seed=cfg.seed)
        # Every forward of a sharded model is a collective: all ranks must run the same number of batches.
        n = int(e.all_reduce(float(len(batches)), "min"))
        if n == 0:
            log.warning("eval_dataset_config %s gives no batch on some rank: validation is off",
                        cfg.eval_dataset_config)
            return
        self.val_batches = batches[:n]
        self.val_tasks = list(batches[0]["task_names"])
        if e.is_main:
            log.info("validation set: %d batches per rank of %s (tasks %s), every %d steps",
                     n, cfg.eval_dataset_config, ", ".join(self.val_tasks), cfg.eval_interval)

    def validate(self) -> dict[str, Any]:
        """Token-weighted validation loss/perplexity over every rank's fixed batches (no grad, eval mode;
        the train mode is restored). Logged to the console, tensorboard and jsonl. Collective."""
        from fm.eval.validation import evaluate_loss, from_sums_tensor, sums_tensor

        e = self.engine
        t0 = time.perf_counter()
        local = evaluate_loss(self.model, self.val_batches, device=e.device)
        res = from_sums_tensor(e.all_reduce(sums_tensor(local, self.val_tasks, device=e.device), "sum"),
                               self.val_tasks)
        res["time"] = time.perf_counter() - t0
        self._last_eval = self.iteration
        self.metrics.log_validation(self.iteration, res)
        return res

    def _eval_due(self) -> bool:
        every = self.cfg.eval_interval
        return bool(self.val_batches) and (self.iteration % every == 0 or self.iteration == self.cfg.train_iters)

    def build_model(self) -> None:
        from fm.models.registry import build_model, load_model_config, mup_scaled_param_names

        cfg, e = self.cfg, self.engine
        self.model_config = load_model_config(cfg.config)
        meta = build_model(self.model_config, device="meta")
        scaled = set(mup_scaled_param_names(meta))
        scale_width = float(getattr(self.model_config, "scale_width", 1.0) or 1.0)
        self.lora_config = None
        if cfg.lora:  # PEFT adapters go in before the engine shards the model; the base is frozen
            from fm.train import lora as lora_lib

            self.lora_config = lora_lib.inject(meta, lora_lib.settings_from_train_config(cfg))
            if e.is_main:
                log.info("LoRA %s: %s", sorted(self.lora_config.target_modules),
                         lora_lib.describe(*lora_lib.count_parameters(meta)))
        self.dtype = _dtype(cfg, e.device)
        self.model = e.shard(meta, dtype=self.dtype, activation_checkpointing=cfg.use_checkpoint,
                             checkpoint_every=cfg.checkpoint_every, offload=cfg.offload, compile=cfg.compile)
        groups = mup_param_groups(self.model, weight_decay=cfg.weight_decay, scale_width=scale_width,
                                  scaled_names=scaled, shapes=e.param_shapes)
        self.optimizer = e.build_optimizer(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, offload=cfg.offload)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.n_params = count_non_embedding_params(self.model, e.param_shapes)
        mc = self.model_config
        self.flops_per_token = flops_per_token(self.n_params, mc.num_layers, mc.dim_model, cfg.max_length,
                                               mc.vocab_size)
        self.peak_flops = (cfg.peak_tflops or guess_peak_tflops(e.device)) * 1e12
        if e.is_main:
            log.info("model %s: %d non-embedding parameters, dtype %s, engine %s, world size %d, compile %s, "
                     "loss in chunks of %s tokens, activation checkpointing %s, offload %s", cfg.config,
                     self.n_params, self.dtype, e.name, e.world_size, "on" if cfg.compile else "off",
                     cfg.loss_chunk or "all", (f"every {cfg.checkpoint_every} layer(s)" if cfg.use_checkpoint
                                                else "off"), "on" if cfg.offload else "off")

    def claim_run_dir(self) -> None:
        """Rank 0 locks the run directory (one writer: a live holder makes every rank fail at once, naming it) and
        removes the temp dirs of saves that never committed. Collective."""
        cfg, e = self.cfg, self.engine
        rd = run_dir(cfg)
        problem = None
        if e.is_main:
            try:
                self.lock = RunLock(rd)
                self.lock.acquire()
                gone = ckpt_lib.remove_stale_tmp(rd)
                if gone:
                    log.info("removed %d unfinished checkpoint save(s) under %s: %s", len(gone), rd, ", ".join(gone))
            except RunLockError as exc:
                self.lock = None
                problem = str(exc)
        problem = e.broadcast_object(problem) if e.world_size > 1 else problem
        if problem:
            raise RunLockError(problem)

    def setup_outputs(self) -> None:
        """Console, tensorboard and jsonl writers (rank 0). After :meth:`resume`: steps logged by a run that
        crashed after its last checkpoint are purged from tensorboard (they are logged again)."""
        cfg, e = self.cfg, self.engine
        rd = run_dir(cfg)
        if e.is_main:
            rd.mkdir(parents=True, exist_ok=True)
        tb = Path(cfg.tensorboard) / f"{cfg.exp_group}{cfg.model_unique}" if cfg.tensorboard else None
        self.stats_path = rd / "train_stats.jsonl"
        self.metrics = MetricsWriter(enabled=e.is_main, tensorboard_dir=tb, jsonl_path=self.stats_path,
                                     all_tasks=cfg.tensorboard_all_tasks, log_iters=cfg.log_iters,
                                     purge_step=self.iteration + 1 if self.iteration else None)
        if e.is_main and not self.iteration:
            self.metrics.log_text("config", "```\n" + cfg.dumps() + "\n```", 0)

    def setup(self) -> None:
        """Everything a run needs, in order; with ``only_run_dataloader`` just the engine and the loader."""
        self.setup_engine()
        if self.cfg.only_run_dataloader:
            self.build_loader()
            return
        self.build_model()
        self.build_loader()
        self.build_validation()
        self.claim_run_dir()
        self.resume()
        self.setup_outputs()

    # ------------------------------------------------------------------ resume
    def verified(self, ckpt: Path) -> list[str]:
        """Problems of checkpoint ``ckpt`` against its manifest, every rank checking a share. Collective."""
        e = self.engine
        mine = ckpt_lib.verify_checkpoint(ckpt, e.rank, e.world_size)
        return [p for part in e.all_gather_object(mine) for p in part] if e.world_size > 1 else mine

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from, verified. For ``latest`` a damaged one is passed over (saying so) for the
        newest one that verifies; a checkpoint named explicitly must verify. Collective."""
        cfg = self.cfg
        ckpt = resolve_resume(cfg)
        if ckpt is None or not ckpt.is_dir() or not ckpt_lib.is_complete(ckpt):
            return ckpt  # nothing, a bare .pt, or an upstream directory (no manifest to check)
        problems = self.verified(ckpt)
        if not problems:
            return ckpt
        first = f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if cfg.resume_ckpt.strip().lower() != "latest":
            raise ckpt_lib.CheckpointError(f"checkpoint {ckpt} is damaged: {first}; resume from another step")
        for step in reversed(ckpt_lib.list_checkpoints(run_dir(cfg))):
            cand = run_dir(cfg) / str(step)
            if cand == ckpt:
                continue
            more = self.verified(cand)
            if not more:
                log.warning("checkpoint %s is damaged (%s): resuming from %s, the newest checkpoint that verifies",
                            ckpt, first, cand)
                return cand
            log.warning("checkpoint %s is damaged too (%s)", cand, more[0])
        raise ckpt_lib.CheckpointError(f"no checkpoint under {run_dir(cfg)} verifies (the newest, {ckpt}: {first}); "
                                       "remove the damaged ones to start afresh")

    def resume(self) -> None:
        cfg, e = self.cfg, self.engine
        ckpt = self.resume_point()
        if cfg.load_model and (ckpt is None or cfg.lora):  # fine-tuning: base weights (always, under LoRA)
            from fm.train import lora as lora_lib

            lora_lib.load_base_weights(e, cfg.load_model)
        if ckpt is None:
            if cfg.resume_ckpt and e.is_main:
                log.info("resume_ckpt=%r: no complete checkpoint under %s yet, starting fresh",
                         cfg.resume_ckpt, run_dir(cfg))
            return
        if cfg.lora and ckpt.is_dir():  # a LoRA checkpoint holds the adapter only (PEFT format)
            from fm.train import lora as lora_lib

            log.info("resuming LoRA adapter from %s", ckpt)
            lora_lib.load_adapter_into(e, ckpt)
        else:
            mf = ckpt if ckpt.is_file() else ckpt_lib.model_file(ckpt)
            log.info("resuming from %s (model %s)", ckpt, mf.name)
            e.load_model(mf, strict=cfg.strict_state_dict)
        if ckpt.is_file():
            return  # a bare model file: weights only
        if cfg.only_load_model:
            log.info("only_load_model: weights loaded; step, optimizer, schedule and data start fresh")
            return
        data_file = ckpt / ckpt_lib.DATASET_FILE
        if cfg.load_dataloader_ckpt and data_file.is_file():
            # Errors propagate: never train on a silently reset data order.
            self.loader.load_state_dict(json.loads(data_file.read_text()))
        elif e.is_main:
            log.warning("data loader state not restored (load_dataloader_ckpt=%s, %s exists: %s): data starts "
                        "from the beginning", cfg.load_dataloader_ckpt, data_file, data_file.is_file())
        self.load_state_dict(ckpt_lib.read_log_ckpt(ckpt))
        self.scheduler.load_state_dict(ckpt_lib.read_scheduler_state(ckpt))
        if cfg.resume_no_optimze > 0:
            log.info("resume_no_optimze=%d: optimizer state not loaded; lr re-warms over %d steps",
                     cfg.resume_no_optimze, cfg.resume_no_optimze)
            self.scheduler.start_rewarm()
        else:
            e.load_optimizer(ckpt / ckpt_lib.OPTIMIZER_DIR)
            self.scheduler.apply()  # loading the optimizer restores old group lrs: set the schedule's
        rng = ckpt / ckpt_lib.RNG_FILE.format(rank=e.rank)
        if rng.is_file():
            ckpt_lib.set_rng_state(ckpt_lib.read_rng_state(rng))
        self._last_saved = self.iteration
        log.info("resumed at iteration %d (%d optimizer steps taken, %d skipped)",
                 self.iteration, self.scheduler.num_iters, self.state.skipped_total)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, reason: str = "save_iters") -> Path:
        """Collective. ``fm.train.checkpoint.CheckpointManager`` writes into a temp dir and commits it
        atomically (``COMPLETE`` marker + rename), so ``latest`` never picks a half-written directory."""
        cfg, e = self.cfg, self.engine
        step = self.iteration
        if self.metrics is not None:
            self.metrics.flush()  # what was logged up to the checkpoint is on disk: a crash loses only later steps,
            # which the resumed run logs again
        if self.ckpt is None:
            self.ckpt = ckpt_lib.CheckpointManager(run_dir(cfg), keep_last_n=cfg.keep_last_n or None,
                                                   async_save=cfg.async_save, comm=e)
        self.ckpt.wait()  # a previous async save must be committed before the next one starts
        loader_states = e.all_gather_object(self.loader_state)
        merged = None
        if e.is_main and all(s is not None for s in loader_states):
            from fm.data.loader import merge_states

            merged = merge_states(loader_states)
        log_ckpt = {**self.state_dict(), "optimizer_steps": self.scheduler.num_iters, "world_size": e.world_size,
                    "reason": reason, "time": time.time()}
        make_parts = ckpt_lib.standard_parts
        if cfg.lora:  # adapter files instead of the full model
            from fm.train import lora as lora_lib

            make_parts = functools.partial(lora_lib.adapter_parts, lora_config=self.lora_config)
        parts = make_parts(e, step, log_ckpt=log_ckpt, dataset_state=merged, config=cfg.to_dict(),
                           model_config=checkpoint_model_config(self.model_config, cfg.max_length),
                           tokenizer_path=self.tokenizer.path,
                           scheduler_state=self.scheduler.state_dict())
        final = self.ckpt.save(step, parts)
        self._last_saved = step
        if e.is_main:
            log.info("checkpoint %s: %s (%s)", "started" if cfg.async_save else "saved", final, reason)
        return final

    def wait_for_save(self) -> None:
        if self.ckpt is not None:
            self.ckpt.wait()

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------ step
    def _take(self) -> list[dict]:
        """The next step's ``grad_accum`` micro-batches, or ``[]`` when this rank's data ended."""
        if self._batches is None:  # run_step: the caller brings the batches
            return []
        out = []
        for _ in range(self.cfg.grad_accum):
            try:
                out.append(next(self._batches))
            except StopIteration:
                return []
        return out

    def forward_backward(self, micros: list[dict], total_targets: int) -> StepSums:
        """Forward and backward of a step's micro-batches, the loss divided by the step's global target count.
        Device work only: the sums it returns stay on the device."""
        e = self.engine
        sums = StepSums.zeros(len(self.loader.task_names), e.device)
        poison = self.hooks.poisons(e.rank, self.iteration + 1)
        for m in micros:
            d = micro_to_device(m, e.device)
            per_token = self._per_token_loss(d, m)
            if poison:
                per_token = per_token * float("nan")
            e.backward(per_token.sum() / total_targets)
            sums.add(per_token, d["targets"], d["task_ids"])
            self.hooks.record(e.rank, self.iteration + 1, m)
            del per_token
        return sums

    def _per_token_loss(self, d: dict, m: dict) -> torch.Tensor:
        """The micro-batch's per-token losses ``[B*S]``: the head and loss in chunks inside the model's forward
        (``loss_chunk``), or the full logits through the engine's loss (``loss_chunk`` 0)."""
        kw = dict(position_ids=d["position_ids"], cu_seqlens=m["cu_seqlens"], max_seqlen=m["max_seqlen"])
        if self.cfg.loss_chunk:
            return self.model(d["inputs"], targets=d["targets"], loss_chunk=self.cfg.loss_chunk, **kw)
        return self.engine.loss(self.model(d["inputs"], **kw), d["targets"])

    def update(self, agreed: Agreement) -> bool:
        """Apply the step, or skip it everywhere (non-finite loss or gradient norm on any rank). True when taken.

        Under dynamic loss scaling (fp16) non-finite gradients with finite losses are an overflow: the engine
        skips the update itself and lowers the scale; that is no failure and not counted towards
        ``max_skipped_steps``."""
        e = self.engine
        overflow = not math.isfinite(agreed.grad_norm)
        taken = not (agreed.nonfinite_loss or overflow)
        if taken:
            e.optimizer_step()
            self.scheduler.step()
            self.skipped_consecutive = 0
        else:
            self.state.skipped_total += 1
            if overflow and not agreed.nonfinite_loss and e.scales_loss:
                e.optimizer_step()
            else:
                self.skipped_consecutive += 1
        e.zero_grad()
        return taken

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the micro-batches taken during the previous step; returns its logged stats."""
        e, cfg = self.engine, self.cfg
        t0 = time.perf_counter()
        lr = self.scheduler.current_lr()
        total_targets = max(1, self._agreed.next_targets)
        micros = self._micros
        sums = self.forward_backward(micros, total_targets)
        grad_norm = e.clip_grad_norm(cfg.clip_grad)
        last = self.iteration + 1 >= cfg.train_iters or self._batches is None
        if self._batches is not None:
            self.loader_state = self.loader.state_dict()  # the data position after this step's batches
        self._micros = [] if last else self._take()
        next_targets, _ = host_counts(self._micros)
        agreed = agree(e, sums, grad_norm, stop=bool(self._stop_signal), tokens=host_counts(micros)[1],
                       next_targets=next_targets, next_missing=not self._micros and not last, host=self.to_host)
        self._agreed = agreed
        if cfg.inspect_iters and (self.iteration + 1) % cfg.inspect_iters == 0:
            rows = inspect_stats(self.model, e.all_reduce, e.param_shapes)
            if e.is_main:
                log.info("parameter statistics at iteration %d:\n%s", self.iteration + 1, format_inspect_table(rows))
        taken = self.update(agreed)
        self.state.iteration += 1
        self.state.consumed_tokens += agreed.tokens
        task_loss = {}
        for name, loss_sum, count in zip(self.loader.task_names, agreed.task_loss_sum, agreed.task_targets):
            if count > 0:
                if not agreed.nonfinite_loss:
                    task_loss[name] = loss_sum / count
                self.state.task_tokens[name] = self.state.task_tokens.get(name, 0) + count
        dt = time.perf_counter() - t0
        tps = agreed.tokens / dt if dt > 0 else 0.0
        return {
            "iter": self.iteration, "train_iters": cfg.train_iters,
            "loss": agreed.loss_sum / total_targets if not agreed.nonfinite_loss else float("nan"),
            "lr": lr, "grad_norm": agreed.grad_norm, "loss_scale": e.loss_scale, "skipped": not taken,
            "skipped_steps": self.state.skipped_total, "tokens": agreed.tokens, "target_tokens": total_targets,
            "tokens_total": self.state.consumed_tokens, "tokens_per_sec": tps, "step_time": dt,
            "mfu": (tps * self.flops_per_token / (self.peak_flops * e.world_size)) if self.peak_flops else None,
            "memory": e.memory_stats(), "task_loss": task_loss, "world_size": e.world_size,
        }

    def start(self) -> None:
        """Take the first step's micro-batches and agree on them (one collective, before the first step)."""
        self._batches = iter(self.loader)
        if self.loader_state is None:
            self.loader_state = self.loader.state_dict()
        self._agree_on(self._take())

    def run_step(self, micros: list[dict]) -> dict[str, Any]:
        """One step on the given micro-batches instead of the loader's (tests, benchmarks). Collective."""
        self._batches = None
        self._agree_on(micros)
        return self.train_step()

    def _agree_on(self, micros: list[dict]) -> None:
        e = self.engine
        self._micros = micros
        zeros = StepSums.zeros(len(self.loader.task_names), e.device)
        self._agreed = agree(e, zeros, torch.zeros((), device=e.device), stop=False, tokens=0,
                             next_targets=host_counts(micros)[0], next_missing=not micros, host=self.to_host)

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        cfg = self.cfg
        self.install_signal_handlers()
        self.start()
        code = EXIT_OK
        data_ended = False
        stop = False
        while self.iteration < cfg.train_iters:
            if self._agreed.next_missing:
                reason = getattr(self.loader, "stop_reason", None) or "a rank's loader ended"
                log.info("data exhausted at iteration %d: %s; ending training", self.iteration, reason)
                data_ended = True
                break
            s = self.train_step()
            self.metrics.log_step(s)
            stop = self._agreed.stop
            if self._eval_due() and not stop:  # a stop signal wants the checkpoint now
                self.validate()
            self.hooks.after_step(self.iteration)
            if self.skipped_consecutive and self.skipped_consecutive >= max(1, cfg.max_skipped_steps):
                log.error("%d consecutive non-finite steps (max_skipped_steps=%d): stopping; the last good "
                          "weights are saved at iteration %d", self.skipped_consecutive, cfg.max_skipped_steps,
                          self.iteration)
                self.save_checkpoint("non-finite")
                code = EXIT_NONFINITE
                break
            if stop:
                log.info("stop signal received: saving at iteration %d and exiting", self.iteration)
                self.save_checkpoint("signal")
                break
            if cfg.save_iters and self.iteration % cfg.save_iters == 0:
                self.save_checkpoint()
        self._finish_training(code, data_ended, stop)
        if code == EXIT_NONFINITE:
            raise NonFiniteError(f"{self.skipped_consecutive} consecutive non-finite steps; checkpoint of the last "
                                 f"good weights at {run_dir(cfg) / str(self.iteration)}")
        return code

    def _finish_training(self, code: int, data_ended: bool, stopped: bool) -> None:
        cfg, e = self.cfg, self.engine
        if code == EXIT_OK and self._last_saved != self.iteration and (cfg.save_iters or data_ended):
            self.save_checkpoint("end of data" if data_ended else "end")
        if code == EXIT_OK and not stopped and self.val_batches and self._last_eval != self.iteration:
            self.validate()  # end of training (data ran out, or resumed at train_iters): the final weights
        self.wait_for_save()
        e.barrier()
        self.hooks.close()
        self.finish()
        # Rank 0 has just rendered the loss curve: let the ranks tear down their gloo groups together (a rank
        # that exits while a peer is still busy was seen to abort the peer's gloo threads).
        e.barrier()

    def finish(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.engine.is_main and self.stats_path.is_file():
            try:
                plot_loss_curve(self.stats_path, run_dir(self.cfg) / "loss_curve.png", title=self.cfg.model_unique)
            except Exception as exc:  # a plot must never fail a finished training run
                log.warning("loss curve not rendered: %s", exc)

    # ------------------------------------------------------------------ data only
    def run_dataloader_only(self) -> dict[str, float]:
        """``only_run_dataloader``: iterate the loader for ``train_iters × grad_accum`` batches, report speed."""
        e, cfg = self.engine, self.cfg
        loader = self.loader if self.loader is not None else self.build_loader()
        n = 0
        tokens = 0
        t0 = time.perf_counter()
        for b in loader:
            n += 1
            tokens += int(b["num_tokens"])
            if n >= cfg.train_iters * cfg.grad_accum:
                break
        dt = time.perf_counter() - t0
        tot = e.all_reduce(torch.tensor([float(n), float(tokens)]), "sum")
        nb, nt = tot[0].item(), tot[1].item()
        out = {"batches": nb, "tokens": nt, "seconds": dt,
               "batches_per_sec": nb / dt if dt else 0.0, "tokens_per_sec": nt / dt if dt else 0.0}
        if e.is_main:
            log.info("only_run_dataloader: %d batches, %d tokens in %.2fs: %.1f batches/s, %.0f tokens/s (all ranks)",
                     out["batches"], out["tokens"], dt, out["batches_per_sec"], out["tokens_per_sec"])
        return out


def run(cfg: TrainConfig, engine=None, hooks: FaultHooks | None = None) -> int:
    """Build everything from ``cfg`` and train; returns the process exit code (0, or 3 after the
    non-finite limit — that case also raises ``NonFiniteError`` to the caller's log). ``hooks`` default to
    the ``FM_TEST_*`` fault injections of this process's environment (none in normal runs)."""
    tr = Trainer(cfg, engine, hooks if hooks is not None else FaultHooks.from_env())
    # Before the setup, which takes minutes for a large model: slurm's early warning (SIGUSR1) or a SIGTERM
    # arriving then would otherwise kill the process (default action) instead of stopping at the first step.
    tr.install_signal_handlers()
    watch_launcher()  # under torchrun: stop at once if torchrun dies (it starts workers in their own sessions)
    try:
        tr.setup()
        if cfg.only_run_dataloader:
            tr.run_dataloader_only()
            return EXIT_OK
        return tr.train()
    finally:
        if tr.lock is not None:
            tr.lock.release()
        if tr.engine is not None:
            tr.engine.shutdown()
