"""The engine interface: one object that owns the process group, the sharded model and its optimizer.

Two implementations: ``fm.distributed.bmtrain.BMTrainEngine`` (BMTrain ZeRO-3 on CUDA; tested on CPU through
BMTrain's own code by the test suite's backend, ``tests/support/bmtrain_cpu``) and
``fm.distributed.fsdp.FSDPEngine`` (torch FSDP2; CPU/gloo or GPU/nccl). The trainer only talks to this
interface, so the same loop runs on one CPU, under FSDP2 and under BMTrain.

Typical use (the trainer's view)::

    engine = build_engine("auto", seed=cfg.run.seed)
    engine.init()
    model = engine.shard(build_model(cfg_model, device="meta"), dtype=torch.bfloat16,
                         activation_checkpointing=True)
    opt = engine.build_optimizer(param_groups(model), lr=1e-2, eps=1e-8, weight_decay=0.1)
    for micro in batches:                              # grad accumulation: several backward per step
        logits = model(micro["inputs"], micro["position_ids"], micro["cu_seqlens"], micro["max_seqlen"])
        per_token = engine.loss(logits, micro["targets"])   # [N] fp32, 0 where the target is -100
        engine.backward(per_token.sum() / global_token_count)  # count all-reduced by the trainer beforehand
    norm = engine.clip_grad_norm(1.0)                  # a 0-dim device tensor: no host sync
    if math.isfinite(norm.item()):                     # (the trainer reads it with its other step sums)
        engine.optimizer_step()
    engine.zero_grad()

Gradient convention: gradients are SUMMED over ranks (never averaged). Divide the loss by the
GLOBAL number of target tokens of the step (``engine.all_reduce(count)`` over ranks and
accumulation micro-batches) and the update equals a single-process run on the concatenated data.

Learning rate: the trainer sets ``group["lr"]`` on ``engine.optimizer.param_groups`` each step
(both engines return a ``torch.optim.Optimizer``); a group built with ``"lr_scale"`` keeps it as a
key so the scheduler can multiply (muP: hidden matrices use lr / scale_width).
"""

from __future__ import annotations

import abc
import copy
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

ReduceOp = Literal["sum", "max", "min"]
ModelOrFactory = nn.Module | Callable[[], nn.Module]


class Engine(abc.ABC):
    """Distributed engine. Create with ``fm.distributed.build_engine``, then call :meth:`init` once."""

    name: str = "base"
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ process group
    @abc.abstractmethod
    def init(self) -> None:
        """Join the process group (torchrun env vars RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT).

        Without those variables the engine runs as a single process (world size 1). Also seeds
        torch's RNG with the engine's ``seed`` option (the same on every rank, so initial weights agree).
        """

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """Global rank of this process (0 .. world_size-1)."""

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """Number of processes."""

    @property
    @abc.abstractmethod
    def local_rank(self) -> int:
        """Rank on this node (selects the GPU)."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device the model computes on (``cuda:<local_rank>`` or ``cpu``); batches go here."""

    @property
    def is_main(self) -> bool:
        """True on rank 0: the rank that logs and writes single-copy files."""
        return self.rank == 0

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def shard(
        self,
        model: ModelOrFactory,
        *,
        dtype: torch.dtype | None = None,
        activation_checkpointing: bool = False,
        state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
        checkpoint_every: int = 1,
        offload: bool = False,
        compile: bool = False,
    ) -> nn.Module:
        """Materialise and shard ``model`` (preferably built on ``device="meta"``), one layer at a time.

        ``activation_checkpointing`` recomputes a layer's activations in backward; with ``checkpoint_every`` k only
        layers 0, k, 2k, ... are checkpointed (selective: memory for speed). ``offload`` keeps what the engine can
        on the CPU (fsdp: parameters, gradients and optimizer state; bmtrain: the optimizer's, through
        :meth:`build_optimizer`). ``compile`` compiles each transformer layer in place with ``torch.compile`` before it
        is wrapped (fsdp: sharded; bmtrain: put in its ``bmt.Block``).

        Each layer of ``model.encoder.layers`` is moved to the device, initialised with
        ``layer.init_weights()`` and sharded before the next one is touched, so host memory per rank
        stays near one layer. The rest (embedding, final norm, head) is initialised with
        ``model.init_weights()`` semantics and kept in the root unit (tied embeddings keep working).
        ``state_dict`` (a full state dict or the path of a ``.pt`` written by :meth:`save_model`)
        loads weights instead of initialising them. ``dtype`` is the compute/parameter dtype
        (bf16 on GPU; CPU keeps fp32 master weights). Returns the module to call for forward; it
        is also stored as ``engine.model``. Parameter names stay the model's own.
        """

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        """Full (unsharded) shape of every parameter by name, recorded by :meth:`shard`.

        Use it (or the names) to build param groups: after sharding, ``p.shape`` can be a flat local
        slice (bmtrain's DistributedParameter is 1-D), so ``p.ndim`` does not tell matrices from vectors.
        """
        return dict(getattr(self, "_param_shapes", {}))

    @property
    def state_dict_keys(self) -> set[str]:
        """The keys of the full model state dict, recorded by :meth:`shard` (reading them costs no gather)."""
        return set(getattr(self, "_state_keys", set()))

    @abc.abstractmethod
    def build_optimizer(
        self,
        param_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        offload: bool = False,
    ) -> torch.optim.Optimizer:
        """AdamW over ``param_groups`` (``[{"params": [...], "weight_decay": ..., "lr_scale": ...}, ...]``).

        Groups may override ``lr``/``weight_decay``; ``lr_scale`` (default 1.0) is stored in the group
        and the initial group lr is ``lr * lr_scale``. ``offload`` keeps optimizer state on the CPU
        (bmtrain: ``AdamOffloadOptimizer``; fsdp ignores it on CPU). Stored as ``engine.optimizer``.
        """

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy ``[B*S]`` in fp32, 0 where the target is -100 (ignored).

        ``logits`` [B, S, V] (any float dtype), ``targets`` [B, S], both on ``device``. The result carries
        the graph; its sum is this rank's loss sum, and slices of it give per-task sums without a second
        pass over the logits. Local to this rank; no host sync.
        """

    def z_loss(self, logits: torch.Tensor, targets: torch.Tensor, coef: float) -> torch.Tensor:
        """Per-token z-loss ``coef * logsumexp(logits)^2`` ``[B*S]`` in fp32, 0 where the target is -100: what the
        trainer adds to :meth:`loss` with ``optim.z_loss`` on the full-logits path (``engine.loss_chunk`` 0). Carries
        the graph; local to this rank."""
        from fm.nn.loss import z_loss_terms

        return z_loss_terms(logits, targets, coef)

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate (applies the loss scale when fp16 is used). Gradients accumulate and are summed over ranks."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` and return the global L2 norm before clipping, a 0-dim fp32 tensor on ``device``.

        Computed and applied on the device (no host sync). A non-finite norm is returned as is and leaves the
        gradients unscaled; ``max_norm <= 0`` only measures. Every rank returns the same value.
        """

    @abc.abstractmethod
    def optimizer_step(self) -> None:
        """Apply one optimizer step (skips it and lowers the scale on fp16 overflow)."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clear gradients."""

    @property
    def loss_scale(self) -> float:
        """Current loss scale (1.0 unless fp16 loss scaling is on); logged as ``Optimizer/scale``."""
        return 1.0

    @property
    def scales_loss(self) -> bool:
        """True under dynamic loss scaling: non-finite gradients are then an overflow that
        :meth:`optimizer_step` handles (it skips the update and lowers the scale), not a failed step."""
        return False

    # ------------------------------------------------------------------ collectives
    @abc.abstractmethod
    def all_reduce(self, value: float | torch.Tensor, op: ReduceOp = "sum") -> float | torch.Tensor:
        """Reduce over ranks. A Python number returns a float; a tensor returns a new tensor (input untouched)."""

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Picklable object from every rank, in rank order."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    # ------------------------------------------------------------------ checkpoints
    @abc.abstractmethod
    def model_state_dict(self, keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Full (unsharded) state dict on CPU, keys exactly the model's own; ``{}`` on ranks other than 0.

        ``keys`` keeps only the names it accepts (e.g. LoRA adapters). Collective: every rank must call it.
        Used by :meth:`save_model` and by async checkpointing (snapshot now, write later).
        """

    def snapshot_model(self) -> Snapshot:
        """The full model state for an async checkpoint (collective; ``.get()`` is ``{}`` off rank 0).

        The CPU copy may be deferred (see :class:`Snapshot`): the training loop only waits for the
        gather, and for what is left of the copy when it reaches the next :meth:`optimizer_step`.
        """
        return Snapshot.ready(self.model_state_dict())

    def release_snapshot(self, kind: str) -> None:
        """The ``"model"`` or ``"optimizer"`` snapshot has been written: its staging buffers may be reused."""
        del kind  # engines without staging buffers have nothing to release

    def _defer(self, tree: Any, stage: Callable[[Any], Any]) -> Snapshot:
        snap = Snapshot(tree, stage)
        self.__dict__.setdefault("_pending_snapshots", []).append(snap)
        return snap

    def settle_snapshots(self) -> None:
        """Finish deferred snapshot copies; engines call it before anything mutates parameters or optimizer state.

        The time the training loop spent waiting here accumulates in ``snapshot_wait_s``.
        """
        pending = self.__dict__.get("_pending_snapshots") or []
        if not pending:
            return
        t0 = time.perf_counter()
        for snap in pending:
            snap.get()
        pending.clear()
        self.snapshot_wait_s = getattr(self, "snapshot_wait_s", 0.0) + time.perf_counter() - t0

    def save_model(self, path: str | Path) -> None:
        """Write the full state dict as one ``torch.save`` file from rank 0 (collective; atomic rename)."""
        from fm.io import atomic_torch_save

        sd = self.model_state_dict()
        if self.is_main:
            atomic_torch_save(sd, Path(path))
        self.barrier()

    @abc.abstractmethod
    def load_model(self, path_or_state: str | Path | Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a full state dict (:meth:`save_model` file, upstream ``.pt``, or a dict) into the sharded model.

        With ``strict`` missing/unexpected keys raise ``KeyError`` naming them. Collective.
        """

    @abc.abstractmethod
    def save_optimizer(self, directory: str | Path) -> None:
        """Write the optimizer state under ``directory`` (collective; all ranks write their part).

        fsdp: a ``torch.distributed.checkpoint`` directory; bmtrain: one file per rank
        (``rank-<r>-of-<W>.pt``). Both load into any world size.
        """

    @abc.abstractmethod
    def snapshot_optimizer(self) -> Snapshot:
        """This rank's optimizer state for :meth:`write_optimizer` (collective; the CPU copy may be deferred)."""

    @abc.abstractmethod
    def write_optimizer(self, snapshot: Snapshot, directory: str | Path) -> list[str]:
        """Write a :meth:`snapshot_optimizer` result under ``directory`` in the :meth:`save_optimizer` format;
        return the names of the files this rank wrote (relative to ``directory``; the checkpoint manifest).

        Safe to call from a background thread (async checkpointing): it never uses the training
        process group. Every rank calls it.
        """

    @abc.abstractmethod
    def load_optimizer(self, directory: str | Path) -> None:
        """Load what :meth:`save_optimizer` wrote (after :meth:`build_optimizer`). Collective."""

    # ------------------------------------------------------------------ misc
    def memory_stats(self) -> dict[str, float]:
        """GiB figures for the step log: ``allocated``/``max_allocated``/``reserved`` on CUDA; on CPU ``rss`` (now)
        and ``max_rss`` (the high-water mark, which never falls: it is not a measure of growth)."""
        g = 1024**3
        if self.device.type == "cuda":
            return {
                "allocated": torch.cuda.memory_allocated(self.device) / g,
                "max_allocated": torch.cuda.max_memory_allocated(self.device) / g,
                "reserved": torch.cuda.memory_reserved(self.device) / g,
            }
        out = {}
        try:
            with open("/proc/self/statm") as f:
                out["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / g
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            pass
        try:
            import resource

            out["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        return out

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Leave the process group (safe to call twice)."""


class StagingBuffers:
    """Reusable CPU copies of state trees for async checkpoints.

    The copy is what the training loop waits for, and copying into memory that is already mapped avoids
    the page faults of fresh allocations (figures: docs/benchmarks-checkpoint.md). A buffer set is reused
    only after :meth:`release` (its previous contents were written); otherwise a fresh copy is made.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Any] = {}
        self._busy: dict[str, bool] = {}

    def stage(self, kind: str, tree: Any) -> Any:
        if self._busy.get(kind, False):
            return copy_tree(tree, None)
        staged = copy_tree(tree, self._bufs.get(kind))
        self._bufs[kind], self._busy[kind] = staged, True
        return staged

    def release(self, kind: str) -> None:
        self._busy[kind] = False


def copy_tree(obj: Any, into: Any = None) -> Any:
    """Copy of a state tree with every tensor on CPU (DTensors keep their placements, local shard copied);
    tensors of ``into`` with the same shape and dtype are overwritten instead of allocated."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        local = obj.to_local().detach()
        buf = into._local_tensor if isinstance(into, DTensor) else None
        if (buf is not None and buf.shape == local.shape and buf.dtype == local.dtype and buf.device.type == "cpu"
                and into.device_mesh == obj.device_mesh and into.placements == obj.placements):
            buf.copy_(local)
            return into
        # As torch's own DCP staging does: a DTensor whose local shard lives on the CPU (from_local would
        # move it back to the mesh's device).
        return obj.detach().to("cpu") if obj.device.type != "cpu" else copy.deepcopy(obj.detach())
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (isinstance(into, torch.Tensor) and into.shape == src.shape and into.dtype == src.dtype
                and into.device.type == "cpu"):
            return into.copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: copy_tree(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        old = into if isinstance(into, list | tuple) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(copy_tree(v, o) for v, o in zip(obj, old))
    return obj


class Snapshot:
    """State captured for a checkpoint, copied to CPU on the first :meth:`get`.

    An async save calls ``get()`` first thing in its background thread; the engine calls it (via
    ``settle_snapshots``) before the next optimizer step or load mutates the state, so the copy
    overlaps the next forward/backward instead of stalling the loop. Thread-safe.
    """

    def __init__(self, tree: Any = None, stage: Callable[[Any], Any] | None = None) -> None:
        self._tree, self._stage = tree, stage
        self._lock = threading.Lock()
        self._value: Any = None
        self._done = stage is None
        if stage is None:
            self._value, self._tree = tree, None

    @classmethod
    def ready(cls, value: Any) -> Snapshot:
        return cls(value)

    def get(self) -> Any:
        with self._lock:
            if not self._done:
                self._value = self._stage(self._tree)  # type: ignore[misc]
                self._tree, self._stage, self._done = None, None, True
            return self._value
