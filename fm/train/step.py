"""The device side of one optimizer step, and the step's one host sync.

A step runs its micro-batches forward and backward, keeping every sum it reports on the device
(:class:`StepSums`), clips the gradients on the device, and then makes ONE all-reduce and ONE copy to
the host (:func:`agree`). That copy tells every rank the same :class:`Agreement`: the loss, whether
any rank's loss was not finite, the gradient norm, per-task losses and token counts, whether any
rank got a stop signal, the z-loss sum (``optim.z_loss``), and, for the next step, its global number of
target tokens and whether every rank still has data. The trainer decides from it whether to apply or skip
the update (a non-finite step, or a loss spike: :mod:`fm.train.stability`), the same on every rank.

Host numbers (token counts, ``cu_seqlens``, ``max_seqlen``) come from the loader and stay on the host:
nothing here reads a device tensor except :func:`to_host`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fm.nn.loss import IGNORE_INDEX

DEVICE_KEYS = ("inputs", "targets", "task_ids", "position_ids")  # what the device needs of a micro-batch


def to_host(t: torch.Tensor) -> list[float]:
    """The step's one device-to-host copy (a sync on an accelerator)."""
    return t.tolist()


def micro_to_device(micro: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The micro-batch's token tensors on ``device``: from page-locked memory, asynchronously, on CUDA.
    ``cu_seqlens``, ``max_seqlen`` and the counts stay host values (the model reads them on the host)."""
    out = dict(micro)
    for key in DEVICE_KEYS:
        t = micro[key]
        if device.type == "cuda":
            t = t.pin_memory()  # a copy from pageable memory would make non_blocking synchronous
        out[key] = t.to(device, non_blocking=True)
    return out


@dataclass
class StepSums:
    """Device accumulators of one optimizer step (fp64), added to by every micro-batch."""

    loss: torch.Tensor  # sum of the per-token losses (0 for a micro-batch whose loss was not finite)
    nonfinite: torch.Tensor  # 1 once a micro-batch's loss was inf or nan
    task_loss: torch.Tensor  # [T] per-task sums of the per-token losses
    task_targets: torch.Tensor  # [T] per-task target token counts
    z_loss: torch.Tensor  # sum of the per-token z-loss terms (``optim.z_loss``; 0 when off)

    @classmethod
    def zeros(cls, num_tasks: int, device: torch.device) -> StepSums:
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z(num_tasks), z(num_tasks), z())

    def add(self, per_token: torch.Tensor, targets: torch.Tensor, task_ids: torch.Tensor,
            z_loss: torch.Tensor | None = None) -> None:
        """One micro-batch: ``per_token`` losses ``[N]`` (0 where the target is ignored), ``targets`` and
        ``task_ids`` ``[B, S]`` on the device; ``z_loss`` the per-token z-loss terms ``[N]`` when on."""
        tok = per_token.detach().double()
        loss = tok.sum()
        finite = torch.isfinite(loss)
        if z_loss is not None:
            zsum = z_loss.detach().double().sum()
            finite = finite & torch.isfinite(zsum)
            self.z_loss += torch.where(finite, zsum, torch.zeros_like(zsum))
        # a non-finite micro-batch adds nothing: the all-reduce must not turn the other ranks' sums into nan
        self.loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.nonfinite = torch.maximum(self.nonfinite, (~finite).double())
        valid = targets.reshape(-1) != IGNORE_INDEX
        tid = torch.where(valid, task_ids.reshape(-1), torch.zeros_like(task_ids.reshape(-1)))
        self.task_loss.index_add_(0, tid, torch.where(valid, tok, torch.zeros_like(tok)))
        self.task_targets.index_add_(0, tid, valid.double())


@dataclass(frozen=True)
class Agreement:
    """What every rank knows after a step's one all-reduce and copy to the host."""

    loss_sum: float  # over every rank's target tokens (0 contributed by a rank whose loss was not finite)
    nonfinite_loss: bool  # some rank's loss was inf or nan
    grad_norm: float  # global gradient norm before clipping (inf/nan as computed)
    stop: bool  # some rank got SIGTERM/SIGUSR1
    tokens: int  # non-padding tokens of the step, every rank
    next_targets: int  # target tokens of the next step's micro-batches, every rank
    next_missing: bool  # some rank has no (complete) next step: its data ended
    task_loss_sum: tuple[float, ...]
    task_targets: tuple[int, ...]
    z_loss_sum: float = 0.0  # sum of the z-loss terms over every rank's target tokens


def agree(engine: Any, sums: StepSums, grad_norm: torch.Tensor, *, stop: bool, tokens: int, next_targets: int,
          next_missing: bool, host: Callable[[torch.Tensor], list[float]] = to_host) -> Agreement:
    """Sum ``sums`` and this rank's host numbers over the ranks (one all-reduce), then copy the result and the
    gradient norm to the host (one sync, through ``host``). Collective."""
    num_tasks = sums.task_loss.numel()
    local = torch.tensor([float(stop), float(tokens), float(next_targets), float(next_missing)], dtype=torch.float64)
    vec = torch.cat([sums.loss.view(1), sums.nonfinite.view(1), sums.task_loss, sums.task_targets,
                     local.to(sums.loss.device, non_blocking=True), sums.z_loss.view(1)])
    vec = engine.all_reduce(vec, "sum")
    got = host(torch.cat([vec, grad_norm.detach().double().view(1).to(vec.device)]))
    loss, bad = got[0], got[1]
    task_loss, task_targets = got[2:2 + num_tasks], got[2 + num_tasks:2 + 2 * num_tasks]
    stop_, tok, nxt, missing, zsum, norm = got[2 + 2 * num_tasks:]
    return Agreement(loss_sum=loss, nonfinite_loss=bad > 0, grad_norm=norm, stop=stop_ > 0, tokens=round(tok),
                     next_targets=round(nxt), next_missing=missing > 0, task_loss_sum=tuple(task_loss),
                     task_targets=tuple(round(c) for c in task_targets), z_loss_sum=zsum)


def host_counts(micros: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """``(target tokens, non-padding tokens)`` of micro-batches, from the loader's host numbers."""
    return sum(int(m["num_targets"]) for m in micros), sum(int(m["num_tokens"]) for m in micros)
