"""The pretraining loop: engine + model + mixture loader + schedule, with exact resume.

One optimizer step ("iteration") = ``run.grad_accum`` micro-batches of ``data.batch_size`` packed rows per rank.
The loss is normalised by the GLOBAL number of target tokens of the step (over micro-batches and
ranks), so the update equals one big batch's mean token loss whatever the split; the engines sum
gradients over ranks.

A step reads as::

    sums = forward_backward(micro-batches)       # device work only: per-token losses, per-task sums
    norm = engine.clip_grad_norm(clip_grad)      # on the device
    take the next step's micro-batches           # host work while the device computes
    agreed = agree(sums, norm, ...)              # ONE all-reduce and ONE copy to the host (fm.train.step)
    update(agreed)                               # apply or skip the optimizer step, advance the schedule
    callbacks.step_end(stats)                    # logging, validation, ... (fm.train.callbacks)

Through that agreement every rank learns the same things: the loss, whether any rank saw a non-finite
loss (or the grad norm is non-finite), whether any rank got a stop signal (SIGTERM/SIGUSR1), the
per-task losses, and the next step's global target count and whether every rank still has data. A
non-finite step is skipped everywhere (gradients dropped, schedule not advanced); ``run.max_skipped_steps``
consecutive ones stop training with an error after saving the last good state. A loss spike (``stability.*``,
:mod:`fm.train.stability`) is decided from the same agreed loss, so on every rank alike without another
collective: logged, optionally skipped like a non-finite step, and ``stability.max_consecutive_spikes`` in a row
stop training with an error naming the last good checkpoint.

Saving and resuming belong to :class:`fm.checkpoint.checkpointer.Checkpointer`; metrics, validation, the
parameter table and the loss curve are callbacks (:mod:`fm.train.callbacks`), and so are the test suite's
injected faults.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fm.checkpoint.checkpointer import Checkpointer, CheckpointMeta
from fm.errors import FmError
from fm.models.config import DTYPES, config_to_dict
from fm.train.callbacks import Callback, TrainEnd, Validation, default_callbacks
from fm.train.config import EngineConfig, TrainConfig
from fm.train.guard import watch_launcher
from fm.train.metrics import MetricsWriter, count_non_embedding_params, flops_per_token, guess_peak_tflops
from fm.train.optim import mup_param_groups
from fm.train.schedules import build_scheduler
from fm.train.stability import SpikeCheck, SpikeDetector
from fm.train.step import Agreement, StepSums, agree, host_counts, micro_to_device, to_host

log = logging.getLogger("fm.train")

EXIT_OK, EXIT_NONFINITE, EXIT_SPIKES = 0, 3, 4


class NonFiniteError(FmError, RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""

    exit_code = EXIT_NONFINITE


class LossSpikeError(FmError, RuntimeError):
    """``stability.max_consecutive_spikes`` consecutive loss spikes; the message names the last good checkpoint."""

    exit_code = EXIT_SPIKES


def _dtype(cfg: EngineConfig, device: torch.device) -> torch.dtype:
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


class LoaderPosition:
    """The loader as the checkpointer sees it: this rank's position after the last finished step (a step takes the
    next step's batches early, so the loader itself is ahead of it), and the load of a saved one."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any] | None:
        return self.trainer.loader_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.loader.load_state_dict(state)


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds a run from its config (:meth:`setup`) and trains it (:meth:`train`). ``engine``: an initialised
    engine to use instead of building one; ``callbacks``: run after the built-in ones (:mod:`fm.train.callbacks`)."""

    def __init__(self, cfg: TrainConfig, engine=None, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.engine = engine
        self.callbacks: list[Callback] = [*default_callbacks(), *(callbacks or [])]
        self.validation = next(c for c in self.callbacks if isinstance(c, Validation))
        self.state = TrainerState()
        self.skipped_consecutive = 0
        self.spikes = SpikeDetector(cfg.stability.spike_zscore, cfg.stability.spike_window)
        self.good_checkpoint: str | None = None  # the newest checkpoint saved before any unskipped spike
        self.to_host = to_host  # the step's one device-to-host copy (tests with a stand-in device replace it)
        self._stop_signal = 0
        self.stopping = False  # the ranks agreed on a stop signal at the last step
        self.checkpointer: Checkpointer | None = None
        self.loader_state: dict | None = None  # this rank's loader state after the last finished step
        self.model = None
        self.loader = None
        self.tokenizer = None
        self.tokenizer_files = None  # the tokenizer's files as read at the start (fm.tokenizer.TokenizerFiles)
        self.metrics: MetricsWriter | None = None  # set by the MetricsLogger callback
        self.stats_path = cfg.run.dir() / "train_stats.jsonl"
        self._batches: Any = None  # the iterator the steps take their micro-batches from
        self._given_batches = False  # the batches are the caller's (tests, benchmarks), not the loader's
        self._micros: list[dict] = []  # the next step's micro-batches (taken during the previous step)
        self._agreed: Agreement | None = None  # the last agreement: the next step's target count, data left
        self.stage_starts: list[int] = [0]  # first iteration of each data stage (data.stages)

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """The counters and the loss-spike statistics (``stability``: the window of recent good losses, exactly)."""
        return {**asdict(self.state), "stability": self.spikes.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = TrainerState(iteration=int(d["iteration"]), skipped_total=int(d.get("skipped_total", 0)),
                                  consumed_tokens=int(d.get("consumed_tokens", 0)),
                                  task_tokens={k: int(v) for k, v in d.get("task_tokens", {}).items()})
        self.spikes.load_state_dict(d.get("stability", {}))  # older checkpoints: an empty window, no spikes

    @property
    def iteration(self) -> int:
        return self.state.iteration

    # ------------------------------------------------------------------ build
    def setup_engine(self) -> None:
        if self.engine is None:
            from fm.distributed import build_engine

            self.engine = build_engine(self.cfg.engine.name, seed=self.cfg.run.seed)
            self.engine.init()
        setup_logging(self.engine.rank)
        if self.engine.is_main:
            # one line, whole: a multi-line record can be cut or interleaved by what collects the workers' output
            log.info("resolved train config: %s", json.dumps(self.cfg.to_dict(), ensure_ascii=False))
            for note in self.cfg.notes:
                log.info("%s", note)

    def build_loader(self):
        from fm.data.loader import build_train_loader
        from fm.tokenizer import load_tokenizer, read_tokenizer_files
        from fm.train.config import tokenizer_source

        d, e = self.cfg.data, self.engine
        spec, where = tokenizer_source(self.cfg)
        self.tokenizer = load_tokenizer(spec)
        # its files, read once: every checkpoint carries these bytes (the source may be a step directory that
        # keep_last_n deletes later: data.tokenizer "" on resume)
        self.tokenizer_files = read_tokenizer_files(self.tokenizer.path)
        if e.is_main and where != "data.tokenizer":
            log.info("data.tokenizer is empty: using the tokenizer of %s (%s)", where, self.tokenizer.path)
        if d.eos_token:  # e.g. Spark's "<end>", Qwen's "<|im_end|>": the token every sample ends with (trained on)
            eos = self.tokenizer.piece_to_id(d.eos_token)
            if eos is None:
                raise ValueError(f"data.eos_token {d.eos_token!r} is not a token of {self.tokenizer.path}")
            self.tokenizer.eos_id = eos
        starts = self.stage_starts = self.cfg.stage_starts()
        self.loader = build_train_loader(
            d.mixture, self.tokenizer, batch_size=d.batch_size, max_length=d.max_length, rank=e.rank,
            world_size=e.world_size, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor,
            seed=self.cfg.run.seed, vocab_size=self._vocab_size(),
            stages=list(zip(starts[1:], [st.mixture for st in d.stages])), grad_accum=self.cfg.run.grad_accum)
        if e.is_main and d.stages:
            log.info("data stages: %s", "; ".join(f"stage {k} from iteration {s}: {m}" for k, (s, m) in
                                                 enumerate(zip(starts, self.cfg.stage_mixtures()))))
        return self.loader

    def _vocab_size(self) -> int | None:
        """The model's vocabulary, which the loader checks every dataset's token ids against."""
        mc = getattr(self, "model_config", None)
        if mc is None and self.cfg.model.config:
            from fm.models.registry import load_model_config

            mc = load_model_config(self.cfg.model.config)
        return getattr(mc, "vocab_size", None)

    def build_model(self) -> None:
        from fm.models.registry import build_model, load_model_config, mup_scaled_param_names

        cfg, e = self.cfg, self.engine
        eng, opt = cfg.engine, cfg.optim
        self.model_config = load_model_config(cfg.model.config)
        meta = build_model(self.model_config, device="meta")
        scaled = set(mup_scaled_param_names(meta))
        scale_width = float(getattr(self.model_config, "scale_width", 1.0) or 1.0)
        self.lora_config = None
        if cfg.lora.enabled:  # PEFT adapters go in before the engine shards the model; the base is frozen
            from fm.train import lora as lora_lib

            self.lora_config = lora_lib.inject(meta, lora_lib.settings_from_train_config(cfg.lora))
            if e.is_main:
                log.info("LoRA %s: %s", sorted(self.lora_config.target_modules),
                         lora_lib.describe(*lora_lib.count_parameters(meta)))
        self.dtype = _dtype(eng, e.device)
        self.model = e.shard(meta, dtype=self.dtype, activation_checkpointing=eng.activation_checkpointing,
                             checkpoint_every=eng.checkpoint_every, offload=eng.offload, compile=eng.compile)
        groups = mup_param_groups(self.model, weight_decay=opt.weight_decay, scale_width=scale_width,
                                  scaled_names=scaled, shapes=e.param_shapes)
        self.optimizer = e.build_optimizer(groups, lr=opt.lr, betas=(0.9, 0.95), eps=opt.eps,
                                           weight_decay=opt.weight_decay, offload=eng.offload)
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, lr=opt.lr, train_iters=cfg.run.train_iters,
                                         rewarm_iters=cfg.checkpoint.resume.rewarm_iters)
        self.n_params = count_non_embedding_params(self.model, e.param_shapes)
        mc = self.model_config
        self.flops_per_token = flops_per_token(self.n_params, mc.num_layers, mc.dim_model, cfg.data.max_length,
                                               mc.vocab_size)
        self.peak_flops = (cfg.run.peak_tflops or guess_peak_tflops(e.device)) * 1e12
        if e.is_main:
            log.info("model %s: %d non-embedding parameters, dtype %s, engine %s, world size %d, compile %s, "
                     "loss in chunks of %s tokens, activation checkpointing %s, offload %s", cfg.model.config,
                     self.n_params, self.dtype, e.name, e.world_size, "on" if eng.compile else "off",
                     eng.loss_chunk or "all", (f"every {eng.checkpoint_every} layer(s)"
                                               if eng.activation_checkpointing else "off"),
                     "on" if eng.offload else "off")

    def build_checkpointer(self) -> Checkpointer:
        """The resumable parts, registered once; the checkpointer saves and resumes them."""
        meta = CheckpointMeta(train_config=self.cfg.to_dict(),
                              model_config=checkpoint_model_config(self.model_config, self.cfg.data.max_length),
                              tokenizer_path=self.tokenizer_files or self.tokenizer.path)
        self.checkpointer = Checkpointer(
            self.cfg.checkpoint, self.cfg.run.dir(), self.engine,
            states={"trainer": self, "scheduler": self.scheduler, "loader": LoaderPosition(self)},
            meta=meta, lora_config=self.lora_config)
        return self.checkpointer

    def setup(self) -> None:
        """Everything a run needs, in order; with ``run.only_run_dataloader`` just the engine and the loader."""
        self.setup_engine()
        if self.cfg.run.only_run_dataloader:
            self.build_loader()
            return
        self.build_model()
        self.build_loader()
        ckpt = self.build_checkpointer()
        ckpt.claim()
        loaded = ckpt.load(init_from=self.cfg.model.init_from)
        self.loader.set_step(self.iteration)  # the stage of the next step (a resume may cross or move a boundary)
        if loaded is not None and (not self.spikes.consecutive or self.cfg.stability.skip_spikes):
            self.good_checkpoint = str(loaded)
        if loaded is not None:
            self._resume_spike_state()
        for cb in self.callbacks:
            cb.setup(self)

    def _resume_spike_state(self) -> None:
        """Resuming restarts the count of consecutive loss spikes (a resume is a deliberate action, typically after
        ``stability.max_consecutive_spikes`` stopped the run: the next K spikes stop it again). A checkpoint from
        before data stages has no stage of its last step: the stage its iteration has under the current config."""
        sp = self.spikes
        if sp.consecutive:
            if self.engine.is_main:
                log.info("resuming after %d consecutive loss spikes: the count restarts at 0", sp.consecutive)
            sp.consecutive = 0
        if sp.stage is None and self.iteration > 0:
            sp.stage = bisect.bisect_right(self.stage_starts, self.iteration - 1) - 1

    def _enter_stage(self, stage: int) -> None:
        """The data stage of the step about to run; at a switch (also the first step after a resume into another
        stage) the loss-spike window restarts, and rank 0 says how far the lr schedule lags the iteration count."""
        if not self.spikes.enter_stage(stage) or not self.engine.is_main:
            return
        lag = self.iteration - self.scheduler.num_iters
        log.info("data stage %d from iteration %d: %sthe lr schedule is at step %d, %d behind the iteration count "
                 "(%d skipped steps so far: the schedule advances on applied steps only)", stage, self.iteration,
                 (f"the loss-spike window restarts (detection re-arms after {self.spikes.window} good steps); "
                  if self.spikes.enabled else ""), self.scheduler.num_iters, lag, self.state.skipped_total)
        stages = self.cfg.data.stages
        if lag > 0 and 0 < stage <= len(stages) and stages[stage - 1].start_iter == "decay":
            log.warning("data.stages[%d] starts at \"decay\" (iteration %d), counted in iterations attempted; the lr "
                        "schedule counts applied steps only, so its decay begins %d iteration(s) later (at iteration "
                        "%d if no more steps are skipped)", stage - 1, self.iteration, lag, self.iteration + lag)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, reason: str = "save_iters") -> Path:
        """Collective: the callbacks' ``before_save``, then the checkpointer writes the step."""
        for cb in self.callbacks:
            cb.before_save(self)
        path = self.checkpointer.save(self.iteration, reason)
        # weights after an applied spike are suspect; skipped spikes never changed them
        if not self.spikes.consecutive or self.cfg.stability.skip_spikes:
            self.good_checkpoint = str(path)
        return path

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------ step
    def _take(self) -> list[dict]:
        """The next step's ``grad_accum`` micro-batches, or ``[]`` when this rank's data ended."""
        out = []
        for _ in range(self.cfg.run.grad_accum):
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
        for m in micros:
            d = micro_to_device(m, e.device)
            per_token, z = self._per_token_loss(d, m)
            for cb in self.callbacks:
                per_token = cb.micro_batch(self, m, per_token)
            e.backward((per_token.sum() if z is None else per_token.sum() + z.sum()) / total_targets)
            sums.add(per_token, d["targets"], d["task_ids"], z)
            del per_token, z
        return sums

    def _per_token_loss(self, d: dict, m: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's per-token cross-entropy ``[B*S]`` and, with ``optim.z_loss``, its per-token z-loss terms
        (else None): the head and loss in chunks inside the model's forward (``engine.loss_chunk``), or the full
        logits through the engine's loss (``loss_chunk`` 0)."""
        kw = dict(position_ids=d["position_ids"], cu_seqlens=m["cu_seqlens"], max_seqlen=m["max_seqlen"])
        chunk, coef = self.cfg.engine.loss_chunk, self.cfg.optim.z_loss
        if chunk:
            if coef:
                return self.model(d["inputs"], targets=d["targets"], loss_chunk=chunk, z_loss=coef, **kw)
            return self.model(d["inputs"], targets=d["targets"], loss_chunk=chunk, **kw), None
        logits = self.model(d["inputs"], **kw)
        return (self.engine.loss(logits, d["targets"]),
                self.engine.z_loss(logits, d["targets"], coef) if coef else None)

    def update(self, agreed: Agreement, spike: bool = False) -> bool:
        """Apply the step, or skip it everywhere (non-finite loss or gradient norm on any rank; a loss spike with
        ``stability.skip_spikes``). True when taken.

        Under dynamic loss scaling (fp16) non-finite gradients with finite losses are an overflow: the engine
        skips the update itself and lowers the scale; that is no failure and not counted towards
        ``run.max_skipped_steps``. A skipped spike is counted in ``skipped_total``, not towards
        ``run.max_skipped_steps`` (``stability.max_consecutive_spikes`` counts spikes)."""
        e = self.engine
        overflow = not math.isfinite(agreed.grad_norm)
        bad = agreed.nonfinite_loss or overflow
        taken = not (bad or (spike and self.cfg.stability.skip_spikes))
        if taken:
            e.optimizer_step()
            self.scheduler.step()
            self.skipped_consecutive = 0
        else:
            self.state.skipped_total += 1
            if not bad:  # a skipped spike: finite, so it ends a run of non-finite steps
                self.skipped_consecutive = 0
            elif overflow and not agreed.nonfinite_loss and e.scales_loss:
                e.optimizer_step()
            else:
                self.skipped_consecutive += 1
        e.zero_grad()
        return taken

    def _log_spike(self, check: SpikeCheck, loss: float, agreed: Agreement) -> None:
        """Rank 0's warning: the step, its loss and z-score, the window's statistics and the step's tasks (target
        tokens and loss of each, from the agreement)."""
        if not self.engine.is_main:
            return
        tasks = ", ".join(f"{name} ({count} targets, loss {lsum / count:.4f})" for name, lsum, count in
                          zip(self.loader.task_names, agreed.task_loss_sum, agreed.task_targets) if count > 0)
        log.warning("loss spike at iteration %d: loss %.4f, z-score %.2f (mean %.4f, std %.4f of the last %d good "
                    "steps); %s; tasks in the batch: %s", self.iteration + 1, loss, check.z, check.mean, check.std,
                    len(self.spikes.losses), "update skipped" if self.cfg.stability.skip_spikes else "update applied",
                    tasks or "-")

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the micro-batches taken during the previous step; returns its logged stats."""
        e, run = self.engine, self.cfg.run
        t0 = time.perf_counter()
        stage = bisect.bisect_right(self.stage_starts, self.iteration) - 1  # of this step's batches
        self._enter_stage(stage)
        lr = self.scheduler.current_lr()
        total_targets = max(1, self._agreed.next_targets)
        micros = self._micros
        sums = self.forward_backward(micros, total_targets)
        grad_norm = e.clip_grad_norm(self.cfg.optim.clip_grad)
        last = self.iteration + 1 >= run.train_iters
        if not self._given_batches:
            self.loader_state = self.loader.state_dict()  # the data position after this step's batches
        self._micros = [] if last else self._take()
        next_targets, _ = host_counts(self._micros)
        agreed = agree(e, sums, grad_norm, stop=bool(self._stop_signal), tokens=host_counts(micros)[1],
                       next_targets=next_targets, next_missing=not self._micros and not last, host=self.to_host)
        self._agreed = agreed
        loss = agreed.loss_sum / total_targets if not agreed.nonfinite_loss else float("nan")
        check = self.spikes.check(loss)  # from the agreed loss: the same decision on every rank
        if check.spike:
            self._log_spike(check, loss, agreed)
        for cb in self.callbacks:
            cb.pre_update(self)
        taken = self.update(agreed, spike=check.spike)
        self.spikes.observe(loss, check.spike)
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
            "iter": self.iteration, "train_iters": run.train_iters,
            "loss": loss, "lr": lr, "grad_norm": agreed.grad_norm, "loss_scale": e.loss_scale, "skipped": not taken,
            "skip_reason": None if taken else ("spike" if check.spike and not agreed.nonfinite_loss
                                               and math.isfinite(agreed.grad_norm) else "non-finite"),
            "z_loss": agreed.z_loss_sum / total_targets if self.cfg.optim.z_loss and not agreed.nonfinite_loss
            else None,
            "loss_z": check.z, "spike": check.spike, "spikes": self.spikes.total,
            "skipped_steps": self.state.skipped_total, "tokens": agreed.tokens, "target_tokens": total_targets,
            "tokens_total": self.state.consumed_tokens, "tokens_per_sec": tps, "step_time": dt,
            "mfu": (tps * self.flops_per_token / (self.peak_flops * e.world_size)) if self.peak_flops else None,
            "memory": e.memory_stats(), "task_loss": task_loss, "world_size": e.world_size,
            **({"stage": stage, "task_targets": dict(zip(self.loader.task_names, map(int, agreed.task_targets)))}
               if len(self.stage_starts) > 1 else {}),
        }

    def start(self, batches: Iterable[dict] | None = None) -> None:
        """Begin taking micro-batches from ``batches`` (default: the loader) and agree on the first step's (one
        collective, before the first step). Tests and benchmarks pass their own batches."""
        self._given_batches = batches is not None
        self._batches = iter(batches if batches is not None else self.loader)
        if self.loader_state is None and not self._given_batches:
            self.loader_state = self.loader.state_dict()
        self._agree_first(self._take())

    def run_step(self, micros: list[dict]) -> dict[str, Any]:
        """One step on exactly these micro-batches, outside the loop (tests, benchmarks). Collective."""
        self._given_batches, self._batches = True, iter(())
        self._agree_first(micros)
        return self.train_step()

    def _agree_first(self, micros: list[dict]) -> None:
        e = self.engine
        self._micros = micros
        zeros = StepSums.zeros(len(self.loader.task_names), e.device)
        self._agreed = agree(e, zeros, torch.zeros((), device=e.device), stop=False, tokens=0,
                             next_targets=host_counts(micros)[0], next_missing=not micros, host=self.to_host)

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        run = self.cfg.run
        self.install_signal_handlers()
        self.start()
        code = EXIT_OK
        data_ended = False
        while self.iteration < run.train_iters:
            if self._agreed.next_missing:
                reason = getattr(self.loader, "stop_reason", None) or "a rank's loader ended"
                log.info("data exhausted at iteration %d: %s; ending training", self.iteration, reason)
                data_ended = True
                break
            stats = self.train_step()
            self.stopping = self._agreed.stop
            for cb in self.callbacks:
                cb.step_end(self, stats)
            if self.skipped_consecutive and self.skipped_consecutive >= max(1, run.max_skipped_steps):
                log.error("%d consecutive non-finite steps (max_skipped_steps=%d): stopping; the last good "
                          "weights are saved at iteration %d", self.skipped_consecutive, run.max_skipped_steps,
                          self.iteration)
                self.save_checkpoint("non-finite")
                code = EXIT_NONFINITE
                break
            max_spikes = self.cfg.stability.max_consecutive_spikes
            if max_spikes and self.spikes.consecutive >= max_spikes:
                code = EXIT_SPIKES
                if self.cfg.stability.skip_spikes:  # the spikes never changed the weights: they are the good ones
                    self.save_checkpoint("loss spikes")
                log.error("%s", self._spike_stop_message())
                break
            if self.stopping:
                log.info("stop signal received: saving at iteration %d and exiting", self.iteration)
                self.save_checkpoint("signal")
                break
            if self.checkpointer.due(self.iteration):
                self.save_checkpoint()
        self._finish_training(code, data_ended)
        if code == EXIT_NONFINITE:
            raise NonFiniteError(f"{self.skipped_consecutive} consecutive non-finite steps; checkpoint of the last "
                                 f"good weights at {run.dir() / str(self.iteration)}")
        if code == EXIT_SPIKES:
            raise LossSpikeError(self._spike_stop_message())
        return code

    def _spike_stop_message(self) -> str:
        st = self.cfg.stability
        where = (f"the last good checkpoint is {self.good_checkpoint}" if self.good_checkpoint else
                 "no good checkpoint was saved before the spikes")
        how = ("the spikes were skipped, so the weights saved now are the last good ones" if st.skip_spikes else
               "the spikes' updates were applied (stability.skip_spikes false), so nothing was saved now")
        return (f"{self.spikes.consecutive} consecutive loss spikes at iteration {self.iteration} "
                f"(stability.max_consecutive_spikes={st.max_consecutive_spikes}, spike_zscore={st.spike_zscore}): "
                f"stopping; {how}; {where}")

    def _finish_training(self, code: int, data_ended: bool) -> None:
        e = self.engine
        if code == EXIT_OK and self.checkpointer.last_saved != self.iteration and (
                self.cfg.checkpoint.every or data_ended):
            self.save_checkpoint("end of data" if data_ended else "end")
        end = TrainEnd(ok=code == EXIT_OK, data_ended=data_ended, stopped=self.stopping)
        for cb in self.callbacks:
            cb.train_end(self, end)
        self.checkpointer.wait()
        e.barrier()
        for cb in self.callbacks:
            cb.close(self)
        # Rank 0 has just rendered the loss curve: let the ranks tear down their gloo groups together (a rank
        # that exits while a peer is still busy was seen to abort the peer's gloo threads).
        e.barrier()

    # ------------------------------------------------------------------ data only
    def run_dataloader_only(self) -> dict[str, float]:
        """``run.only_run_dataloader``: iterate the loader for ``train_iters × grad_accum`` batches, report speed."""
        e, run = self.engine, self.cfg.run
        loader = self.loader if self.loader is not None else self.build_loader()
        n = 0
        tokens = 0
        t0 = time.perf_counter()
        for b in loader:
            n += 1
            tokens += int(b["num_tokens"])
            if n >= run.train_iters * run.grad_accum:
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


def run(cfg: TrainConfig, engine=None, callbacks: list[Callback] | None = None) -> int:
    """Build everything from ``cfg`` and train; returns the process exit code (0, or 3 after the non-finite limit —
    that case also raises ``NonFiniteError`` to the caller's log). ``callbacks`` run after the built-in ones."""
    tr = Trainer(cfg, engine, callbacks)
    # Before the setup, which takes minutes for a large model: slurm's early warning (SIGUSR1) or a SIGTERM
    # arriving then would otherwise kill the process (default action) instead of stopping at the first step.
    tr.install_signal_handlers()
    watch_launcher()  # under torchrun: stop at once if torchrun dies (it starts workers in their own sessions)
    try:
        tr.setup()
        if cfg.run.only_run_dataloader:
            tr.run_dataloader_only()
            return EXIT_OK
        return tr.train()
    finally:
        if tr.checkpointer is not None:
            tr.checkpointer.release()
        if tr.engine is not None:
            tr.engine.shutdown()
