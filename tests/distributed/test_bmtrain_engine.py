"""BMTrain engine.

On CPU: the engine runs against a fake ``bmtrain`` whose every callable first binds its arguments to
the REAL BMTrain 1.0.1 signature (so a wrong keyword or a missing symbol fails here), then does the
single-process equivalent. The training parity test then checks the engine's own logic (layer
replacement, param groups, loss normalisation, clipping, state-dict keys, optimizer files).
With CUDA: the real thing, one process, against the plain-torch reference.
"""

from __future__ import annotations

import inspect
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed.test_fsdp_engine import (
    LR,
    MAX_NORM,
    TinyLM,
    assert_sd_close,
    engine_step,
    free_port,
    make_batches,
    make_meta_model,
    param_groups,
    reference_run,
)

bmtrain = pytest.importorskip("bmtrain")


def checked(real, impl):
    """``impl`` behind a check that the call also binds to ``real``'s signature."""
    sig = inspect.signature(real)

    def call(*args, **kwargs):
        sig.bind(*args, **kwargs)
        return impl(*args, **kwargs)

    return call


def _bind_init(real_cls, args, kwargs):
    init = real_cls.__new__ if "__new__" in real_cls.__dict__ else real_cls.__init__
    inspect.signature(init).bind(None, *args, **kwargs)


def make_fake_bmt(calls: list[str]):
    """A CPU, world-size-1 stand-in for ``bmtrain`` that validates every call against the real API."""
    real = bmtrain
    bmt = types.SimpleNamespace()
    bmt.config = {"local_rank": 0, "comm": object(), "rank": 0}

    def init_distributed(init_method="env://", seed=0, pipe_size=-1, num_micro_batches=None, tp_size=1):
        calls.append("init_distributed")
        torch.manual_seed(seed)

    bmt.init_distributed = checked(real.init_distributed, init_distributed)
    bmt.rank = checked(real.rank, lambda: 0)
    bmt.world_size = checked(real.world_size, lambda: 1)
    bmt.synchronize = checked(real.synchronize, lambda: calls.append("synchronize"))

    class DistributedParameter(nn.Parameter):
        def __new__(cls, data, *args, **kwargs):
            _bind_init(real.DistributedParameter, (data, *args), kwargs)
            return nn.Parameter._make_subclass(cls, data, kwargs.get("requires_grad", True))

    class DistributedModule(nn.Module):
        pass

    class Block(nn.Module):
        """Returns the inner module itself: names and forward are unchanged, as with the real Block."""

        def __new__(cls, inner_module, *args, **kwargs):
            _bind_init(real.Block, (inner_module, *args), kwargs)
            for p in inner_module.parameters():  # the real Block refuses plain parameters
                assert isinstance(p, DistributedParameter), "Block needs DistributedParameter everywhere"
            calls.append(f"Block(use_checkpoint={kwargs.get('use_checkpoint')}, zero_level={kwargs.get('zero_level')})")
            return inner_module

    class TransformerBlockList(nn.ModuleList):
        def __init__(self, modules, num_hidden=1):
            inspect.signature(real.TransformerBlockList.__init__).bind(None, modules, num_hidden)
            super().__init__(modules)

    bmt.DistributedParameter, bmt.DistributedModule = DistributedParameter, DistributedModule
    bmt.Block, bmt.TransformerBlockList = Block, TransformerBlockList

    class AdamOptimizer(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            inspect.signature(real.optim.AdamOptimizer.__init__).bind(None, params, *args, **kwargs)
            super().__init__(params, *args, **kwargs)

    class AdamOffloadOptimizer(AdamOptimizer):
        def __init__(self, params, *args, **kwargs):
            inspect.signature(real.optim.AdamOffloadOptimizer.__init__).bind(None, params, *args, **kwargs)
            torch.optim.AdamW.__init__(self, params, *args, **kwargs)

        def state_dict(self, gather=False):
            return torch.optim.AdamW.state_dict(self)

    class OptimManager:
        def __init__(self, *args, **kwargs):
            inspect.signature(real.optim.OptimManager.__init__).bind(None, *args, **kwargs)
            assert kwargs.get("grad_scale") == 1, "grad_scale must be 1: gradients are summed over ranks"
            self.loss_scale, self.loss_scale_enabled, self.optimizers = 1, False, []

        def add_optimizer(self, *args, **kwargs):
            inspect.signature(real.optim.OptimManager.add_optimizer).bind(self, *args, **kwargs)
            self.optimizers.append(args[0])

        def backward(self, *args, **kwargs):
            inspect.signature(real.optim.OptimManager.backward).bind(self, *args, **kwargs)
            args[0].backward()

        def clip_grad_norm(self, *args, **kwargs):
            b = inspect.signature(real.optim.OptimManager.clip_grad_norm).bind(self, *args, **kwargs)
            params = [p for g in b.arguments["param_groups"] for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(params, b.arguments["max_norm"])

        def step(self):
            for o in self.optimizers:
                o.step()

        def zero_grad(self):
            for o in self.optimizers:
                o.zero_grad(set_to_none=False)

    bmt.optim = types.SimpleNamespace(AdamOptimizer=AdamOptimizer, AdamOffloadOptimizer=AdamOffloadOptimizer,
                                      OptimManager=OptimManager)

    class FusedCrossEntropy(nn.Module):
        def __init__(self, *args, **kwargs):
            inspect.signature(real.loss.FusedCrossEntropy.__init__).bind(None, *args, **kwargs)
            super().__init__()
            self.kw = kwargs

        def forward(self, x, target):
            return F.cross_entropy(x.float(), target, ignore_index=self.kw["ignore_index"],
                                   reduction=self.kw["reduction"])

    bmt.loss = types.SimpleNamespace(FusedCrossEntropy=FusedCrossEntropy)
    all_reduce = checked(real.distributed.all_reduce, lambda x, op="sum", comm=None: x.clone())
    bmt.distributed = types.SimpleNamespace(all_reduce=all_reduce)

    def save_to_rank0(model, destination=None, prefix=""):
        return model.state_dict(prefix=prefix)

    bmt.store = types.SimpleNamespace(
        _save_to_rank0=checked(real.store._save_to_rank0, save_to_rank0),
        allgather_objects=checked(real.store.allgather_objects, lambda obj: [obj]),
        broadcast_object=checked(real.store.broadcast_object, lambda obj, comm, src=0: obj),
    )
    return bmt


def test_every_bmt_symbol_used_exists():
    src = Path(__file__).resolve().parents[2] / "fm" / "distributed" / "bmtrain.py"
    import re

    used = set(re.findall(r"\bbmt\.([A-Za-z_][\w.]*)", src.read_text()))
    assert used, "pattern found nothing"
    for dotted in sorted(used):
        obj = bmtrain
        for part in dotted.split("."):
            obj = getattr(obj, part)  # AttributeError names the missing symbol


@pytest.fixture
def fake_engine(tmp_path):
    from fm.distributed.bmtrain import BMTrainEngine

    calls: list[str] = []
    engine = BMTrainEngine(seed=1, bmt=make_fake_bmt(calls), device="cpu")
    engine.init()
    return engine, calls


def test_engine_logic_matches_reference_on_fake_bmt(fake_engine, tmp_path):
    engine, calls = fake_engine
    torch.manual_seed(0)
    init_sd = TinyLM().state_dict()
    model = engine.shard(make_meta_model(), state_dict=init_sd, activation_checkpointing=True)
    assert calls.count("Block(use_checkpoint=True, zero_level=3)") == 3
    assert isinstance(model.encoder.layers, engine.bmt.TransformerBlockList)
    assert isinstance(model.input_embedding, engine.bmt.DistributedModule)  # root params distributed, tie kept
    assert all(isinstance(p, engine.bmt.DistributedParameter) for p in model.parameters())
    assert engine.param_shapes["encoder.layers.0.w_in.weight"] == (2 * 16, 16)
    assert model.emb_scale.item() == 2.0  # non-persistent buffer restored by init_weights
    engine.build_optimizer(param_groups(model), lr=LR, eps=1e-8)
    stats = [engine_step(engine, model, b) for b in make_batches()]
    ref_stats, ref_states = reference_run(init_sd, make_batches())
    assert [x for s in stats for x in s] == pytest.approx([x for s in ref_stats for x in s], rel=1e-5)
    sd = engine.model_state_dict()
    assert_sd_close(sd, ref_states[-1])
    assert engine.all_reduce(3) == 3.0 and engine.all_gather_object("x") == ["x"]
    assert engine.broadcast_object("y") == "y"
    assert engine.clip_grad_norm(0.0) == 0.0  # no grads after zero_grad; max_norm 0 only measures

    # per-rank optimizer files and a model file round-trip
    engine.save_model(tmp_path / "m.pt")
    engine.save_optimizer(tmp_path / "opt")
    assert (tmp_path / "opt" / "rank-0-of-1.pt").is_file()
    before = engine.optimizer.state_dict()
    engine.optimizer.state.clear()
    engine.load_optimizer(tmp_path / "opt")
    after = engine.optimizer.state_dict()
    for k, st in before["state"].items():
        for name, t in st.items():
            torch.testing.assert_close(after["state"][k][name], t)
    engine.load_model(tmp_path / "m.pt")
    assert_sd_close(engine.model_state_dict(), sd)
    with pytest.raises(KeyError, match="missing"):
        engine.load_model({"input_embedding.weight": sd["input_embedding.weight"]})


def test_optimizer_world_size_mismatch_message(fake_engine, tmp_path):
    engine, _ = fake_engine
    model = engine.shard(make_meta_model())
    engine.build_optimizer(param_groups(model), lr=LR)
    (tmp_path / "opt").mkdir()
    torch.save({}, tmp_path / "opt" / "rank-0-of-2.pt")
    with pytest.raises(FileNotFoundError, match="same world size"):
        engine.load_optimizer(tmp_path / "opt")


def test_gathered_format_needs_offload(tmp_path):
    from fm.distributed.bmtrain import BMTrainEngine

    engine = BMTrainEngine(bmt=make_fake_bmt([]), device="cpu", optimizer_format="gathered")
    engine.init()
    model = engine.shard(make_meta_model())
    with pytest.raises(ValueError, match="offload=True"):
        engine.build_optimizer(param_groups(model), lr=LR)
    engine.build_optimizer(param_groups(model), lr=LR, offload=True)
    engine.save_optimizer(tmp_path / "opt")
    assert (tmp_path / "opt" / "gathered.pt").is_file()
    engine.load_optimizer(tmp_path / "opt")


def test_auto_picks_fsdp_without_cuda():
    from fm.distributed import build_engine, resolve_engine_name

    if not torch.cuda.is_available():
        assert resolve_engine_name("auto") == "fsdp"
        assert build_engine("auto").name == "fsdp"
    with pytest.raises(ValueError, match="auto, bmtrain or fsdp"):
        resolve_engine_name("deepspeed")


# ---------------------------------------------------------------- the real BMTrain (GPU hosts)
def _gpu_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from fm.distributed import build_engine

    engine = build_engine("bmtrain", seed=1)
    engine.init()
    init_sd = torch.load(Path(tmp) / "init.pt")
    model = engine.shard(make_meta_model(), state_dict=init_sd, activation_checkpointing=True)
    # bmt's fp32 Adam path applies coupled (L2) weight decay: compare without decay.
    groups = [{**g, "weight_decay": 0.0} for g in param_groups(model)]
    engine.build_optimizer(groups, lr=LR, eps=1e-8)
    stats = []
    for b in make_batches():
        stats.append(engine_step(engine, model, {k: v.cuda() for k, v in b.items()}))
    torch.save({"stats": stats, "final": engine.model_state_dict()}, Path(tmp) / "bmt.pt")


@pytest.mark.gpu
def test_real_bmtrain_single_gpu_matches_reference(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    init_sd = TinyLM().state_dict()
    torch.save(init_sd, tmp_path / "init.pt")
    mp.spawn(_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "bmt.pt")
    model = TinyLM()
    model.load_state_dict(init_sd)
    groups = param_groups(model)
    for g in groups:
        g["lr"], g["weight_decay"] = LR * g.get("lr_scale", 1.0), 0.0
    opt = torch.optim.Adam(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for b, (loss, norm) in zip(make_batches(), got["stats"]):
        out = model(b["inputs"], b["position_ids"])
        ref = F.cross_entropy(out.reshape(-1, out.shape[-1]), b["targets"].reshape(-1), ignore_index=-100)
        ref.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        assert loss == pytest.approx(ref.item(), rel=1e-4)
        assert norm == pytest.approx(ref_norm.item(), rel=1e-4)
    assert_sd_close(got["final"], model.state_dict(), atol=1e-4)
