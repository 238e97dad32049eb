"""What a training run saves, and how it resumes: the one owner of both (torchtitan's ``CheckpointManager``).

The trainer registers its resumable parts once, by name::

    ckpt = Checkpointer(cfg.checkpoint, run_dir, engine, states={"trainer": trainer, "scheduler": scheduler,
                                                                  "loader": loader_position},
                        meta=CheckpointMeta(...), lora_config=None)
    ckpt.claim()                  # lock the run directory, remove unfinished saves          (collective)
    ckpt.load(init_from="")       # resume per cfg.checkpoint.resume, or initial weights      (collective)
    ckpt.save(step, "save_iters")                                                             (collective)

The model and optimizer are the engine's (sharded; saved and loaded collectively), the RNG is per rank, and a
LoRA run saves its adapter (PEFT format) in place of the model. The resume spec (:class:`ResumeSpec`):
``source`` "" (fresh), ``latest`` (the newest complete checkpoint that verifies; fresh if none yet), a step, a
directory, or a bare ``.pt`` (weights only); ``weights_only``, ``load_data``, ``rewarm_iters``, ``strict``.
With ``checkpoint.merge_last_n`` N, rank 0 writes ``<run dir>/merged_last_<N>.pt``, the average of the newest N
checkpoints up to the step just saved, after each save that commits, in a background thread that the next save
(or :meth:`Checkpointer.wait`, at the end of training) joins (:meth:`Checkpointer._merge_last`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fm.checkpoint import commit, layout
from fm.checkpoint.layout import CheckpointError

if TYPE_CHECKING:
    from fm.distributed.base import Engine
    from fm.tokenizer import TokenizerFiles
    from fm.train.config import CheckpointConfig, ResumeSpec

log = logging.getLogger("fm.train")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class CheckpointMeta:
    """What every checkpoint carries besides the states: the resolved train config (fm's form), the model config
    and the tokenizer, so that a step directory is self-describing wherever it is copied. ``tokenizer_path``: the
    tokenizer's files as the run read them at its start (:class:`fm.tokenizer.TokenizerFiles`: every save writes
    those bytes; the source may be a step directory that keep_last_n deletes), or a path read at each save."""

    train_config: dict[str, Any]
    model_config: dict[str, Any]
    tokenizer_path: str | Path | TokenizerFiles


class Checkpointer:
    """Saves and resumes one run's checkpoints under ``run_dir`` (see the module docstring). ``states`` must hold
    ``trainer`` (its ``.log_ckpt`` counters), ``scheduler`` and ``loader`` (this rank's data position; the saved
    state is every rank's, merged)."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, engine: Engine, *, states: dict[str, Stateful],
                 meta: CheckpointMeta, lora_config: Any = None):
        missing = {"trainer", "scheduler", "loader"} - states.keys()
        if missing:
            raise ValueError(f"Checkpointer: states lacks {sorted(missing)}")
        self.cfg, self.run_dir, self.engine, self.states = cfg, Path(run_dir), engine, states
        self.meta, self.lora_config = meta, lora_config
        self.last_saved = -1  # the step of the last save or of the checkpoint resumed from
        self.lock = None  # rank 0's lock on the run directory
        self._writer = commit.CheckpointManager(self.run_dir, keep_last_n=cfg.keep_last_n or None,
                                                async_save=cfg.async_save, comm=engine,
                                                after_commit=self._merge_last if cfg.merge_last_n else None)

    # ------------------------------------------------------------------ the run directory
    def claim(self) -> None:
        """Rank 0 locks the run directory (one writer: a live holder makes every rank fail at once, naming it) and
        removes the temp dirs of saves that never committed. Collective."""
        from fm.train.guard import RunLock, RunLockError

        e = self.engine
        problem = None
        if e.is_main:
            try:
                self.lock = RunLock(self.run_dir)
                self.lock.acquire()
                gone = commit.remove_stale_tmp(self.run_dir)
                if gone:
                    log.info("removed %d unfinished checkpoint save(s) under %s: %s", len(gone), self.run_dir,
                             ", ".join(gone))
            except RunLockError as exc:
                self.lock = None
                problem = str(exc)
        problem = e.broadcast_object(problem) if e.world_size > 1 else problem
        if problem:
            raise RunLockError(problem)

    def release(self) -> None:
        self._writer.join_after_commit()  # a merge still running (a run that failed before its wait) ends first
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ resume
    def resolve(self, spec: ResumeSpec) -> Path | None:
        """The checkpoint ``spec.source`` means (None: start fresh), unverified."""
        source = spec.source.strip()
        if not source:
            return None
        p = Path(source)
        if p.is_file():
            return p
        return layout.resolve_checkpoint(self.run_dir, source)

    def verified(self, ckpt: Path) -> list[str]:
        """Problems of checkpoint ``ckpt`` against its manifest, every rank checking a share. Collective."""
        e = self.engine
        mine = commit.verify_checkpoint(ckpt, e.rank, e.world_size)
        return [p for part in e.all_gather_object(mine) for p in part] if e.world_size > 1 else mine

    def resume_point(self, spec: ResumeSpec) -> Path | None:
        """The checkpoint to resume from, verified. For ``latest`` a damaged one is passed over (saying so) for the
        newest one that verifies; a checkpoint named explicitly must verify. Collective."""
        ckpt = self.resolve(spec)
        if ckpt is None or not ckpt.is_dir() or not layout.is_complete(ckpt):
            return ckpt  # nothing, a bare .pt, or an upstream directory (no manifest to check)
        problems = self.verified(ckpt)
        if not problems:
            return ckpt
        first = f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if spec.source.strip().lower() != "latest":
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {first}; resume from another step")
        for step in reversed(layout.list_checkpoints(self.run_dir)):
            cand = self.run_dir / str(step)
            if cand == ckpt:
                continue
            more = self.verified(cand)
            if not more:
                log.warning("checkpoint %s is damaged (%s): resuming from %s, the newest checkpoint that verifies",
                            ckpt, first, cand)
                return cand
            log.warning("checkpoint %s is damaged too (%s)", cand, more[0])
        raise CheckpointError(f"no checkpoint under {self.run_dir} verifies (the newest, {ckpt}: {first}); remove "
                              "the damaged ones to start afresh")

    def load(self, init_from: str = "") -> Path | None:
        """Resume as ``cfg.resume`` says; when not resuming (always, under LoRA) first load the initial weights
        ``init_from``. Returns the checkpoint resumed from, or None. Collective."""
        spec, e = self.cfg.resume, self.engine
        ckpt = self.resume_point(spec)
        if init_from and (ckpt is None or self.lora_config is not None):  # fine-tuning: the base weights
            from fm.train import lora as lora_lib

            lora_lib.load_base_weights(e, init_from)
        if ckpt is None:
            if spec.source and e.is_main:
                log.info("checkpoint.resume.source=%r: no complete checkpoint under %s yet, starting fresh",
                         spec.source, self.run_dir)
            return None
        self._load_weights(ckpt, spec)
        if ckpt.is_file():
            return ckpt  # a bare model file: weights only
        if spec.weights_only:
            log.info("checkpoint.resume.weights_only: weights loaded; step, optimizer, schedule and data start fresh")
            return ckpt
        self._load_states(ckpt, spec)
        counters = self.states["trainer"].state_dict()
        self.last_saved = int(counters["iteration"])
        log.info("resumed at iteration %d (%d optimizer steps taken, %d skipped)", counters["iteration"],
                 self.states["scheduler"].num_iters, counters.get("skipped_total", 0))
        return ckpt

    def _load_weights(self, ckpt: Path, spec: ResumeSpec) -> None:
        e = self.engine
        if self.lora_config is not None and ckpt.is_dir():  # a LoRA checkpoint holds the adapter only (PEFT format)
            from fm.train import lora as lora_lib

            log.info("resuming LoRA adapter from %s", ckpt)
            lora_lib.load_adapter_into(e, ckpt)
            return
        mf = ckpt if ckpt.is_file() else layout.model_file(ckpt)
        log.info("resuming from %s (model %s)", ckpt, mf.name)
        e.load_model(mf, strict=spec.strict)

    def _load_states(self, ckpt: Path, spec: ResumeSpec) -> None:
        e, states = self.engine, self.states
        data_file = ckpt / layout.DATASET_FILE
        if spec.load_data and data_file.is_file():
            # Errors propagate: never train on a silently reset data order.
            states["loader"].load_state_dict(json.loads(data_file.read_text()))
        elif e.is_main:
            log.warning("data loader state not restored (checkpoint.resume.load_data=%s, %s exists: %s): data starts "
                        "from the beginning", spec.load_data, data_file, data_file.is_file())
        states["trainer"].load_state_dict(layout.read_log_ckpt(ckpt))
        scheduler = states["scheduler"]
        scheduler.load_state_dict(layout.read_scheduler_state(ckpt))
        if spec.rewarm_iters > 0:
            log.info("checkpoint.resume.rewarm_iters=%d: optimizer state not loaded; lr re-warms over %d steps",
                     spec.rewarm_iters, spec.rewarm_iters)
            scheduler.start_rewarm()
        else:
            e.load_optimizer(ckpt / layout.OPTIMIZER_DIR)
            scheduler.apply()  # loading the optimizer restores old group lrs: set the schedule's
        rng = ckpt / layout.RNG_FILE.format(rank=e.rank)
        if rng.is_file():
            commit.set_rng_state(commit.read_rng_state(rng))

    # ------------------------------------------------------------------ save
    def save(self, step: int, reason: str = "save_iters") -> Path:
        """Write checkpoint ``step`` (into a temp dir, committed atomically: ``latest`` never names a half-written
        directory). Collective."""
        e, states = self.engine, self.states
        self._writer.wait()  # a previous async save must be committed before the next one starts
        loader_states = e.all_gather_object(states["loader"].state_dict())
        merged = None
        if e.is_main and all(s is not None for s in loader_states):
            from fm.data.loader import merge_states

            merged = merge_states(loader_states)
        scheduler = states["scheduler"]
        log_ckpt = {**states["trainer"].state_dict(), "optimizer_steps": scheduler.num_iters,
                    "world_size": e.world_size, "reason": reason, "time": time.time()}
        kw = dict(log_ckpt=log_ckpt, dataset_state=merged, config=self.meta.train_config,
                  model_config=self.meta.model_config, tokenizer_path=self.meta.tokenizer_path,
                  scheduler_state=scheduler.state_dict())
        if self.lora_config is not None:  # adapter files instead of the full model
            from fm.train import lora as lora_lib

            parts = lora_lib.adapter_parts(e, step, lora_config=self.lora_config, **kw)
        else:
            parts = commit.standard_parts(e, step, **kw)
        final = self._writer.save(step, parts)
        self.last_saved = step
        if e.is_main:
            log.info("checkpoint %s: %s (%s)", "started" if self.cfg.async_save else "saved", final, reason)
        return final

    def _merge_last(self, step: int) -> None:
        """``checkpoint.merge_last_n``: rank 0, after checkpoint ``step`` is committed (in a thread of its own, sync or
        async save alike: the other ranks go on training; the next save or :meth:`wait` joins it), averages the
        newest N complete checkpoints at steps <= ``step`` (steps above it are of an abandoned branch, saved before a
        resume from an earlier step) from their saved files into ``<run dir>/merged_last_<N>.pt``
        (:func:`fm.checkpoint.merge.merge_run_last`: one checkpoint in memory at a time, an fp32 accumulator, every
        file written atomically)."""
        from fm.checkpoint.merge import merge_run_last

        n = self.cfg.merge_last_n
        t0 = time.perf_counter()
        done = merge_run_last(self.run_dir, n, up_to=step)
        if done is not None:
            out, steps = done
            newer = [s for s in layout.list_checkpoints(self.run_dir) if s > step]
            log.info("checkpoint.merge_last_n: %s holds the average of the checkpoints at steps %s (%.1f s)%s", out,
                     ", ".join(map(str, steps)), time.perf_counter() - t0,
                     f"; left out: the newer step(s) {newer} of another branch of this run directory" if newer else "")

    def due(self, step: int) -> bool:
        """A periodic save is due at ``step`` (``checkpoint.every``)."""
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def wait(self) -> None:
        """Join an async save; every rank raises if any rank's save failed."""
        self._writer.wait()
