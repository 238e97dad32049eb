"""Where everything of a checkpoint lives, and which checkpoint a resume spec means.

Layout (``root`` is ``<run.save_dir>/<run.name>``, upstream's ``<save>/<model_unique>``)::

    <root>/<step>/fm9g_live_checkpoint-<step>.pt   full model state dict (upstream key names)
    <root>/<step>/optimizer/                        fsdp: torch.distributed.checkpoint dir; bmtrain: per-rank files
    <root>/<step>/.log_ckpt                         JSON: iteration, token counters, ...
    <root>/<step>/dataset_ckpt/state.json           merged data-loader state
    <root>/<step>/config.json                       resolved train config (fm's sectioned form)
    <root>/<step>/model_config.json                 resolved model config (with model_family): the step dir
                                                    is self-describing, wherever it is copied
    <root>/<step>/tokenizer.model                   copy of the tokenizer: a SentencePiece model
    <root>/<step>/tokenizer/                        ... or a Hugging Face tokenizer's files (tokenizer.json,
                                                    tokenizer_config.json, and those of fm.tokenizer.HF_FILES present)
    <root>/<step>/scheduler.pt                      lr scheduler state
    <root>/<step>/rng/rank<r>.pt                    per-rank RNG states
    <root>/<step>/COMPLETE                          written last inside the dir (JSON: step, world size, and
                                                    every file's size and CRC32)
    <root>/latest                                   the step, written after the dir is in place
    <root>/.tmp-<step>-<hex>/                       a save in progress (never read; removed by the next save)

How the directory is written is :mod:`fm.checkpoint.commit`; how any checkpoint form is opened for its weights
is :mod:`fm.checkpoint.open`; what a run saves and resumes is :mod:`fm.checkpoint.checkpointer`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fm.errors import FmError

log = logging.getLogger(__name__)

MODEL_FILE = "fm9g_live_checkpoint-{step}.pt"
OPTIMIZER_DIR = "optimizer"
LOG_CKPT = ".log_ckpt"
DATASET_DIR = "dataset_ckpt"
DATASET_FILE = f"{DATASET_DIR}/state.json"
CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece tokenizer
TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer: a directory of its files
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng/rank{rank}.pt"
COMPLETE = "COMPLETE"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
MODEL_RE = re.compile(r"^fm9g_live_checkpoint-(\d+)\.pt$")


class CheckpointError(FmError, RuntimeError):
    """A checkpoint cannot be used: missing, incomplete, damaged, or not a checkpoint form; the message names it."""


class CheckpointFormError(CheckpointError, ValueError):
    """The path is not any checkpoint form, or lacks what the caller needs (its model config, a base)."""


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_complete(p))


def find_latest(root: str | Path) -> int | None:
    """The step that ``latest`` names if that checkpoint is complete, else the newest complete one, else None."""
    root = Path(root)
    try:
        step = int((root / LATEST).read_text().strip())
        if is_complete(root / str(step)):
            return step
        log.warning("%s names step %d, which is not a complete checkpoint: using the newest complete one",
                    root / LATEST, step)
    except (FileNotFoundError, ValueError):
        pass
    steps = list_checkpoints(root)
    return steps[-1] if steps else None


def resolve_checkpoint(root: str | Path, which: str | int | None = "latest") -> Path | None:
    """Directory to resume from: ``"latest"``/None → :func:`find_latest`; a step number; or a directory path.

    An explicit directory without ``COMPLETE`` (e.g. an upstream checkpoint) is accepted with a warning.
    """
    root = Path(root)
    if which is None or str(which).lower() == "latest":
        step = find_latest(root)
        return None if step is None else root / str(step)
    if isinstance(which, int) or str(which).isdigit():
        path = root / str(int(which))
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint {path} is missing or incomplete (no {COMPLETE}); "
                                    f"complete steps: {list_checkpoints(root)}")
        return path
    path = Path(which)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not is_complete(path):
        log.warning("%s has no %s marker (upstream or interrupted save?): loading it anyway", path, COMPLETE)
    return path


def read_log_ckpt(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / LOG_CKPT).read_text())


def model_file(path: str | Path) -> Path:
    """The ``fm9g_live_checkpoint-<step>.pt`` inside a checkpoint directory."""
    found = models_in(Path(path))
    if not found:
        raise FileNotFoundError(f"no {MODEL_FILE.format(step='<step>')} in {path}")
    return found[-1][1]


def models_in(d: Path) -> list[tuple[int, Path]]:
    """``(step, file)`` of every ``fm9g_live_checkpoint-<step>.pt`` in ``d``, by step number (not by name: step 900
    sorts before step 1000)."""
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), f) for f in d.iterdir() if (m := MODEL_RE.match(f.name)))


def read_scheduler_state(ckpt: str | Path) -> dict[str, Any]:
    from fm.io import load_torch

    return load_torch(Path(ckpt) / SCHEDULER_FILE)


