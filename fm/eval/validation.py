"""Validation loss during training: the same held-out tokens every time, per-task loss and perplexity.

The trainer builds the batches once with :func:`fixed_batches` (the train loader over
``eval_dataset_config`` with a fixed seed, first ``eval_iters`` batches) and calls
:func:`evaluate_loss` every ``eval_interval`` steps. Each rank evaluates its own batches; the
returned sums are all-reduced by the trainer (:func:`sums_tensor` → ``engine.all_reduce`` →
:func:`from_sums_tensor`), so the loss is token-weighted over every rank's tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fm.nn.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_losses(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy in fp32, [B, L]; 0 where the target is -100.

    Computed ``chunk`` tokens at a time: an fp32 copy of all the logits of a 4096-token row with a
    120k vocabulary alone is 2 GB.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = targets.reshape(-1)
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for s in range(0, labels.numel(), chunk):
        out[s:s + chunk] = F.cross_entropy(flat[s:s + chunk].float(), labels[s:s + chunk],
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return out.view(targets.shape)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _summary(loss_sum: float, tokens: int) -> dict[str, float | int]:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "ppl": _safe_exp(loss) if tokens else float("nan"), "tokens": tokens, "loss_sum": loss_sum}


def summarize(loss_sums: Mapping[str, float], tokens: Mapping[str, int]) -> dict[str, Any]:
    """Result dict from per-task sums (tasks with 0 tokens are left out of ``per_task``)."""
    total_loss = float(sum(loss_sums.values()))
    total_tokens = int(sum(tokens.values()))
    out: dict[str, Any] = _summary(total_loss, total_tokens)
    out["per_task"] = {name: _summary(float(loss_sums[name]), int(tokens[name])) for name in loss_sums
                       if tokens[name] > 0}
    out["task_names"] = list(loss_sums)
    return out


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *, loss_fn: LossFn | None = None,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """Token-weighted mean cross-entropy of ``model`` over ``batches`` (contract-2 batch dicts).

    Returns ``{"loss", "ppl", "tokens", "loss_sum", "per_task": {name: {"loss", "ppl", "tokens",
    "loss_sum"}}, "task_names"}`` for THIS process's batches. ``loss_fn(logits[B,L,V], targets[B,L])``
    must return per-token losses [B, L] (0 on -100); the default is fp32 cross-entropy. The model is
    put in eval mode for the call and its previous mode restored. The batches are not modified.
    """
    loss_fn = loss_fn or token_losses
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    try:
        for batch in batches:
            names = list(batch["task_names"])
            for name in names:
                if name not in sums:
                    sums[name] = torch.zeros((), dtype=torch.float64, device=device)
                    counts[name] = torch.zeros((), dtype=torch.long, device=device)
            inputs = batch["inputs"].to(device)
            targets = batch["targets"].to(device)
            task_ids = batch["task_ids"].to(device)
            logits = model(inputs, batch["position_ids"].to(device), batch["cu_seqlens"].to(device),
                           batch["max_seqlen"])
            losses = loss_fn(logits, targets).double()
            valid = targets != IGNORE_INDEX
            for tid, name in enumerate(names):
                mask = valid & (task_ids == tid)
                sums[name] += losses[mask].sum()
                counts[name] += mask.sum()
            stray = valid & ((task_ids < 0) | (task_ids >= len(names)))
            if bool(stray.any()):
                raise ValueError(f"batch has {int(stray.sum())} target tokens whose task id is outside "
                                 f"0..{len(names) - 1} (task_names {names}); the loader and the batch disagree")
    finally:
        model.train(was_training)
    return summarize({k: float(v) for k, v in sums.items()}, {k: int(v) for k, v in counts.items()})


def sums_tensor(result: Mapping[str, Any], task_names: Sequence[str], device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """[2, T] float64 tensor (row 0: loss sums, row 1: token counts) in ``task_names`` order, for all-reduce.

    Use the loader's ``task_names`` (identical on every rank) so every rank sends the same layout,
    even a rank whose batches had no token of some task.
    """
    per = result["per_task"]
    out = torch.zeros(2, len(task_names), dtype=torch.float64, device=device)
    for j, name in enumerate(task_names):
        if name in per:
            out[0, j] = per[name]["loss_sum"]
            out[1, j] = per[name]["tokens"]
    unknown = set(per) - set(task_names)
    if unknown:
        raise ValueError(f"tasks {sorted(unknown)} are in the result but not in task_names {list(task_names)}")
    return out


def from_sums_tensor(sums: torch.Tensor, task_names: Sequence[str]) -> dict[str, Any]:
    """The result dict from a (reduced) :func:`sums_tensor`."""
    s = sums.detach().double().cpu()
    return summarize({n: float(s[0, j]) for j, n in enumerate(task_names)},
                     {n: int(round(float(s[1, j]))) for j, n in enumerate(task_names)})


def fixed_batches(dataset_config: str, tokenizer: Any, *, batch_size: int, max_length: int, n_batches: int,
                  rank: int = 0, world_size: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n_batches`` batches of the train loader over ``dataset_config`` with a fixed ``seed``.

    Built once and kept in memory: the same validation tokens at every evaluation. Datasets with
    ``allow_repeat`` are fine (the loader just cycles them); if every dataset is exhausted first,
    fewer batches are returned and a warning says so. Under a sharded engine every rank must run
    the same number of forward passes, so a distributed caller cuts every rank's list to the
    minimum length over ranks (``engine.all_reduce(len(batches), op="min")``).
    """
    from fm.data.loader import build_train_loader

    if n_batches <= 0:
        raise ValueError(f"eval_iters must be > 0, got {n_batches}")
    loader = build_train_loader(dataset_config, tokenizer, batch_size=batch_size, max_length=max_length,
                                rank=rank, world_size=world_size, num_workers=0, seed=seed)
    out: list[dict[str, Any]] = []
    for batch in loader:
        out.append(batch)
        if len(out) == n_batches:
            break
    if len(out) < n_batches:
        log.warning("validation data %s: only %d of eval_iters=%d batches (every dataset ran out: %s)",
                    dataset_config, len(out), n_batches, getattr(loader, "stop_reason", "?"))
    close = getattr(loader, "close", None)
    if callable(close):
        close()
    return out
