"""torch FSDP2 engine: ``fully_shard`` per transformer layer and at the root; gloo on CPU, nccl on GPU.

Layers are materialised from the meta device and sharded one at a time (host memory per rank stays
near one layer). Parameter names never change (activation checkpointing patches ``forward`` instead
of wrapping the module), so full state dicts carry the model's own keys. Optimizer state is saved
with ``torch.distributed.checkpoint`` and reshards to any world size on load.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from fm.constants import IGNORE_INDEX
from fm.distributed.base import Engine, ModelOrFactory, ReduceOp, Snapshot, StagingBuffers, copy_tree

log = logging.getLogger(__name__)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def load_full_state_dict(src: Mapping[str, torch.Tensor] | str | Path) -> Mapping[str, torch.Tensor]:
    """A full state dict from a mapping or a ``.pt`` path (memory-mapped: pages load on use, shared between ranks)."""
    if isinstance(src, Mapping):
        return src
    from fm.io import load_torch

    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {path} does not exist: pass the fm9g_live_checkpoint-<step>.pt file")
    sd = load_torch(path, mmap=True)
    if not isinstance(sd, Mapping):
        raise TypeError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def check_keys(expected: set[str], got: set[str], where: str) -> None:
    """Raise ``KeyError`` naming missing/unexpected keys (first 10 of each)."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise KeyError(
            f"{where}: state dict keys do not match the model: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}); pass strict=False to load a subset"
        )


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute ``module``'s activations in backward. Patches ``forward`` so no wrapper renames parameters."""
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters to ``dtype``; buffers (rotary tables, ...) keep theirs."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def materialise(module: nn.Module, device: torch.device, sd: Mapping[str, torch.Tensor] | None, prefix: str) -> None:
    """``to_empty`` + ``init_weights`` (also restores non-persistent buffers), then copy weights from ``sd``."""
    module.to_empty(device=device)
    init = getattr(module, "init_weights", None)
    if init is None:
        raise AttributeError(f"{type(module).__name__} has no init_weights(): the engine needs it to materialise meta")
    with torch.no_grad():
        init()
        if sd is not None:
            for k, t in module.state_dict().items():
                if prefix + k in sd:
                    t.copy_(sd[prefix + k])


class FSDPEngine(Engine):
    """FSDP2 engine. Options: ``seed``, ``backend`` (default nccl on CUDA else gloo), ``cpu_offload``,
    ``reshard_after_forward`` (True: ZeRO-3; False: keep gathered params until backward, ZeRO-2-like)."""

    name = "fsdp"

    def __init__(
        self,
        seed: int = 0,
        backend: str | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        timeout_s: int = 1800,
    ) -> None:
        self.seed = seed
        self.backend = backend
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.timeout_s = timeout_s
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._rank = 0
        self._world = 1
        self._local = 0
        self._device = torch.device("cpu")
        self._owns_pg = False
        self._ckpt_group: Any = None
        self._staging = StagingBuffers()
        self.mesh: Any = None

    # ------------------------------------------------------------------ process group
    def init(self) -> None:
        env = os.environ
        self._local = int(env.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and self.backend != "gloo"
        backend = self.backend or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(self._local)
            self._device = torch.device("cuda", self._local)
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=self.timeout_s)
            # device_id binds NCCL's communicator to this GPU at once (no guessing, no lazy init in a collective)
            bound = {"device_id": self._device} if use_cuda else {}
            if "RANK" in env and "WORLD_SIZE" in env:
                dist.init_process_group(backend, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                        timeout=timeout, **bound)
            else:  # plain `python script.py`: a world of one, no rendezvous needed
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                        **bound)
            self._owns_pg = True
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(self._device.type, (self._world,))
        # Checkpoint writes run collectives from a background thread: give them their own group.
        self._ckpt_group = dist.new_group(backend="gloo")
        torch.manual_seed(self.seed)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def local_rank(self) -> int:
        return self._local

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ model
    def _mp_policy(self, dtype: torch.dtype | None) -> MixedPrecisionPolicy:
        if dtype is None or dtype == torch.float32:
            return MixedPrecisionPolicy()
        if self._device.type == "cpu":
            log.warning("fsdp on CPU computes in fp32 (asked for %s)", dtype)
            return MixedPrecisionPolicy()
        if dtype == torch.float16:
            raise ValueError("engine fsdp does not scale the loss, and fp16 gradients underflow without it: use "
                             "dtype bf16, or engine bmtrain (dynamic fp16 loss scaling)")
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

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
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.cpu_offload = self.cpu_offload or offload
        if not isinstance(model, nn.Module):
            with torch.device("meta"):
                model = model()
        sd = load_full_state_dict(state_dict) if state_dict is not None else None
        self._state_keys = set(model.state_dict())
        if sd is not None:
            check_keys(self._state_keys, set(sd), "shard(state_dict=...)")
        kw: dict[str, Any] = {"mesh": self.mesh, "mp_policy": self._mp_policy(dtype)}
        if self.cpu_offload:  # page-locked host copies need an accelerator
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=self._device.type == "cuda")
        self._param_shapes = {n: p.shape for n, p in model.named_parameters()}
        layers = model.encoder.layers
        for i, layer in enumerate(layers):
            materialise(layer, self._device, sd, f"encoder.layers.{i}.")
            cast_parameters(layer, torch.float32)  # fp32 master weights; `dtype` is the compute dtype (MP policy)
            if activation_checkpointing and i % checkpoint_every == 0:
                checkpoint_forward(layer)
            if compile:  # each block before sharding (torchtitan's order); in place, so parameter names stay
                layer.compile()
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **kw)
        # The root unit holds embedding, final norm and (tied) head; hide the layers while materialising it.
        model.encoder.layers = nn.ModuleList()
        try:
            materialise(model, self._device, sd, "")
            cast_parameters(model, torch.float32)
        finally:
            model.encoder.layers = layers
        fully_shard(model, reshard_after_forward=False, **kw)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # gradients are summed over ranks (see base.py)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        self.model = model
        return model

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
        if offload and not self.cpu_offload:
            raise ValueError("fsdp offloads at shard time: call shard(..., offload=True) (or FSDPEngine(cpu_offload="
                             "True)) before build_optimizer(offload=True)")
        groups = [_group(g, lr, weight_decay) for g in param_groups]
        # the fused kernel on CUDA parameters (offloaded ones live on the CPU: foreach there)
        fused = self._device.type == "cuda" and not self.cpu_offload
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           **({"fused": True} if fused else {"foreach": True}))
        return self.optimizer

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none")

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        assert self.model is not None, "call shard() first"
        params = [p for p in self.model.parameters() if p.grad is not None]
        return params, [p.grad for p in params]  # type: ignore[misc]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        _, grads = self._grads()
        if not grads:
            return torch.zeros((), device=self._device)
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=None)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # sums squares over shards: the global norm
        if max_norm > 0:
            torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], clip_coefficient(
                total, max_norm))
        return total.float()

    def optimizer_step(self) -> None:
        assert self.optimizer is not None, "call build_optimizer() first"
        self.settle_snapshots()
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.model is not None:
            self.model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, value: float | torch.Tensor, op: ReduceOp = "sum") -> float | torch.Tensor:
        if op not in _OPS:
            raise ValueError(f"all_reduce op {op!r} is not one of {sorted(_OPS)}")
        if isinstance(value, torch.Tensor):
            t = value.detach().to(self._device, copy=True)
            dist.all_reduce(t, op=_OPS[op])
            return t.to(value.device)
        t = torch.tensor(float(value), dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=_OPS[op])
        return float(t)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _full_state_dict(self) -> tuple[dict[str, torch.Tensor], bool]:
        assert self.model is not None, "call shard() first"
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        live = {p.to_local().data_ptr() if isinstance(p, DTensor) else p.data_ptr() for p in self.model.parameters()}
        # With one rank the "gathered" tensors can be the live parameters themselves.
        return sd, any(v.data_ptr() in live for v in sd.values())

    def model_state_dict(self, keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        if keys is not None:
            return self._selected_parameters(keys)
        sd, aliased = self._full_state_dict()
        if not self.is_main:
            return {}
        return copy_tree(sd) if aliased else sd

    def _selected_parameters(self, keys: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """The chosen parameters only, each gathered on its own (every rank, in the same order)."""
        assert self.model is not None, "call shard() first"
        out = {}
        for name, p in self.model.named_parameters():
            if keys(name):
                full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
                if self.is_main:
                    out[name] = full.detach().to("cpu", copy=True)
        return out

    def snapshot_model(self) -> Snapshot:
        sd, aliased = self._full_state_dict()
        if not self.is_main:
            return Snapshot.ready({})
        if not aliased:
            return Snapshot.ready(sd)  # gathered from other ranks: already a private copy
        return self._defer(sd, lambda t: self._staging.stage("model", t))

    def release_snapshot(self, kind: str) -> None:
        self._staging.release(kind)

    def load_model(self, path_or_state: str | Path | Mapping[str, torch.Tensor], strict: bool = True) -> None:
        assert self.model is not None, "call shard() first"
        self.settle_snapshots()
        sd = dict(load_full_state_dict(path_or_state))
        if strict:
            where = "load_model(dict)" if isinstance(path_or_state, Mapping) else f"load_model({path_or_state})"
            check_keys(self._state_keys, set(sd), where)
        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))

    def snapshot_optimizer(self) -> Snapshot:
        """This rank's shard of the optimizer state; the CPU copy is deferred (see :class:`Snapshot`)."""
        return self._defer(self._optim_sd(), lambda t: {"optimizer": self._staging.stage("optimizer", t)})

    def _optim_sd(self) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None, "call shard() and build_optimizer() first"
        return get_optimizer_state_dict(self.model, self.optimizer)

    def write_optimizer(self, snapshot: Snapshot, directory: str | Path) -> list[str]:
        """Write a :meth:`snapshot_optimizer` result as a DCP directory; may run in a background thread."""
        metadata = dcp.save(snapshot.get(), checkpoint_id=str(directory), process_group=self._ckpt_group)
        # DCP's writer names each rank's data files __<rank>_<n>.distcp; the coordinator writes .metadata.
        mine = {str(info.relative_path) for info in metadata.storage_data.values()
                if str(info.relative_path).startswith(f"__{self._rank}_")}
        return sorted(mine) + ([".metadata"] if self._rank == 0 else [])

    def save_optimizer(self, directory: str | Path) -> None:
        dcp.save({"optimizer": self._optim_sd()}, checkpoint_id=str(directory))

    def load_optimizer(self, directory: str | Path) -> None:
        path = Path(directory)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata): "
                                    "fsdp optimizer state is saved by FSDPEngine.save_optimizer")
        from torch.distributed.checkpoint.api import CheckpointException

        from fm.io import CorruptFileError, UnsafeFileError, load_pickle

        self.settle_snapshots()
        load_pickle(path / ".metadata", _DCP_METADATA_GLOBALS)  # refused here in one line, not inside DCP's report
        state = {"optimizer": self._optim_sd()}  # template with this world size's shards: DCP reshards into it
        try:
            dcp.load(state, storage_reader=SafeDCPReader(path), planner=SafeLoadPlanner(path))
        except CheckpointException as exc:
            inner = [e for e, _ in exc.failures.values()]
            for e in inner:
                if isinstance(e, UnsafeFileError | CorruptFileError):
                    raise e from None
            raise CorruptFileError(f"{path}: the optimizer state could not be read ({type(inner[0]).__name__}: "
                                   f"{str(inner[0]).splitlines()[0] if str(inner[0]) else ''}); the files are "
                                   "truncated or damaged") from exc
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def shutdown(self) -> None:
        if self._owns_pg and dist.is_initialized():
            if self._ckpt_group is not None:
                dist.destroy_process_group(self._ckpt_group)
                self._ckpt_group = None
            dist.destroy_process_group()
        self._owns_pg = False


# What torch.distributed.checkpoint's .metadata pickle holds (checked on the files torch 2.13 writes).
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
}  # fmt: skip


class SafeDCPReader(dcp.FileSystemReader):
    """A torch.distributed.checkpoint directory whose ``.metadata`` pickle may build only checkpoint metadata
    (torch's own reader unpickles it without restriction)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        from fm.io import load_pickle

        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = load_pickle(path, _DCP_METADATA_GLOBALS)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer ``param_groups``, steps) read as plain data: torch's planner unpickles them
    without restriction."""

    def __init__(self, where: str | Path) -> None:
        super().__init__()
        self.where = where

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from fm.io import UnsafeFileError

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(f"{self.where}: the value of {fqn!r} was refused for safety: loading it would run "
                                  "code or build objects an optimizer state does not hold") from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def clip_coefficient(norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``min(1, max_norm / (norm + eps))`` on the device; 1 when the norm is not finite (the gradients stay as
    they are: the trainer skips such a step, and under loss scaling the engine sees the overflow)."""
    coef = torch.clamp(max_norm / (norm.float() + eps), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


def _group(g: dict[str, Any], lr: float, weight_decay: float) -> dict[str, Any]:
    out = dict(g)
    out.setdefault("lr_scale", 1.0)
    out.setdefault("lr", lr * out["lr_scale"])
    out.setdefault("weight_decay", weight_decay)
    return out
