"""Side concerns of the training loop, as callbacks (OLMo-core's hooks): the loop in :mod:`fm.train.trainer` stays
about the step, and everything that watches it is one of these.

A callback overrides what it needs; the trainer calls every callback at each point, in list order::

    setup(trainer)                      the run is built and resumed (collective where a callback needs it)
    micro_batch(trainer, micro, loss)   a micro-batch's per-token losses, before backward; returns the losses to use
    pre_update(trainer)                 gradients reduced and clipped, the update next (collective: same on every rank)
    step_end(trainer, stats)            the step is taken (or skipped) and counted
    before_save(trainer)                a checkpoint is about to be written
    train_end(trainer, end)             training ended (``end``: why), before the engine shuts down (collective)
    close(trainer)                      release files (after every callback's train_end)

The built-in ones: :class:`MetricsLogger` (console, tensorboard, jsonl), :class:`Validation` (the validation loss
every ``eval.interval`` steps), :class:`DownstreamEval` (C-Eval/CMMLU/MMLU accuracy every ``eval.downstream_interval``
steps), :class:`InspectTable` (parameter statistics every ``run.inspect_iters``),
:class:`LossCurve` (``loss_curve.png`` at the end). Pass your own to :func:`fm.train.trainer.run`
(``callbacks=[...]``): the test suite injects its faults this way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Trainer = Any  # fm.train.trainer.Trainer (not imported: the trainer imports this module)

log = logging.getLogger("fm.train")


@dataclass
class TrainEnd:
    """Why training ended: ``ok`` (finished, or stopped by a signal), ``data_ended``, ``stopped`` (a signal)."""

    ok: bool
    data_ended: bool = False
    stopped: bool = False


class Callback:
    """Every hook is a no-op; subclasses override what they need."""

    def setup(self, trainer: Trainer) -> None:
        pass

    def micro_batch(self, trainer: Trainer, micro: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        return loss

    def pre_update(self, trainer: Trainer) -> None:
        pass

    def step_end(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        pass

    def before_save(self, trainer: Trainer) -> None:
        pass

    def train_end(self, trainer: Trainer, end: TrainEnd) -> None:
        pass

    def close(self, trainer: Trainer) -> None:
        pass


class MetricsLogger(Callback):
    """The console line, tensorboard and ``train_stats.jsonl`` (rank 0). Set up after the resume: steps logged by a
    run that crashed after its last checkpoint are purged from tensorboard (they are logged again)."""

    def setup(self, trainer: Trainer) -> None:
        from fm.train.metrics import MetricsWriter

        cfg, e = trainer.cfg.run, trainer.engine
        rd = cfg.dir()
        if e.is_main:
            rd.mkdir(parents=True, exist_ok=True)
        tb = Path(cfg.tensorboard_dir) / f"{cfg.exp_group}{cfg.name}" if cfg.tensorboard_dir else None
        trainer.metrics = MetricsWriter(enabled=e.is_main, tensorboard_dir=tb, jsonl_path=trainer.stats_path,
                                        all_tasks=cfg.tensorboard_all_tasks, log_iters=cfg.log_iters,
                                        purge_step=trainer.iteration + 1 if trainer.iteration else None)
        if e.is_main and not trainer.iteration:
            trainer.metrics.log_text("config", "```\n" + trainer.cfg.dumps() + "\n```", 0)

    def step_end(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        trainer.metrics.log_step(stats)

    def before_save(self, trainer: Trainer) -> None:
        # what was logged up to the checkpoint is on disk: a crash loses only later steps, which the resumed run logs
        trainer.metrics.flush()

    def close(self, trainer: Trainer) -> None:
        trainer.metrics.close()


class PeriodicEval(Callback):
    """An evaluation every ``interval`` steps and once more at the end of training (not after a stop signal or the
    non-finite limit). Subclasses prepare it in ``setup`` (``ready`` then true) and give ``interval`` and ``run``,
    which records the iteration in ``last``. Collective."""

    last = -1  # the iteration of the last evaluation

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def interval(self, trainer: Trainer) -> int:
        raise NotImplementedError

    def run(self, trainer: Trainer) -> dict[str, Any]:
        raise NotImplementedError

    def step_end(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        every, it = self.interval(trainer), trainer.iteration
        if self.ready and not trainer.stopping and (it % every == 0 or it == trainer.cfg.run.train_iters):
            self.run(trainer)  # (a stop signal wants the checkpoint now)

    def train_end(self, trainer: Trainer, end: TrainEnd) -> None:
        if end.ok and not end.stopped and self.ready and self.last != trainer.iteration:
            self.run(trainer)  # end of training (data ran out, or resumed at train_iters): the final weights


class Validation(PeriodicEval):
    """The validation loss over a fixed set of batches of ``eval.mixture`` (built once, at setup), every
    ``eval.interval`` steps and once more at the end of training (not after a stop signal or the non-finite
    limit). Token-weighted over every rank; logged to the console, tensorboard and jsonl. Collective."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.tasks: list[str] = []

    @property
    def ready(self) -> bool:
        return bool(self.batches)

    def interval(self, trainer: Trainer) -> int:
        return trainer.cfg.eval.interval

    def setup(self, trainer: Trainer) -> None:
        """The first ``eval.iters`` batches per rank of ``eval.mixture`` (seed ``run.seed``), kept in memory, with
        the trainer's tokenizer (so ``data.eos_token`` applies here too)."""
        from fm.eval.validation import fixed_batches

        cfg, e = trainer.cfg, trainer.engine
        if not (cfg.eval.interval and cfg.eval.mixture):
            return
        batches = fixed_batches(cfg.eval.mixture, trainer.tokenizer, batch_size=cfg.data.batch_size,
                                max_length=cfg.data.max_length, n_batches=cfg.eval.iters, rank=e.rank,
                                world_size=e.world_size, seed=cfg.run.seed)
        # Every forward of a sharded model is a collective: all ranks must run the same number of batches.
        n = int(e.all_reduce(float(len(batches)), "min"))
        if n == 0:
            log.warning("eval.mixture %s gives no batch on some rank: validation is off", cfg.eval.mixture)
            return
        self.batches = batches[:n]
        self.tasks = list(batches[0]["task_names"])
        if e.is_main:
            log.info("validation set: %d batches per rank of %s (tasks %s), every %d steps",
                     n, cfg.eval.mixture, ", ".join(self.tasks), cfg.eval.interval)

    def run(self, trainer: Trainer) -> dict[str, Any]:
        """Evaluate now (no grad, eval mode; the train mode is restored) and log it. Collective."""
        from fm.eval.validation import evaluate_loss, from_sums_tensor, sums_tensor

        e = trainer.engine
        t0 = time.perf_counter()
        local = evaluate_loss(trainer.model, self.batches, device=e.device)
        res = from_sums_tensor(e.all_reduce(sums_tensor(local, self.tasks, device=e.device), "sum"), self.tasks)
        res["time"] = time.perf_counter() - t0
        self.last = trainer.iteration
        trainer.metrics.log_validation(trainer.iteration, res)
        return res

class DownstreamEval(PeriodicEval):
    """Multiple-choice accuracy on a fixed subset of C-Eval/CMMLU/MMLU (``eval.ceval_dir``/``cmmlu_dir``/
    ``mmlu_dir``, the first ``eval.downstream_limit`` questions of each subject) every ``eval.downstream_interval``
    steps and once more at the end of training (as :class:`Validation`), scored as ``fm eval`` scores it
    (:mod:`fm.eval.downstream`); ``Eval/<task>/accuracy`` in tensorboard. Collective: each rank scores a share."""

    def __init__(self) -> None:
        self.prepared: list = []

    @property
    def ready(self) -> bool:
        return bool(self.prepared)

    def interval(self, trainer: Trainer) -> int:
        return trainer.cfg.eval.downstream_interval

    def setup(self, trainer: Trainer) -> None:
        """Read the files and build the prompts once, with the trainer's tokenizer, at ``fm eval``'s max length for
        a checkpoint of this run (the model config's ``max_length``, at least ``data.max_length``)."""
        from fm.eval import downstream
        from fm.models.config import config_to_dict

        cfg, e = trainer.cfg, trainer.engine
        ev = cfg.eval
        if not ev.downstream_interval:
            return
        loaded = downstream.load(ceval_dir=ev.ceval_dir, cmmlu_dir=ev.cmmlu_dir, mmlu_dir=ev.mmlu_dir,
                                 limit=ev.downstream_limit, shots=ev.downstream_shots, subjects=ev.downstream_subjects)
        # what fm eval reads from a checkpoint of this run: the declared max_length, at least the rows trained on
        declared = config_to_dict(trainer.model_config).get("max_length")
        max_length = max(int(declared), cfg.data.max_length) if declared is not None else 4096
        self.prepared = downstream.prepare(trainer.tokenizer, loaded, max_length)
        empty = [t.name for t in self.prepared if not t.prompts]
        if empty and e.is_main:
            log.warning("downstream evaluation: %s: no questions (every selected subject file is empty); skipped",
                        ", ".join(empty))
        self.prepared = [t for t in self.prepared if t.prompts]
        if e.is_main:
            log.info("downstream evaluation: %s, every %d steps", ", ".join(
                f"{t.name} ({len(t.prompts)} questions, {len(t.subjects)} subjects)" for t in self.prepared),
                ev.downstream_interval)

    def run(self, trainer: Trainer) -> dict[str, Any]:
        """Score now and log it. Collective."""
        from fm.eval import downstream

        e = trainer.engine
        t0 = time.perf_counter()
        res: dict[str, Any] = downstream.score(
            trainer.model, self.prepared, rank=e.rank, world_size=e.world_size, all_reduce=e.all_reduce,
            device=e.device, batch_size=trainer.cfg.eval.downstream_batch_size, pad_id=trainer.tokenizer.pad_id)
        res["time"] = time.perf_counter() - t0
        self.last = trainer.iteration
        trainer.metrics.log_downstream(trainer.iteration, res)
        return res


class InspectTable(Callback):
    """Parameter and gradient statistics every ``run.inspect_iters`` steps, reduced over the ranks (a sharded
    parameter's statistics are its whole tensor's), printed by rank 0. Collective."""

    def pre_update(self, trainer: Trainer) -> None:
        from fm.train.metrics import format_inspect_table, inspect_stats

        every, e = trainer.cfg.run.inspect_iters, trainer.engine
        if every and (trainer.iteration + 1) % every == 0:
            rows = inspect_stats(trainer.model, e.all_reduce, e.param_shapes)
            if e.is_main:
                log.info("parameter statistics at iteration %d:\n%s", trainer.iteration + 1,
                         format_inspect_table(rows))


class LossCurve(Callback):
    """``<run dir>/loss_curve.png`` from the step log, rendered by rank 0 once the log is closed."""

    def close(self, trainer: Trainer) -> None:
        from fm.train.metrics import plot_loss_curve

        if trainer.engine.is_main and trainer.stats_path.is_file():
            try:
                plot_loss_curve(trainer.stats_path, trainer.cfg.run.dir() / "loss_curve.png",
                                title=trainer.cfg.run.name)
            except Exception as exc:  # a plot must never fail a finished training run
                log.warning("loss curve not rendered: %s", exc)


def default_callbacks() -> list[Callback]:
    """What every run has, in the order the loop calls them (the step line before the validation line)."""
    return [MetricsLogger(), Validation(), DownstreamEval(), InspectTable(), LossCurve()]
