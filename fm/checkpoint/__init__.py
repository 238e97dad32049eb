"""Checkpoints, in one package.

* :mod:`fm.checkpoint.layout`: the files of a checkpoint directory, which step a resume spec means, the one
  exception family (:class:`CheckpointError`);
* :mod:`fm.checkpoint.commit`: writing a directory (parts, atomic commit, async save, keep-last-n, verify);
* :mod:`fm.checkpoint.open`: opening any form a user has (``.pt``, step or run directory, LoRA adapter, HF export);
* :mod:`fm.checkpoint.checkpointer`: what a training run saves and how it resumes (:class:`Checkpointer`).
"""

from __future__ import annotations

from fm.checkpoint.layout import CheckpointError, CheckpointFormError, find_latest, list_checkpoints, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointFormError", "find_latest", "list_checkpoints", "resolve_checkpoint"]
