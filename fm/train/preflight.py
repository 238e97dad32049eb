"""Check, before torchrun starts any worker, everything the workers will need; and describe the resolved plan.

A mistake in a train config, model config, tokenizer or dataset config then costs seconds and one message,
not minutes of building a 2.4B model on every rank and a page of per-rank tracebacks. The workers still check
the same things themselves (a preflight on a login node cannot see a compute node's disks).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fm.train.config import TrainConfig, load_config, qualify_model_config


@dataclass
class Report:
    train_config: str
    overrides: list[tuple[str, str]]
    cfg: TrainConfig | None = None
    problems: list[str] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)

    def message(self) -> str:
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"preflight: {n} problem{'s' if n != 1 else ''}; nothing was started:\n{lines}"

    def plan(self, topo: Any) -> str:
        """What would run: one line per fact (``--dry-run``)."""
        given = " ".join(f"--{k} {v}" for k, v in self.overrides)
        rows = [("train config", self.train_config + (f" with overrides {given}" if given else "")),
                ("world", f"{topo.nnodes} node(s) x {topo.nproc} process(es) = {topo.nnodes * topo.nproc}, "
                          f"rendezvous {topo.master}:{topo.port}"),
                *self.facts.items(),
                ("preflight", "ok" if not self.problems else f"{len(self.problems)} problem(s), listed below")]
        width = max(len(k) for k, _ in rows)
        return "plan:\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def preflight(train_config: str, overrides: list[tuple[str, str]], world_size: int = 1,
              family: str | None = None) -> Report:
    """Every problem of the train config, model config, tokenizer, data, weights to load and output directories.
    ``overrides``: the command line's ``(key, value)`` pairs (:class:`fm.compat.argv.TrainArgs`)."""
    report = Report(train_config, list(overrides))
    problems = report.problems
    cfg = load_config(train_config, cli=dict(overrides), collect=problems) if _readable(train_config, problems) \
        else None
    if cfg is None:
        return report
    report.cfg = cfg = qualify_model_config(cfg, family)
    model = _model(cfg, report)
    tok = _tokenizer(cfg, report)
    if model is not None and tok is not None and tok.vocab_size > model.vocab_size:
        problems.append(f"data.tokenizer: {tok.path} has {tok.vocab_size} pieces but the model config's vocab_size "
                        f"is {model.vocab_size}: ids from {model.vocab_size} on have no embedding row; use the "
                        "model's tokenizer or a config with vocab_size >= the tokenizer's")
    vocab = model.vocab_size if model is not None else None
    _stages(cfg, report, vocab)
    if cfg.eval.mixture:
        _data(cfg.eval.mixture, "eval.mixture", report, required=False, vocab_size=vocab)
    _downstream(cfg, report)
    _weights(cfg, report)
    _outputs(cfg, report)
    if cfg.engine.name == "bmtrain" and importlib.util.find_spec("bmtrain") is None:
        problems.append("engine: bmtrain is not installed: pip install --no-deps -r requirements-bmtrain.txt "
                        "(docs/engines.md), or set engine fsdp")
    d, run, eng = cfg.data, cfg.run, cfg.engine
    tokens = d.batch_size * run.grad_accum * d.max_length * world_size
    report.facts["steps"] = (f"{run.train_iters} x (batch {d.batch_size} x grad_accum {run.grad_accum} x "
                             f"{world_size} process(es)) rows of {d.max_length} tokens = {tokens:,} tokens per step")
    report.facts["engine"] = (f"{eng.name}, dtype {eng.dtype}" + (", LoRA adapters only" if cfg.lora.enabled else "")
                              + (", compiled layers" if eng.compile else "") + (", offload" if eng.offload else "")
                              + (f", activation checkpointing every {eng.checkpoint_every} layer(s)"
                                 if eng.activation_checkpointing else ""))
    return report


def _readable(path: str, problems: list[str]) -> bool:
    if not Path(path).is_file():
        problems.append(f"train config {path} does not exist (--config X.json or TRAIN_CONFIG)")
        return False
    return True


def _model(cfg: TrainConfig, report: Report) -> Any:
    from fm.models.config import ModelConfigError
    from fm.models.registry import build_model, load_model_config, resolve_model_config

    try:
        where, _ = resolve_model_config(cfg.model.config)
    except ModelConfigError as e:
        report.problems.append(f"model.config: {e}")
        return None
    try:
        model = load_model_config(cfg.model.config)
    except ModelConfigError as e:
        report.problems += [f"model.config {where}: {p}" for p in _lines(e)]
        return None
    meta = build_model(model, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    report.facts["model"] = f"{model.model_family} {where} ({params / 1e6:,.1f}M parameters)"
    return model


def _tokenizer(cfg: TrainConfig, report: Report) -> Any:
    from fm.errors import FmError
    from fm.tokenizer import load_tokenizer
    from fm.train.config import tokenizer_source

    try:
        spec, where = tokenizer_source(cfg)
    except (FmError, OSError, ValueError) as e:
        report.problems.append(f"data.tokenizer: {e}")
        return None
    try:
        tok = load_tokenizer(spec)
    except FileNotFoundError as e:
        report.problems.append(f"data.tokenizer: {e}")
        return None
    except (OSError, RuntimeError, ValueError) as e:  # neither SentencePiece nor tokenizers can read it
        report.problems.append(f"data.tokenizer: {e}")
        return None
    if cfg.data.eos_token and tok.piece_to_id(cfg.data.eos_token) is None:
        report.problems.append(f"data.eos_token: {cfg.data.eos_token!r} is not a token of {tok.path}")
    elif not cfg.data.eos_token and tok.eos_id is None:
        report.problems.append(f"data.tokenizer: {tok.path} has no EOS token, which ends every sample: name one "
                               "with data.eos_token")
    origin = "" if where == "data.tokenizer" else f", from {where}"
    report.facts["tokenizer"] = f"{tok.path} ({tok.kind}, {tok.vocab_size} tokens{origin})"
    return tok


def _stages(cfg: TrainConfig, report: Report, vocab_size: int | None) -> None:
    """``data.mixture`` and every ``data.stages`` mixture, each problem naming its stage; one task name for two
    different datasets across stages; a fact per stage (``--dry-run``)."""
    from fm.data.mixture import stage_union
    from fm.errors import ConfigError

    stages = cfg.data.stages
    try:
        starts = cfg.stage_starts()
    except ConfigError:  # "decay" without a decay: cross_problems said so
        starts = None
    names = ["data.mixture (stage 0)", *(f"data.stages[{i}] (stage {i + 1})" for i in range(len(stages)))]
    mixes = []
    for k, spec in enumerate(cfg.stage_mixtures()):
        key = "data.mixture" if k == 0 else f"data.stages[{k - 1}].mixture"
        label = "data" if k == 0 else f"data stage {k}"
        if stages:
            start = "?" if starts is None else starts[k]
            decay = " (the decay)" if k and stages[k - 1].start_iter == "decay" else ""
            key += f" (stage {k})" if k else " (stage 0)"
            prefix = f"from iteration {start}{decay}: "
        else:
            prefix = ""
        mixes.append(_data(spec, key, report, required=k == 0, vocab_size=vocab_size, fact=label, prefix=prefix))
    if stages and all(m is not None for m in mixes):
        _, problems = stage_union(mixes, names)
        report.problems += [f"data.stages: {p}" for p in problems]


def _data(spec: str, key: str, report: Report, *, required: bool, vocab_size: int | None = None,
          fact: str | None = None, prefix: str = "") -> Any:
    """The mixture config ``spec`` (None when it has problems, which go to the report) and its fact."""
    from fm.data.datasets import open_dataset
    from fm.data.mixture import MixtureConfigError, load_mixture

    if not spec:
        if required:
            report.problems.append(f"{key} is empty: name a mixture config JSON (docs/mixtures.md)")
        return None
    try:
        mix = load_mixture(spec)
    except FileNotFoundError as e:
        report.problems.append(f"{key}: {e}")
        return None
    except MixtureConfigError as e:
        report.problems += [f"{key} {spec}: {p}" for p in e.problems]
        return None
    for ds in mix.datasets:  # token ids the model has no embedding for (jsonl: the tokenizer check above)
        if ds.format == "megatron" and vocab_size is not None:
            try:
                open_dataset(ds.path, ds.format).check_ids(vocab_size, where=f"task {ds.task_name!r}")
            except ValueError as e:
                report.problems.append(f"{key} {spec}: {e}")
    shares = ", ".join(f"{t} {w:.0%}" for t, w in zip(mix.task_names, mix.weights()))
    report.facts[fact or ("data" if key == "data.mixture" else "validation data")] = (
        f"{prefix}{spec}: {len(mix.datasets)} dataset(s), token shares {shares}")
    return mix


def _downstream(cfg: TrainConfig, report: Report) -> None:
    """The benchmark files of the in-loop downstream evaluation (``eval.downstream_*``), read as the workers will."""
    ev = cfg.eval
    if not ev.downstream_interval:
        return
    from fm.eval.tasks import EvalDataError, load_mc

    wanted = [s.strip() for s in ev.downstream_subjects.split(",") if s.strip()] or None
    found = []
    for name, key, path in (("ceval", "eval.ceval_dir", ev.ceval_dir), ("mmlu", "eval.mmlu_dir", ev.mmlu_dir),
                            ("cmmlu", "eval.cmmlu_dir", ev.cmmlu_dir)):
        if not path:
            continue
        try:
            task, subjects = load_mc(name, path, shots=ev.downstream_shots, subjects=wanted,
                                     limit=ev.downstream_limit)
        except EvalDataError as e:
            report.problems.append(f"{key}: {e}")
            continue
        empty = [s.name for s in subjects if not s.questions]
        if empty:  # nothing to score there: a file with no question rows (the in-loop evaluation would skip it)
            none = " (so the benchmark has no question at all)" if len(empty) == len(subjects) else ""
            report.problems.append(f"{key}: {path}: subject(s) {', '.join(empty)} have no questions in the "
                                   f"{task.eval_split} split{none}; give the benchmark's files with their questions, "
                                   "or leave those subjects out with eval.downstream_subjects")
            continue
        found.append(f"{name} {sum(len(s.questions) for s in subjects)} questions of {len(subjects)} subjects")
    if found:
        report.facts["downstream evaluation"] = f"every {ev.downstream_interval} steps: {', '.join(found)}"


def _weights(cfg: TrainConfig, report: Report) -> None:
    from fm.checkpoint.layout import resolve_checkpoint

    run, spec = cfg.run.dir(), cfg.checkpoint.resume
    resume = None
    if spec.source and Path(spec.source).is_file():
        resume = Path(spec.source)  # a bare .pt: weights only
    elif spec.source:
        try:
            resume = resolve_checkpoint(run, spec.source)
        except FileNotFoundError as e:
            report.problems.append(f"checkpoint.resume.source: {e}")
            return
        except OSError:  # the save directory itself is wrong: reported by the output check
            pass
    report.facts["run directory"] = f"{run} ({f'resumes from {resume}' if resume else 'starts fresh'})"
    if cfg.model.init_from and (resume is None or cfg.lora.enabled):
        from fm.checkpoint.open import open_checkpoint

        try:
            ck = open_checkpoint(cfg.model.init_from)
        except (FileNotFoundError, ValueError) as e:
            report.problems.append(f"model.init_from: {e}")
            return
        report.facts["initial weights"] = ck.describe()


def _outputs(cfg: TrainConfig, report: Report) -> None:
    for key, target in (("run.save_dir", cfg.run.save_dir), ("run.tensorboard_dir", cfg.run.tensorboard_dir)):
        if not target:
            continue
        problem = _unwritable(Path(target))
        if problem:
            report.problems.append(f"{key}: {target}: {problem}")
    if cfg.run.tensorboard_dir:
        report.facts["tensorboard"] = str(Path(cfg.run.tensorboard_dir) / f"{cfg.run.exp_group}{cfg.run.name}")


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be created or written ("" when it can), without creating anything."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"no permission to write in {p}"
    return ""


def _lines(e: Exception) -> list[str]:
    problems = getattr(e, "problems", None)
    return list(problems) if problems else [str(e)]
