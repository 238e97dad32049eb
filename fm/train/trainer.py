"""The pretraining loop: engine + model + mixture loader + schedule, with exact resume.

One optimizer step ("iteration") = ``grad_accum`` micro-batches of ``batch_size`` packed rows per rank.
The loss is normalised by the GLOBAL number of target tokens of the step (over micro-batches and
ranks, all-reduced before the forward), so the update equals one big batch's mean token loss
whatever the split; the engines sum gradients over ranks.

Per step every rank agrees, through one all-reduce, on: the loss, whether any rank saw a non-finite
loss (or the grad norm is non-finite), whether any rank got a stop signal (SIGTERM/SIGUSR1), and the
per-task losses. A non-finite step is skipped everywhere (gradients dropped, schedule not advanced);
``max_skipped_steps`` consecutive ones stop training with an error after saving the last good state.

Validation (``eval_interval`` > 0): the fixed batches of ``eval_dataset_config`` (built once, see
``fm.eval.validation``) are evaluated every ``eval_interval`` steps and once more at the end of training
(``train_iters`` reached, or the data ran out), not after a stop signal or the non-finite limit.

Test hook (read only here): ``FM_TEST_NAN_STEPS="rank:iter,rank:iter"`` turns the loss of the given
rank at the given (1-based) iteration into NaN before the backward. ``FM_TEST_DIE_AFTER=iter`` kills
the process with SIGKILL right after that iteration (to test resume after a crash).
``FM_TEST_RECORD_INDEXES=DIR`` appends each step's batch ``indexes`` to ``DIR/rank-<r>.jsonl``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from fm.train import checkpoint as ckpt_lib
from fm.train.config import TrainConfig, log_no_ops
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

log = logging.getLogger("fm.train")

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def _nan_steps(rank: int) -> set[int]:
    spec = os.environ.get("FM_TEST_NAN_STEPS", "").strip()
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        r, _, it = item.partition(":")
        if int(r) == rank:
            out.add(int(it))
    return out


def _resolve_model_config(name: str) -> str:
    p = Path(name)
    if p.is_file():
        return str(p)
    for cand in (REPO_ROOT / "apps" / "fm9g_2b" / "model_configs" / f"{name}.json",
                 REPO_ROOT / "apps" / "fm9g_2b" / "model_configs" / name):
        if cand.is_file():
            return str(cand)
    return name  # let the registry resolve a known name


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, engine=None):
        self.cfg = cfg
        self.engine = engine
        self.iteration = 0  # optimizer steps attempted (taken + skipped)
        self.skipped_total = 0
        self.skipped_consecutive = 0
        self.tokens_total = 0  # non-padding tokens consumed, all ranks
        self.task_tokens: dict[str, int] = {}
        self._stop_signal = 0
        self.ckpt: ckpt_lib.CheckpointManager | None = None
        self._last_saved = -1
        self.loader_state: dict | None = None  # this rank's loader state after the last finished step
        self._record = None  # test hook FM_TEST_RECORD_INDEXES
        self.model = None
        self.loader = None
        self.metrics: MetricsWriter | None = None
        self.val_batches: list[dict] = []  # fixed validation batches of this rank (same count on every rank)
        self.val_tasks: list[str] = []
        self._last_eval = -1  # iteration of the last validation

    # ------------------------------------------------------------------ build
    def setup_engine(self) -> None:
        if self.engine is None:
            from fm.distributed import build_engine

            self.engine = build_engine(self.cfg.engine, seed=self.cfg.seed)
            self.engine.init()
        setup_logging(self.engine.rank)
        if self.engine.is_main:
            log.info("resolved train config:\n%s", self.cfg.dumps())
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
            prefetch_factor=self.cfg.dataloader_prefetch_factor, seed=self.cfg.seed)
        return self.loader

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
        self.model_config = load_model_config(_resolve_model_config(cfg.config))
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
        self.model = e.shard(meta, dtype=self.dtype, activation_checkpointing=cfg.use_checkpoint)
        groups = mup_param_groups(self.model, weight_decay=cfg.weight_decay, scale_width=scale_width,
                                  scaled_names=scaled, shapes=e.param_shapes)
        self.optimizer = e.build_optimizer(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.n_params = count_non_embedding_params(self.model, e.param_shapes)
        mc = self.model_config
        self.flops_per_token = flops_per_token(self.n_params, mc.num_layers, mc.dim_model, cfg.max_length)
        self.peak_flops = (cfg.peak_tflops or guess_peak_tflops(e.device)) * 1e12
        if e.is_main:
            log.info("model %s: %d non-embedding parameters, dtype %s, engine %s, world size %d",
                     cfg.config, self.n_params, self.dtype, e.name, e.world_size)

    def setup_outputs(self) -> None:
        cfg, e = self.cfg, self.engine
        rd = run_dir(cfg)
        if e.is_main:
            rd.mkdir(parents=True, exist_ok=True)
        tb = Path(cfg.tensorboard) / f"{cfg.exp_group}{cfg.model_unique}" if cfg.tensorboard else None
        self.stats_path = rd / "train_stats.jsonl"
        self.metrics = MetricsWriter(enabled=e.is_main, tensorboard_dir=tb, jsonl_path=self.stats_path,
                                     all_tasks=cfg.tensorboard_all_tasks, log_iters=cfg.log_iters)
        if e.is_main:
            self.metrics.log_text("config", "```\n" + cfg.dumps() + "\n```", 0)

    def setup(self) -> None:
        self.setup_engine()
        self.build_model()
        self.build_loader()
        self.build_validation()
        self.setup_outputs()
        self.resume()

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        cfg, e = self.cfg, self.engine
        ckpt = resolve_resume(cfg)
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
        st = ckpt_lib.read_log_ckpt(ckpt)
        self.iteration = int(st["iteration"])
        self.skipped_total = int(st.get("skipped_total", 0))
        self.tokens_total = int(st.get("consumed_tokens", 0))
        self.task_tokens = dict(st.get("task_tokens", {}))
        self.scheduler.load_state_dict(torch.load(ckpt / ckpt_lib.SCHEDULER_FILE, weights_only=False))
        if cfg.resume_no_optimze > 0:
            log.info("resume_no_optimze=%d: optimizer state not loaded; lr re-warms over %d steps",
                     cfg.resume_no_optimze, cfg.resume_no_optimze)
            self.scheduler.start_rewarm()
        else:
            e.load_optimizer(ckpt / ckpt_lib.OPTIMIZER_DIR)
            self.scheduler.apply()  # loading the optimizer restores old group lrs: set the schedule's
        rng = ckpt / ckpt_lib.RNG_FILE.format(rank=e.rank)
        if rng.is_file():
            ckpt_lib.set_rng_state(torch.load(rng, weights_only=False))
        self._last_saved = self.iteration
        log.info("resumed at iteration %d (%d optimizer steps taken, %d skipped)",
                 self.iteration, self.scheduler.num_iters, self.skipped_total)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, reason: str = "save_iters") -> Path:
        """Collective. ``fm.train.checkpoint.CheckpointManager`` writes into a temp dir and commits it
        atomically (``COMPLETE`` marker + rename), so ``latest`` never picks a half-written directory."""
        cfg, e = self.cfg, self.engine
        step = self.iteration
        if self.ckpt is None:
            self.ckpt = ckpt_lib.CheckpointManager(run_dir(cfg), keep_last_n=cfg.keep_last_n or None,
                                                   async_save=cfg.async_save, comm=e)
        self.ckpt.wait()  # a previous async save must be committed before the next one starts
        loader_states = e.all_gather_object(self.loader_state)
        merged = None
        if e.is_main and all(s is not None for s in loader_states):
            from fm.data.loader import merge_states

            merged = merge_states(loader_states)
        log_ckpt = {"iteration": step, "consumed_tokens": self.tokens_total, "task_tokens": self.task_tokens,
                    "skipped_total": self.skipped_total, "optimizer_steps": self.scheduler.num_iters,
                    "world_size": e.world_size, "reason": reason, "time": time.time()}
        tok = Path(cfg.tokenizer_path)
        make_parts = ckpt_lib.standard_parts
        if cfg.lora:  # adapter files instead of the full model
            from fm.train import lora as lora_lib

            make_parts = functools.partial(lora_lib.adapter_parts, lora_config=self.lora_config)
        parts = make_parts(e, step, log_ckpt=log_ckpt, dataset_state=merged, config=cfg.to_dict(),
                           tokenizer_path=tok if tok.is_file() else None,
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
    def _next_micro_batches(self, it) -> list[dict] | None:
        out = []
        for _ in range(self.cfg.grad_accum):
            try:
                out.append(next(it))
            except StopIteration:
                return None
        return out

    def _to_device(self, b: dict) -> dict:
        dev = self.engine.device
        return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

    def train_step(self, micros: list[dict] | None, nan_steps: set[int]) -> dict[str, Any] | None:
        """One optimizer step. Returns the step stats, or None when some rank ran out of data."""
        e, cfg = self.engine, self.cfg
        t0 = time.perf_counter()
        tasks = self.loader.task_names
        T = len(tasks)
        local_tokens = sum(int((m["targets"] != -100).sum()) for m in micros) if micros else 0
        head = e.all_reduce(torch.tensor([float(local_tokens), 0.0 if micros else 1.0]), "sum")
        if head[1].item() > 0:
            return None
        total_targets = max(1.0, head[0].item())
        loss_sum_local = torch.zeros((), dtype=torch.float64)
        task_sum = torch.zeros(T, dtype=torch.float64)
        task_cnt = torch.zeros(T, dtype=torch.float64)
        num_tokens = 0
        poison = (self.iteration + 1) in nan_steps
        for m in micros:
            m = self._to_device(m)
            logits = self.model(m["inputs"], position_ids=m["position_ids"], cu_seqlens=m["cu_seqlens"],
                                max_seqlen=m["max_seqlen"])
            per_tok = None
            if e.name == "fsdp":
                # Same math as FSDPEngine.loss (fp32 CE summed over targets != -100), kept per token so the
                # per-task losses cost no second cross-entropy pass.
                per_tok = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), m["targets"].reshape(-1), ignore_index=-100,
                    reduction="none")
                loss_sum = per_tok.sum()
            else:
                loss_sum, _ = e.loss(logits, m["targets"])
            if poison:
                loss_sum = loss_sum * float("nan")
            e.backward(loss_sum / total_targets)
            ls = loss_sum.detach().double().cpu()
            loss_sum_local += ls
            self._task_losses(logits, m, ls, task_sum, task_cnt, None if per_tok is None else per_tok.detach())
            num_tokens += int(m["num_tokens"])
            if self._record is not None:
                self._record.write(json.dumps({"iter": self.iteration + 1, "indexes": m.get("indexes", {})}) + "\n")
            del logits, loss_sum
        grad_norm = e.clip_grad_norm(cfg.clip_grad)
        bad_local = 0.0 if math.isfinite(loss_sum_local.item()) else 1.0
        stats = torch.cat([torch.tensor([loss_sum_local.item() if bad_local == 0 else 0.0, bad_local,
                                         float(self._stop_signal), float(num_tokens)], dtype=torch.float64),
                           task_sum, task_cnt])
        stats = e.all_reduce(stats, "sum")
        # Under dynamic loss scaling (fp16) non-finite gradients are an overflow: the engine skips the update
        # and lowers the scale, which is not a failure and does not count towards max_skipped_steps.
        overflow = not math.isfinite(grad_norm) and e.scales_loss
        bad = stats[1].item() > 0 or not math.isfinite(grad_norm)
        self._stop_agreed = stats[2].item() > 0
        lr = self.scheduler.current_lr()
        if self.cfg.inspect_iters and (self.iteration + 1) % self.cfg.inspect_iters == 0:
            rows = inspect_stats(self.model, e.all_reduce, e.param_shapes)
            if e.is_main:
                log.info("parameter statistics at iteration %d:\n%s", self.iteration + 1, format_inspect_table(rows))
        if bad:
            self.skipped_total += 1
            if overflow and stats[1].item() == 0:
                e.optimizer_step()  # sees the overflow: skips the update, halves the loss scale
            else:
                self.skipped_consecutive += 1
        else:
            e.optimizer_step()
            self.scheduler.step()
            self.skipped_consecutive = 0
        e.zero_grad()
        self.iteration += 1
        step_tokens = int(stats[3].item())
        self.tokens_total += step_tokens
        task_loss = {}
        for i, name in enumerate(tasks):
            c = stats[4 + T + i].item()
            if c > 0:
                if not bad:
                    task_loss[name] = stats[4 + i].item() / c
                self.task_tokens[name] = self.task_tokens.get(name, 0) + int(c)
        dt = time.perf_counter() - t0
        tps = step_tokens / dt if dt > 0 else 0.0
        return {
            "iter": self.iteration, "train_iters": cfg.train_iters,
            "loss": stats[0].item() / total_targets if not bad else float("nan"),
            "lr": lr, "grad_norm": grad_norm, "loss_scale": e.loss_scale, "skipped": bad,
            "skipped_steps": self.skipped_total, "tokens": step_tokens, "target_tokens": int(total_targets),
            "tokens_total": self.tokens_total, "tokens_per_sec": tps, "step_time": dt,
            "mfu": (tps * self.flops_per_token / (self.peak_flops * e.world_size)) if self.peak_flops else None,
            "memory": e.memory_stats(), "task_loss": task_loss, "world_size": e.world_size,
        }

    @staticmethod
    def _task_losses(logits: torch.Tensor, m: dict, loss_sum: torch.Tensor, task_sum: torch.Tensor,
                     task_cnt: torch.Tensor, per_tok: torch.Tensor | None = None) -> None:
        """Per-task loss sums: from the per-token losses when the loss kept them; free when the micro-batch
        holds one task; otherwise a chunked no-grad cross-entropy (bmtrain's fused loss only gives the sum)."""
        tgt, tid = m["targets"], m["task_ids"]
        valid = tgt != -100
        if per_tok is not None:
            v = valid.reshape(-1)
            k = tid.reshape(-1)[v].cpu()
            task_sum.index_add_(0, k, per_tok[v].double().cpu())
            task_cnt.index_add_(0, k, torch.ones(k.numel(), dtype=torch.float64))
            return
        ids = torch.unique(tid[valid]).tolist()
        if not ids:
            return
        if len(ids) == 1:
            task_sum[ids[0]] += loss_sum.item()
            task_cnt[ids[0]] += int(valid.sum())
            return
        with torch.no_grad():
            flat = logits.detach().reshape(-1, logits.shape[-1])
            t, k = tgt.reshape(-1), tid.reshape(-1)
            for s in range(0, flat.shape[0], 2048):
                ce = torch.nn.functional.cross_entropy(flat[s:s + 2048].float(), t[s:s + 2048], ignore_index=-100,
                                                       reduction="none")
                kk = k[s:s + 2048]
                v = t[s:s + 2048] != -100
                task_sum.index_add_(0, kk[v].cpu(), ce[v].double().cpu())
                task_cnt.index_add_(0, kk[v].cpu(), torch.ones(int(v.sum()), dtype=torch.float64))

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        cfg, e = self.cfg, self.engine
        self.install_signal_handlers()
        nan_steps = _nan_steps(e.rank)
        die_after = int(os.environ.get("FM_TEST_DIE_AFTER", "0") or 0)
        if os.environ.get("FM_TEST_RECORD_INDEXES"):
            rec = Path(os.environ["FM_TEST_RECORD_INDEXES"])
            rec.mkdir(parents=True, exist_ok=True)
            self._record = open(rec / f"rank-{e.rank}.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if self.loader_state is None:
            self.loader_state = self.loader.state_dict()
        it = iter(self.loader)
        code = EXIT_OK
        data_ended = False
        self._stop_agreed = False
        while self.iteration < cfg.train_iters:
            micros = self._next_micro_batches(it)
            s = self.train_step(micros, nan_steps)
            if s is None:
                reason = getattr(self.loader, "stop_reason", None) or "a rank's loader ended"
                log.info("data exhausted at iteration %d: %s; ending training", self.iteration, reason)
                data_ended = True
                break
            self.loader_state = self.loader.state_dict()
            self.metrics.log_step(s)
            if self._eval_due() and not self._stop_agreed:  # a stop signal wants the checkpoint now
                self.validate()
            if die_after and self.iteration == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.skipped_consecutive and self.skipped_consecutive >= max(1, cfg.max_skipped_steps):
                log.error("%d consecutive non-finite steps (max_skipped_steps=%d): stopping; the last good "
                          "weights are saved at iteration %d", self.skipped_consecutive, cfg.max_skipped_steps,
                          self.iteration)
                self.save_checkpoint("non-finite")
                code = EXIT_NONFINITE
                break
            if self._stop_agreed:
                log.info("stop signal received: saving at iteration %d and exiting", self.iteration)
                self.save_checkpoint("signal")
                break
            if cfg.save_iters and self.iteration % cfg.save_iters == 0:
                self.save_checkpoint()
        if code == EXIT_OK and self._last_saved != self.iteration and (cfg.save_iters or data_ended):
            self.save_checkpoint("end of data" if data_ended else "end")
        if code == EXIT_OK and not self._stop_agreed and self.val_batches and self._last_eval != self.iteration:
            self.validate()  # end of training (data ran out, or resumed at train_iters): the final weights
        self.wait_for_save()
        e.barrier()
        if self._record is not None:
            self._record.close()
        self.finish()
        # Rank 0 has just rendered the loss curve: let the ranks tear down their gloo groups together (a rank
        # that exits while a peer is still busy was seen to abort the peer's gloo threads).
        e.barrier()
        if code == EXIT_NONFINITE:
            raise NonFiniteError(f"{self.skipped_consecutive} consecutive non-finite steps; checkpoint of the last "
                                 f"good weights at {run_dir(cfg) / str(self.iteration)}")
        return code

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
        loader = self.build_loader()
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


def run(cfg: TrainConfig, engine=None) -> int:
    """Build everything from ``cfg`` and train; returns the process exit code (0, or 3 after the
    non-finite limit — that case also raises ``NonFiniteError`` to the caller's log)."""
    tr = Trainer(cfg, engine)
    # Before the setup, which takes minutes for a large model: slurm's early warning (SIGUSR1) or a SIGTERM
    # arriving then would otherwise kill the process (default action) instead of stopping at the first step.
    tr.install_signal_handlers()
    tr.setup_engine()
    try:
        if cfg.only_run_dataloader:
            tr.run_dataloader_only()
            return EXIT_OK
        tr.build_model()
        tr.build_loader()
        tr.build_validation()
        tr.setup_outputs()
        tr.resume()
        return tr.train()
    finally:
        tr.engine.shutdown()
