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
``base.py``). fp16 parameters get dynamic loss scaling (from 2**20, halved on overflow, doubled after
1024 clean steps); other dtypes none.

Optimizer checkpoints: one file per rank (``optimizer/rank-<r>-of-<W>.pt``) holding the rank's
slice of every parameter's state and where that slice lies in the full parameter. Resuming with the
same world size loads the rank's own file; with another world size every rank memory-maps the saved
files and copies out only the elements of its new slices, so no rank ever holds the whole state.

Without CUDA the engine refuses to start (use ``engine: fsdp`` on the CPU), unless the ``bmtrain`` it imports says
it runs on the CPU: the test suite's CPU backend (``tests/support/bmtrain_cpu``, not shipped) loads BMTrain's own
code that way and marks its modules ``__fm_cpu_backend__``; docs/engines.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm.constants import IGNORE_INDEX
from fm.distributed.base import Engine, ModelOrFactory, ReduceOp, Snapshot, StagingBuffers
from fm.distributed.fsdp import (
    _group,
    cast_parameters,
    check_keys,
    clip_coefficient,
    load_full_state_dict,
    materialise,
)

log = logging.getLogger(__name__)

RANK_FILE = "rank-{rank}-of-{world}.pt"
FP16_LOSS_SCALE = 2.0**20  # BMTrain's examples and upstream fp16 runs start dynamic scaling here


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


def local_range(p: torch.Tensor) -> tuple[int, int]:
    """Where this rank's slice of a DistributedParameter lies in the flattened full parameter."""
    start = getattr(p, "_start_partition", None)
    return (0, 0) if start is None or p.numel() == 0 else (int(start), int(start) + p.numel())


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU in a storage of its own. A block's gathered parameters are views of one buffer; copied
    from a GPU they come apart, but on the CPU ``.cpu()`` would keep the views (and save the whole buffer)."""
    t = t.detach().cpu()
    return t if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 else t.clone()


NEEDS_CUDA = ("engine 'bmtrain' needs CUDA (BMTrain runs on NVIDIA GPUs and communicates with NCCL) and this "
              "machine has none: use engine: fsdp here (it trains on the CPU with gloo)")


def _runs_on_cpu() -> bool:
    """False with CUDA. Without it, True only when the ``bmtrain`` imported runs on the CPU (its modules carry
    ``__fm_cpu_backend__``: the test suite's CPU backend loaded them); otherwise :data:`NEEDS_CUDA`."""
    if torch.cuda.is_available():
        return False
    try:
        import bmtrain
    except Exception as exc:  # the released BMTrain fails to import without CUDA's libraries
        raise RuntimeError(NEEDS_CUDA) from exc
    if not getattr(bmtrain, "__fm_cpu_backend__", False):
        raise RuntimeError(NEEDS_CUDA)
    return True


class BMTrainEngine(Engine):
    """Options: ``seed``, ``loss_scale`` (initial dynamic loss scale for fp16; default 2**20; only fp16 scales),
    ``zero_level`` (3, or 2 to keep gathered parameters from forward to backward)."""

    name = "bmtrain"

    def __init__(self, seed: int = 0, loss_scale: float | None = None, zero_level: int = 3) -> None:
        if zero_level not in (2, 3):
            raise ValueError(f"zero_level {zero_level}: BMTrain supports 2 or 3")
        self.seed = seed
        self.loss_scale_init = loss_scale
        self.zero_level = zero_level
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optim_manager: Any = None
        self._device: torch.device | None = None
        self._dtype = torch.float32
        self._ce: Any = None
        self._staging = StagingBuffers()

    # ------------------------------------------------------------------ process group
    @property
    def bmt(self) -> Any:
        import bmtrain

        return bmtrain

    def init(self) -> None:
        cpu = _runs_on_cpu()
        bmt = self.bmt
        # Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (defaults: one process, localhost:10010),
        # sets the CUDA device, pins each local rank to its share of the CPU cores and seeds torch/random/numpy.
        bmt.init_distributed(seed=self.seed)
        self._device = torch.device("cpu") if cpu else torch.device("cuda", self.local_rank)
        self._ce = bmt.loss.FusedCrossEntropy(ignore_index=IGNORE_INDEX, reduction="none")

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
        assert self._device is not None, "call init() first"
        return self._device

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
        checkpoint_every: int = 1,
        offload: bool = False,
        compile: bool = False,
    ) -> nn.Module:
        del offload  # BMTrain offloads the optimizer: build_optimizer(offload=True)
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        bmt = self.bmt
        if not isinstance(model, nn.Module):
            with torch.device("meta"):
                model = model()
        self._param_shapes = {n: p.shape for n, p in model.named_parameters()}
        self._state_keys = model_state_keys(model)
        sd = load_full_state_dict(state_dict) if state_dict is not None else None
        if sd is not None:
            check_keys(self._state_keys, set(sd), "shard(state_dict=...)")
        self._dtype = dtype = dtype or torch.float32
        device = self.device
        blocks = []
        for i, layer in enumerate(model.encoder.layers):
            materialise(layer, device, sd, f"encoder.layers.{i}.")
            cast_parameters(layer, dtype)
            distribute_parameters(layer, bmt)  # this rank keeps its slice; the full layer is freed
            if compile:  # the layer inside the bmt.Block, in place (names stay): Block's hooks run around it
                layer.compile()
            use_checkpoint = activation_checkpointing and i % checkpoint_every == 0
            blocks.append(bmt.Block(layer, use_checkpoint=use_checkpoint, zero_level=self.zero_level))
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
        groups = [_group(g, lr, weight_decay) for g in param_groups]
        if self._dtype == torch.float32:
            # BMTrain's fp32 path is torch's Adam, which adds the decay to the gradient (L2); its fp16/bf16
            # kernels decay the weights (AdamW). The engine decays fp32 weights itself (optimizer_step), so
            # every dtype is AdamW, as the Engine contract says.
            for g in groups:
                g["decoupled_weight_decay"], g["weight_decay"] = g["weight_decay"], 0.0
        cls = bmt.optim.AdamOffloadOptimizer if offload else bmt.optim.AdamOptimizer
        self.optimizer = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.optimizer._fm_offload = offload  # type: ignore[attr-defined]
        loss_scale = self.loss_scale_init
        if self._dtype != torch.float16:
            if loss_scale is not None:
                raise ValueError(f"loss_scale is for fp16 parameters; the model is {self._dtype}")
        elif loss_scale is None:
            loss_scale = FP16_LOSS_SCALE
        # grad_scale=1: keep bmt's summed gradients (its default divides the loss by the world size).
        self.optim_manager = bmt.optim.OptimManager(loss_scale=loss_scale, grad_scale=1)
        self.optim_manager.add_optimizer(self.optimizer)
        return self.optimizer

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).float()

    def backward(self, loss: torch.Tensor) -> None:
        if self.optim_manager is None:
            loss.backward()
        else:
            self.optim_manager.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """``OptimManager.clip_grad_norm``'s math (the norm of the loss-scaled gradients over every rank's slices,
        ``coef = max_norm·scale / (norm + 1e-6)``), applied on the device: BMTrain's own version tests
        ``coef < 1`` on the host, a sync per step."""
        assert self.optimizer is not None, "call build_optimizer() first"
        bmt, scale = self.bmt, self.optim_manager.loss_scale
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = torch.zeros(1, dtype=torch.float32, device=self.device)
        if grads:
            total += torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
        bmt.nccl.allReduce(total.storage(), total.storage(), "sum", bmt.config["comm"])
        norm = total[0].sqrt()
        if max_norm > 0 and grads:
            torch._foreach_mul_(grads, clip_coefficient(norm, max_norm * scale))
        return norm / scale

    @property
    def scales_loss(self) -> bool:
        return bool(self.optim_manager is not None and self.optim_manager.loss_scale_enabled)

    def optimizer_step(self) -> None:
        """One step; under fp16 loss scaling an overflow (inf/nan gradients) skips it and halves the scale."""
        assert self.optim_manager is not None, "call build_optimizer() first"
        self.settle_snapshots()
        self._decay_fp32_weights()
        self.optim_manager.step()

    @torch.no_grad()
    def _decay_fp32_weights(self) -> None:
        offload = getattr(self.optimizer, "_fm_offload", False)
        for g in self.optimizer.param_groups:
            wd = g.get("decoupled_weight_decay", 0.0)
            if not wd:
                continue
            for p in g["params"]:
                if p.grad is None or not p.requires_grad:
                    continue  # bmt steps only parameters with a gradient; decay what it steps
                state = self.optimizer.state.get(p)
                # The offload optimizer's master copy is state["_param_fp32"] (copied onto p after the step).
                target = state["_param_fp32"] if offload and state else p
                target.mul_(1.0 - g["lr"] * wd)

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
    def model_state_dict(self, keys: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Gathered unit by unit (root, then each block) so rank 0 holds at most one layer on the GPU.

        ``keys``: keep only the names it accepts (e.g. LoRA adapters); every unit is still gathered, since a
        parameter inside a ``bmt.Block`` exists whole only while its block is gathered."""
        assert self.model is not None, "call shard() first"
        save_to_rank0 = self.bmt.store._save_to_rank0  # what bmt.save uses; returns the dict instead of writing
        keep = keys or (lambda _: True)
        self._sync()
        out: dict[str, torch.Tensor] = {}
        blocks = self.model.encoder.layers
        self.model.encoder._modules["layers"] = nn.ModuleList()
        try:
            root = save_to_rank0(self.model)
        finally:
            self.model.encoder._modules["layers"] = blocks
        if self.is_main:
            out.update({k: _own_copy(v) for k, v in root.items() if keep(k)})
        for i, block in enumerate(blocks):
            part = save_to_rank0(block, prefix=f"encoder.layers.{i}.")
            if self.is_main:
                out.update({k: _own_copy(v) for k, v in part.items() if keep(k)})
            del part  # else two gathered layers are alive while the next one is gathered
        return out

    def load_model(self, path_or_state: str | Path | Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Every rank reads the file memory-mapped (shared page cache) and copies its slices."""
        assert self.model is not None, "call shard() first"
        self.settle_snapshots()
        sd = dict(load_full_state_dict(path_or_state))
        if strict:
            check_keys(self._state_keys, set(sd), "load_model")
        result = self.model.load_state_dict(sd, strict=strict)
        self._sync()
        if strict and (result.missing_keys or result.unexpected_keys):
            raise KeyError(f"load_model: missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def snapshot_optimizer(self) -> Snapshot:
        assert self.optimizer is not None, "call build_optimizer() first"
        self._sync()
        om = self.optim_manager
        params = self._params()
        meta = {"format": "per_rank", "world_size": self.world_size, "rank": self.rank, **self._optimizer_kind(),
                "loss_scale": om.loss_scale, "loss_scale_enabled": om.loss_scale_enabled,
                "steps_since_last_scale": om.steps_since_last_scale,
                "ranges": [list(local_range(p)) for p in params],
                "numels": [math.prod(getattr(p, "_original_shape", p.shape)) for p in params]}
        # live state tensors: copied to CPU later (before the next step at the latest)
        return self._defer(self.optimizer.state_dict(),
                           lambda st: {**meta, "optimizer": self._staging.stage("optimizer", st)})

    def release_snapshot(self, kind: str) -> None:
        self._staging.release(kind)

    def write_optimizer(self, snapshot: Snapshot, directory: str | Path) -> list[str]:
        from fm.io import atomic_torch_save

        state = snapshot.get()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = RANK_FILE.format(rank=self.rank, world=self.world_size)
        atomic_torch_save(state, directory / name)
        return [name]

    def save_optimizer(self, directory: str | Path) -> None:
        try:
            self.write_optimizer(self.snapshot_optimizer(), directory)
        finally:
            self.release_snapshot("optimizer")
        self.barrier()

    def load_optimizer(self, directory: str | Path) -> None:
        """This rank's state from a directory of per-rank files saved by any number of ranks."""
        assert self.optimizer is not None, "call build_optimizer() first"
        directory = Path(directory)
        mine = directory / RANK_FILE.format(rank=self.rank, world=self.world_size)
        self.settle_snapshots()
        params = self._params()
        if mine.is_file():
            snap = _load(mine)
            _check_saved_state(snap, self._optimizer_kind(), params, mine)
            if snap["ranges"] != [list(local_range(p)) for p in params]:
                raise ValueError(f"{mine}: the saved slices differ from this rank's: the model changed since the save; "
                                 "resume with only_load_model (weights only)")
            state = snap["optimizer"]
        else:
            snaps = _saved_rank_files(directory, self.world_size)
            snap = snaps[0]
            _check_saved_state(snap, self._optimizer_kind(), params, directory)
            state = reshard_optimizer_state(snaps, params)
            log.info("optimizer state of %d ranks resharded to %d ranks from %s", len(snaps), self.world_size,
                     directory)
        self.optimizer.load_state_dict(state)
        om = self.optim_manager
        om.loss_scale, om.loss_scale_enabled = snap["loss_scale"], snap["loss_scale_enabled"]
        om.steps_since_last_scale = snap.get("steps_since_last_scale", 0)

    def _optimizer_kind(self) -> dict[str, Any]:
        """What the saved state's layout depends on: fp16 moments carry the loss scale, the offload optimizer
        keeps fp32 copies on the host, and fp32 groups carry the engine's decoupled weight decay."""
        return {"dtype": str(self._dtype).removeprefix("torch."),
                "offload": bool(getattr(self.optimizer, "_fm_offload", False))}

    def shutdown(self) -> None:
        # BMTrain 1.0.1 has no teardown call; its NCCL communicators live until the process exits.
        pass


# ---------------------------------------------------------------------------------------- resharding
def _load(path: Path) -> dict[str, Any]:
    from fm.io import load_torch

    return load_torch(path, mmap=True)


def _saved_rank_files(directory: Path, world_size: int) -> list[dict[str, Any]]:
    """Every rank file of a save by another world size (memory-mapped), in rank order."""
    names = sorted(p.name for p in directory.glob("rank-*-of-*.pt")) if directory.is_dir() else []
    worlds = {int(n.rsplit("-of-", 1)[1][:-3]) for n in names}
    if len(worlds) != 1:
        raise FileNotFoundError(f"no bmtrain optimizer state for rank files in {directory} (found {names[:4]}): "
                                "resume with checkpoint.resume.weights_only (only_load_model) or "
                                "checkpoint.resume.rewarm_iters (resume_no_optimze)")
    saved = worlds.pop()
    files = [directory / RANK_FILE.format(rank=r, world=saved) for r in range(saved)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: the optimizer state saved by {saved} ranks lacks {missing[:4]}; "
                                f"this run has {world_size} ranks and needs all {saved} files to reshard")
    return [_load(f) for f in files]


def _check_saved_state(snap: dict[str, Any], kind: dict[str, Any], params: list[torch.Tensor], where: Path) -> None:
    """Refuse optimizer state whose layout or numbers mean something else in this run (nothing would fail:
    the moments would just be wrong)."""
    saved = {k: snap.get(k) for k in kind}
    if saved != kind:
        raise ValueError(f"{where}: the optimizer state was saved with {saved}, this run uses {kind}; the moments "
                         "do not carry over between dtypes or offload settings: resume with "
                         "checkpoint.resume.rewarm_iters (resume_no_optimze: fresh optimizer, lr re-warm) or "
                         "checkpoint.resume.weights_only (only_load_model)")
    numels = [math.prod(getattr(p, "_original_shape", p.shape)) for p in params]
    if snap["numels"] != numels:
        raise ValueError(f"{where}: the saved optimizer state is for {len(snap['numels'])} parameters of other sizes "
                         f"than this model's {len(numels)}: resume with only_load_model (weights only)")


def reshard_optimizer_state(snaps: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
    """The optimizer state dict for this rank's slices, cut from the per-rank files of another world size."""
    first = snaps[0]
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        start, end = local_range(p)
        if end <= start:
            continue
        pieces: dict[str, list[torch.Tensor]] = {}
        step = None
        for snap in snaps:
            s0, s1 = snap["ranges"][i]
            lo, hi = max(start, s0), min(end, s1)
            st = snap["optimizer"]["state"].get(i)
            if hi <= lo or st is None:
                continue
            step = st["step"]
            for key in ("exp_avg", "exp_avg_sq", "_param_fp32"):
                if key in st:
                    pieces.setdefault(key, []).append(st[key][lo - s0:hi - s0])
        if step is None:
            continue  # never stepped
        entry: dict[str, Any] = {"step": step}
        for key, parts in pieces.items():
            entry[key] = torch.cat(parts)
            if entry[key].numel() != end - start:
                raise ValueError(f"optimizer state {key!r} of parameter {i} covers {entry[key].numel()} of the "
                                 f"{end - start} elements this rank needs: the saved files are incomplete")
        state[i] = entry
    return {"state": state, "param_groups": first["optimizer"]["param_groups"], "is_whole": False}
