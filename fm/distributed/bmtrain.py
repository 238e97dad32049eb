"""BMTrain engine (ZeRO-3 on CUDA), written against BMTrain 1.0.1's API.

Each transformer layer is materialised on the GPU, its parameters turned into
``bmt.DistributedParameter`` (every rank keeps its slice) and wrapped as ``bmt.Block`` before the
next layer is touched; the blocks form a ``bmt.TransformerBlockList`` that replaces
``model.encoder.layers``. The model's own loop ``for layer in self.layers: h = layer(h, *args)``
calls the blocks in order, exactly as ``TransformerBlockList.forward`` does, so the model code
needs no hook. Parameters outside the layers (embedding, final norm) become DistributedParameters
of ``DistributedModule`` classes (gathered on access, so the tied head keeps working).

Optimizer: ``bmt.optim.AdamOffloadOptimizer`` (``offload=True``) or ``AdamOptimizer`` under an
``OptimManager`` built with ``grad_scale=1`` so gradients are summed over ranks (the contract in
``base.py``); loss scaling only when ``loss_scale`` is given (fp16).

Optimizer checkpoints: one file per rank (``optimizer/rank-<r>-of-<W>.pt``), which needs the same
world size on resume; with ``optimizer_format="gathered"`` (AdamOffloadOptimizer only) rank 0
writes one whole-state file (``optimizer/gathered.pt``) that loads into any world size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fm.distributed.base import Engine, ModelOrFactory, ReduceOp, Snapshot, StagingBuffers
from fm.distributed.fsdp import _group, cast_parameters, check_keys, load_full_state_dict, materialise

log = logging.getLogger(__name__)

GATHERED_FILE = "gathered.pt"
RANK_FILE = "rank-{rank}-of-{world}.pt"


def distribute_parameters(module: nn.Module, bmt: Any, memo: dict[int, nn.Parameter] | None = None) -> None:
    """Replace every plain parameter under ``module`` by a ``bmt.DistributedParameter`` (shared ones stay shared)."""
    memo = {} if memo is None else memo
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or isinstance(p, bmt.DistributedParameter):
                continue
            if id(p) not in memo:
                memo[id(p)] = bmt.DistributedParameter(p.data, requires_grad=p.requires_grad)
            mod._parameters[name] = memo[id(p)]


def make_distributed_modules(module: nn.Module, bmt: Any, memo: dict[int, nn.Parameter]) -> None:
    """bmt's ``make_distributed`` minus its untying: params → DistributedParameter, classes → DistributedModule.

    ``bmt.BMTrainModelWrapper`` would give a head that shares the embedding's Parameter its own copy.
    Stops at ``TransformerBlockList``/``Block`` (already distributed).
    """
    if isinstance(module, bmt.TransformerBlockList | bmt.Block):
        return
    for name, p in list(module._parameters.items()):
        if p is not None and not isinstance(p, bmt.DistributedParameter):
            if id(p) not in memo:
                memo[id(p)] = bmt.DistributedParameter(p.data, requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
    for child in module._modules.values():
        if child is not None:
            make_distributed_modules(child, bmt, memo)
    if not isinstance(module, bmt.DistributedModule):
        cls = module.__class__
        module.__class__ = type("bmtrain.Distributed" + cls.__name__, (cls, bmt.DistributedModule), {})


def model_state_keys(model: nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` without materialising anything (works on meta models)."""
    keys = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        keys |= {prefix + n for n, p in mod._parameters.items() if p is not None}
        skip = mod._non_persistent_buffers_set
        keys |= {prefix + n for n, b in mod._buffers.items() if b is not None and n not in skip}
    return keys


class BMTrainEngine(Engine):
    """Options: ``seed``, ``loss_scale`` (None: no scaling, for bf16; a number: dynamic fp16 scaling),
    ``zero_level`` (3 or 2), ``optimizer_format`` (``"per_rank"`` or ``"gathered"``), ``bmt`` (a module
    standing in for ``bmtrain``, for tests)."""

    name = "bmtrain"

    def __init__(
        self,
        seed: int = 0,
        loss_scale: float | None = None,
        zero_level: int = 3,
        optimizer_format: Literal["per_rank", "gathered"] = "per_rank",
        bmt: Any = None,
        device: str | None = None,
    ) -> None:
        if optimizer_format not in ("per_rank", "gathered"):
            raise ValueError(f"optimizer_format {optimizer_format!r}: use 'per_rank' or 'gathered'")
        self.seed = seed
        self.loss_scale_init = loss_scale
        self.zero_level = zero_level
        self.optimizer_format = optimizer_format
        self._bmt = bmt
        self._device = torch.device(device) if device is not None else None  # tests: a fake bmt on CPU
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optim_manager: Any = None
        self._keys: set[str] = set()
        self._ce: Any = None
        self._staging = StagingBuffers()

    # ------------------------------------------------------------------ process group
    @property
    def bmt(self) -> Any:
        if self._bmt is None:
            import bmtrain

            self._bmt = bmtrain
        return self._bmt

    def init(self) -> None:
        if self._bmt is None and not torch.cuda.is_available():
            raise RuntimeError("engine 'bmtrain' needs CUDA (BMTrain uses NCCL): use engine 'fsdp' on this machine")
        bmt = self.bmt
        # Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (defaults: one process, localhost:10010),
        # sets the CUDA device and seeds torch/random/numpy.
        bmt.init_distributed(seed=self.seed)
        self._ce = bmt.loss.FusedCrossEntropy(ignore_index=-100, reduction="sum")

    @property
    def rank(self) -> int:
        return int(self.bmt.rank())

    @property
    def world_size(self) -> int:
        return int(self.bmt.world_size())

    @property
    def local_rank(self) -> int:
        return int(self.bmt.config["local_rank"])

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cuda", self.local_rank)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ model
    def shard(
        self,
        model: ModelOrFactory,
        *,
        dtype: torch.dtype | None = None,
        activation_checkpointing: bool = False,
        state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
    ) -> nn.Module:
        bmt = self.bmt
        if not isinstance(model, nn.Module):
            with torch.device("meta"):
                model = model()
        self._param_shapes = {n: p.shape for n, p in model.named_parameters()}
        self._keys = model_state_keys(model)
        sd = load_full_state_dict(state_dict) if state_dict is not None else None
        if sd is not None:
            check_keys(self._keys, set(sd), "shard(state_dict=...)")
        dtype = dtype or torch.float32
        device = self.device
        blocks = []
        for i, layer in enumerate(model.encoder.layers):
            materialise(layer, device, sd, f"encoder.layers.{i}.")
            cast_parameters(layer, dtype)
            distribute_parameters(layer, bmt)  # this rank keeps its slice; the full layer is freed
            blocks.append(bmt.Block(layer, use_checkpoint=activation_checkpointing, zero_level=self.zero_level))
        layers = model.encoder.layers
        model.encoder.layers = nn.ModuleList()  # hide the layers while the root unit is materialised
        try:
            materialise(model, device, sd, "")
            cast_parameters(model, dtype)
        finally:
            model.encoder.layers = layers
        del layers
        model.encoder.layers = bmt.TransformerBlockList(blocks)
        make_distributed_modules(model, bmt, {})
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
        bmt = self.bmt
        if self.optimizer_format == "gathered" and not offload:
            raise ValueError("optimizer_format 'gathered' needs offload=True (bmt AdamOffloadOptimizer)")
        groups = [_group(g, lr, weight_decay) for g in param_groups]
        cls = bmt.optim.AdamOffloadOptimizer if offload else bmt.optim.AdamOptimizer
        self.optimizer = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # grad_scale=1: keep bmt's summed gradients (its default divides the loss by the world size).
        self.optim_manager = bmt.optim.OptimManager(loss_scale=self.loss_scale_init, grad_scale=1)
        self.optim_manager.add_optimizer(self.optimizer)
        return self.optimizer

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = targets.reshape(-1).to(logits.device)
        loss_sum = self._ce(logits.reshape(-1, logits.shape[-1]), flat).float()
        return loss_sum, (flat != -100).sum()

    def backward(self, loss: torch.Tensor) -> None:
        if self.optim_manager is None:
            loss.backward()
        else:
            self.optim_manager.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> float:
        assert self.optimizer is not None, "call build_optimizer() first"
        # bmt clips whenever max_norm/(norm+eps) < 1, so max_norm <= 0 would zero the grads: measure only.
        limit = max_norm if max_norm > 0 else float("inf")
        norm = self.optim_manager.clip_grad_norm(self.optimizer.param_groups, limit, norm_type=2)
        return float(norm)

    def optimizer_step(self) -> None:
        assert self.optim_manager is not None, "call build_optimizer() first"
        self.settle_snapshots()
        self.optim_manager.step()

    def zero_grad(self) -> None:
        if self.optim_manager is not None:
            self.optim_manager.zero_grad()
        elif self.model is not None:
            self.model.zero_grad()

    @property
    def loss_scale(self) -> float:
        return float(self.optim_manager.loss_scale) if self.optim_manager is not None else 1.0

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, value: float | torch.Tensor, op: ReduceOp = "sum") -> float | torch.Tensor:
        if op not in ("sum", "max", "min"):
            raise ValueError(f"all_reduce op {op!r} is not one of ['max', 'min', 'sum']")
        if isinstance(value, torch.Tensor):
            out = self.bmt.distributed.all_reduce(value.detach().to(self.device, copy=True), op=op)
            return out.to(value.device)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.bmt.distributed.all_reduce(t, op=op)[0])

    def all_gather_object(self, obj: Any) -> list[Any]:
        return list(self.bmt.store.allgather_objects(obj))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.bmt.store.broadcast_object(obj, self.bmt.config["comm"], src=src)

    def barrier(self) -> None:
        self.bmt.synchronize()

    # ------------------------------------------------------------------ checkpoints
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered unit by unit (root, then each block) so rank 0 holds at most one layer on the GPU."""
        assert self.model is not None, "call shard() first"
        save_to_rank0 = self.bmt.store._save_to_rank0  # what bmt.save uses; returns the dict instead of writing
        self._sync()
        out: dict[str, torch.Tensor] = {}
        blocks = self.model.encoder.layers
        self.model.encoder._modules["layers"] = nn.ModuleList()
        try:
            root = save_to_rank0(self.model)
        finally:
            self.model.encoder._modules["layers"] = blocks
        if self.is_main:
            out.update({k: v.detach().cpu() for k, v in root.items()})
        for i, block in enumerate(blocks):
            part = save_to_rank0(block, prefix=f"encoder.layers.{i}.")
            if self.is_main:
                out.update({k: v.detach().cpu() for k, v in part.items()})
        return out

    def load_model(self, path_or_state: str | Path | Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Every rank reads the file memory-mapped (shared page cache) and copies its slices."""
        assert self.model is not None, "call shard() first"
        self.settle_snapshots()
        sd = dict(load_full_state_dict(path_or_state))
        if strict:
            check_keys(self._keys, set(sd), "load_model")
        result = self.model.load_state_dict(sd, strict=strict)
        self._sync()
        if strict and (result.missing_keys or result.unexpected_keys):
            raise KeyError(f"load_model: missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")

    def snapshot_optimizer(self) -> Snapshot:
        assert self.optimizer is not None, "call build_optimizer() first"
        self._sync()
        om = self.optim_manager
        meta = {"format": self.optimizer_format, "world_size": self.world_size, "rank": self.rank,
                "loss_scale": om.loss_scale, "loss_scale_enabled": om.loss_scale_enabled}
        if self.optimizer_format == "gathered":
            state = self.optimizer.state_dict(True)  # collective all-gather of every rank's slices (is_whole)
            return Snapshot.ready({**meta, "optimizer": state} if self.is_main else {})
        # live state tensors: copied to CPU later (before the next step at the latest)
        return self._defer(self.optimizer.state_dict(),
                           lambda st: {**meta, "optimizer": self._staging.stage("optimizer", st)})

    def release_snapshot(self, kind: str) -> None:
        self._staging.release(kind)

    def write_optimizer(self, snapshot: Snapshot, directory: str | Path) -> None:
        from fm.io import atomic_torch_save

        snapshot = snapshot.get()
        if not snapshot:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if snapshot["format"] == "gathered":
            atomic_torch_save(snapshot, directory / GATHERED_FILE)
        else:
            atomic_torch_save(snapshot, directory / RANK_FILE.format(rank=self.rank, world=self.world_size))

    def save_optimizer(self, directory: str | Path) -> None:
        try:
            self.write_optimizer(self.snapshot_optimizer(), directory)
        finally:
            self.release_snapshot("optimizer")
        self.barrier()

    def load_optimizer(self, directory: str | Path) -> None:
        assert self.optimizer is not None, "call build_optimizer() first"
        directory = Path(directory)
        gathered = directory / GATHERED_FILE
        mine = directory / RANK_FILE.format(rank=self.rank, world=self.world_size)
        if gathered.is_file():
            path = gathered
            if not isinstance(self.optimizer, self.bmt.optim.AdamOffloadOptimizer):  # only it slices whole state
                raise ValueError(f"{gathered} is a gathered optimizer state: it loads with offload=True only")
        elif mine.is_file():
            path = mine
        else:
            saved = sorted(p.name for p in directory.glob("rank-*-of-*.pt")) if directory.is_dir() else []
            raise FileNotFoundError(
                f"no optimizer state for rank {self.rank} of {self.world_size} in {directory} (found {saved[:4]}): "
                "bmtrain per-rank optimizer state resumes only with the same world size; resume with the saved "
                "world size, or load the model only (only_load_model) and restart the optimizer"
            )
        self.settle_snapshots()
        snap = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.optim_manager.loss_scale = snap["loss_scale"]
        self.optim_manager.loss_scale_enabled = snap["loss_scale_enabled"]

    def shutdown(self) -> None:
        # BMTrain 1.0.1 has no teardown call; its NCCL communicators live until the process exits.
        pass
