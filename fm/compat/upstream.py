"""Upstream FM9G's flat train keys → fm's sections.

Upstream's ``pretrain_dragonfly.sh`` sets ``args["lr"]="1e-2"``, ``args["save"]="True"``,
``args["resume_no_optimze"]="0"``: flat keys, every value a string, one misspelling. :data:`KEYS` maps each key that
acts to its place in fm's config (``lr`` → ``optim.lr``); :data:`NO_OPS` are accepted and do nothing (said once at
start, only when set); :data:`REFUSED` have one legal value and are refused otherwise, with the reason. Worked
example::

    {"model_unique": "2b", "lr": "1e-2", "save": "True", "flash": "cuda", "tp_size": "1"}
    → {"run": {"name": "2b"}, "optim": {"lr": 0.01}}            # save="True" is upstream's flag: the default dir
      notes: ["config: flash='cuda' has no effect here: ..."]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fm.schema import _Bad, coerce, fields_of, suggest

# upstream key → fm key (section.key)
KEYS: dict[str, str] = {
    "model_unique": "run.name", "exp_group": "run.exp_group", "seed": "run.seed", "train_iters": "run.train_iters",
    "grad_accum": "run.grad_accum", "save": "run.save_dir", "tensorboard": "run.tensorboard_dir",
    "tensorboard_all_tasks": "run.tensorboard_all_tasks", "log_iters": "run.log_iters",
    "inspect_iters": "run.inspect_iters", "max_skipped_steps": "run.max_skipped_steps",
    "peak_tflops": "run.peak_tflops", "only_run_dataloader": "run.only_run_dataloader",
    "dataset_config": "data.mixture", "data_stages": "data.stages", "tokenizer_path": "data.tokenizer",
    "max_length": "data.max_length",
    "batch_size": "data.batch_size", "dataloader_num_workers": "data.num_workers",
    "dataloader_prefetch_factor": "data.prefetch_factor", "eos_token": "data.eos_token",
    "config": "model.config", "load_model": "model.init_from",
    "lr": "optim.lr", "weight_decay": "optim.weight_decay", "eps": "optim.eps", "clip_grad": "optim.clip_grad",
    "lr_scheduler": "schedule.name", "warmup_iters": "schedule.warmup_iters", "drop_iters": "schedule.drop_iters",
    "drop_begin": "schedule.drop_begin", "drop_rate": "schedule.drop_rate",
    "save_iters": "checkpoint.every", "keep_last_n": "checkpoint.keep_last_n", "async_save": "checkpoint.async_save",
    "resume_ckpt": "checkpoint.resume.source", "only_load_model": "checkpoint.resume.weights_only",
    "load_dataloader_ckpt": "checkpoint.resume.load_data", "resume_no_optimze": "checkpoint.resume.rewarm_iters",
    "strict_state_dict": "checkpoint.resume.strict",
    "engine": "engine.name", "dtype": "engine.dtype", "use_checkpoint": "engine.activation_checkpointing",
    "checkpoint_every": "engine.checkpoint_every", "offload": "engine.offload", "compile": "engine.compile",
    "loss_chunk": "engine.loss_chunk",
    "eval_dataset_config": "eval.mixture", "eval_iters": "eval.iters", "eval_interval": "eval.interval",
    "lora": "lora.enabled", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
}  # fmt: skip
_FM_TO_UPSTREAM = {v: k for k, v in KEYS.items()}
# Other upstream spellings of a key: FM9G's 2025 apps (4B/7B/70B) name the initial weights pretrained_model.
ALIASES: dict[str, str] = {"pretrained_model": "load_model"}

# Keys accepted for compatibility that change nothing; said at start, when the user set them.
NO_OPS: dict[str, str] = {
    "flash": "the model picks its attention kernel itself (torch's varlen kernel or flash-attn on CUDA, SDPA "
             "otherwise)",
    "dataloader_num_threads": "tokenization runs in the loader workers; set data.num_workers instead",
    "dataloader_prefetch": "the prefetch depth is data.prefetch_factor (batches per worker)",
    "parallel_load_datastate": "the data-loader state is a few KB (positions, not bitsets) and loads at once",
    "stop_when_end": "training always ends cleanly, with a final checkpoint, once every dataset is exhausted",
    "local": "data is always read from the local filesystem (no HDFS)",
    "grad_ckpt_num": "engine.activation_checkpointing with engine.checkpoint_every chooses the checkpointed layers",
}

# upstream's save="True" (a flag, not a directory): these words mean the default directory; anything else is a path
_SAVE_FLAG_WORDS = ("true", "false", "1", "0")
# upstream keys of boolean type that do nothing here: given bare on a command line they take no value
NO_OP_FLAGS = ("local", "stop_when_end")

# Keys with one legal value: (that value, why any other is refused).
REFUSED: dict[str, tuple[Any, str]] = {
    "tp_size": (1, "tensor parallelism is not supported: tp_size must be 1; the engines shard with ZeRO-3 "
                "(bmtrain) or FSDP2, which fits the 2.4B and 13B models without it"),
    "load_grad": (False, "gradients are never saved: checkpoints are taken at optimizer-step boundaries where the "
                  "accumulated gradient is zero, so there is nothing to load; set load_grad false"),
    "ignore_cuda_oom": (False, "skipping a step after an out-of-memory error cannot be made safe under ZeRO-3/FSDP "
                        "(the other ranks wait forever in the collective the failing rank left); lower batch_size "
                        "or max_length, or set use_checkpoint true; set ignore_cuda_oom false"),
    "dataloader": ("indexed", 'only the "indexed" dataloader exists (convert data with fm convert)'),
}

# Every key upstream's pretrain_dragonfly.sh / README parameter list knows (a test enumerates them).
UPSTREAM_KEYS = (
    "model_unique", "resume_ckpt", "config", "flash", "max_length", "batch_size", "save_iters", "train_iters",
    "dataset_config", "tokenizer_path", "lr", "warmup_iters", "drop_iters", "lr_scheduler", "drop_begin",
    "drop_rate", "only_load_model", "load_dataloader_ckpt", "load_grad", "resume_no_optimze", "inspect_iters",
    "exp_group", "stop_when_end", "only_run_dataloader", "ignore_cuda_oom", "tensorboard_all_tasks",
    "strict_state_dict", "tp_size", "async_save", "use_checkpoint", "dataloader_num_workers",
    "dataloader_num_threads", "dataloader_prefetch", "dataloader_prefetch_factor", "parallel_load_datastate",
    "grad_accum", "clip_grad", "seed", "weight_decay", "save", "local", "dataloader", "grad_ckpt_num", "eps",
)  # fmt: skip


def upstream_name(fm_key: str) -> str:
    """The upstream key that sets ``fm_key`` (``optim.lr`` → ``lr``), or ``""``."""
    return _FM_TO_UPSTREAM.get(fm_key, "")


def field_of(root: type, path: str) -> tuple[dataclasses.Field, Any]:
    """The field and declared type of key ``path`` of config class ``root`` (``optim.lr`` → its field, float)."""
    cls: Any = root
    f = None
    for part in path.split("."):
        f, cls = fields_of(cls)[part]
    return f, cls


def field_type(root: type, path: str) -> Any:
    return field_of(root, path)[1]


def to_sections(data: Mapping[str, Any], where: str, root: type) -> tuple[dict[str, Any], list[str], list[str],
                                                                          dict[str, str]]:
    """``(fm's nested form, problems, notes, upstream names by fm key)`` for one layer of config class ``root``
    (:class:`fm.train.config.TrainConfig`) whose keys may be fm's (a section object, or ``section.key``) or
    upstream's flat keys. Upstream values may be strings, as upstream's shell
    scripts pass them (``"1e-2"``, ``"False"``), in a file too; fm's own form keeps JSON types. Problems name the key
    as written."""
    sections = [name for name, (_, tp) in fields_of(root).items() if dataclasses.is_dataclass(tp)]
    nested: dict[str, Any] = {}
    problems: list[str] = []
    notes: list[str] = []
    origin: dict[str, str] = {}  # fm path → how this layer wrote it

    def put(path: str, value: Any, written: str) -> None:
        if path in origin:
            problems.append(f"{written}: sets {path}, which {origin[path]} sets too; keep one")
            return
        origin[path] = written
        node = nested
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{written}: {part} is not a section object")
                return
        node[last] = value

    for name, value in data.items():
        if name in sections and isinstance(value, Mapping):
            for path, v in _flatten(value, name, root):
                put(path, v, path)
        elif name in KEYS or name in ALIASES:  # (upstream's "engine" and "lora" are also section names: a
            key = ALIASES.get(name, name)       # non-object value is the key)
            try:
                put(KEYS[key], _upstream_value(key, value, notes, where, root), name)
            except _Bad as e:
                problems.append(f"{name} ({KEYS[key]}): {e}")
        elif name in sections:
            put(name, value, name)  # not an object: the section's check says so
        elif "." in name and name.split(".", 1)[0] in sections:
            put(name, value, name)
        elif name in NO_OPS:
            notes.append(f"config: {name}={value!r} has no effect here: {NO_OPS[name]}")
        elif name in REFUSED:
            legal, why = REFUSED[name]
            try:
                ok = coerce(value, type(legal), from_cli=True) == legal
            except _Bad:
                ok = False
            if not ok:
                problems.append(f"{name}: {value!r} is refused: {why}")
        else:
            known = [*sections, *KEYS, *ALIASES, *NO_OPS, *REFUSED]
            problems.append(f"unknown key {name!r}{suggest(name, known)}")
    aliases = {path: name for path, name in origin.items() if name in KEYS or name in ALIASES}
    return nested, problems, notes, aliases


def _flatten(obj: Mapping[str, Any], prefix: str, root: type) -> list[tuple[str, Any]]:
    """``{"resume": {"source": "latest"}}`` under ``checkpoint`` → ``[("checkpoint.resume.source", "latest")]``; a
    dict value of a key that is not a section stays whole (its field's check reports it)."""
    out = []
    for k, v in obj.items():
        path = f"{prefix}.{k}"
        if isinstance(v, Mapping) and _is_section(root, path):
            out += _flatten(v, path, root)
        else:
            out.append((path, v))
    return out


def _is_section(root: type, path: str) -> bool:
    try:
        return dataclasses.is_dataclass(field_type(root, path))
    except KeyError:
        return False


def _upstream_value(name: str, value: Any, notes: list[str], where: str, root: type) -> Any:
    """Upstream's value forms: strings everywhere (parsed as on the command line), ``save="True"`` (a flag:
    the default directory), ``resume_ckpt`` as a step number."""
    if name == "save" and (isinstance(value, bool) or str(value).strip().lower() in _SAVE_FLAG_WORDS):
        notes.append(f'{where}: save={value!r} is upstream\'s flag form; checkpoints go to the default directory '
                     '"data/checkpoints"')
        return "data/checkpoints"
    if name == "resume_ckpt" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if name == "data_stages":
        return _upstream_stages(value)
    if isinstance(value, str):  # as on the command line; a bad one raises _Bad with the reason
        f, tp = field_of(root, KEYS[name])
        return coerce(value, tp, from_cli=True, normalise=f.metadata.get("normalise"))
    return value


def _upstream_stages(value: Any) -> Any:
    """``data_stages``: a JSON list (or a JSON string of one, as a shell passes it) of ``{"start_iter": 9000,
    "dataset_config": "decay.json"}`` → ``data.stages``' ``{"start_iter": 9000, "mixture": "decay.json"}``; a
    ``start_iter`` given as a string of digits is the number. Anything else goes on as written (its check names it)."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise _Bad(f"must be a JSON list of {{start_iter, dataset_config}} objects, got {value!r} ({e.msg})") \
                from None
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        if isinstance(item, Mapping):
            item = {("mixture" if k == "dataset_config" else k): v for k, v in item.items()}
            start = item.get("start_iter")
            if isinstance(start, str) and start.strip().isdigit():
                item["start_iter"] = int(start)
        out.append(item)
    return out


def rename_problem(problem: str, written: Mapping[str, str]) -> str:
    """``optim.lr: must be > 0`` → ``lr (optim.lr): must be > 0`` when the layer wrote the upstream key."""
    path, sep, rest = problem.partition(": ")
    if sep and path in written:
        return f"{written[path]} ({path}): {rest}"
    return problem
