"""BMTrain engine on BMTrain 1.0.1's own code: the CPU backend ``tests/support/bmtrain_cpu`` (gloo for NCCL, torch
ops for the kernels).

Every test here runs the real ``bmtrain`` modules, in spawned processes (the backend changes how
``bmtrain`` imports, so the pytest process never imports it): 2- and 3-rank training equals the
single-process AdamW reference, optimizer state saved by W ranks resumes on W' ranks, fp16 gets
dynamic loss scaling, collectives that disagree fail instead of hanging. The kernel ports are pinned
against torch's own Adam(W) and cross-entropy. With CUDA the same training test runs on NCCL.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.distributed.tinylm import (
    LR,
    VOCAB,
    TinyLM,
    assert_sd_close,
    engine_step,
    free_port,
    make_batches,
    make_meta_model,
    param_groups,
    rank_slice,
    reference_run,
)

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_AT, BATCH = 6, 3, 6  # a global batch of 6 rows splits evenly over 1, 2 and 3 ranks


def _env(rank: int, world: int, port: int, cpu: bool = True) -> None:
    """A spawned worker's rank variables; with ``cpu`` the CPU backend, installed before anything imports bmtrain."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cpu:
        from tests.support.bmtrain_cpu import install

        install()


def _engine(seed: int = 1, **kw):
    from fm.distributed import build_engine

    engine = build_engine("bmtrain", seed=seed, **kw)
    engine.init()
    return engine


# ---------------------------------------------------------------------------------------- training
def _train_worker(rank: int, world: int, port: int, tmp: str, phase: str, cpu: bool) -> None:
    """``first``: load the initial weights, train STEPS steps, saving model + optimizer after SAVE_AT.
    ``resume``: start from that save (written by another world size) and train the remaining steps."""
    _env(rank, world, port, cpu)
    from fm.train.lora import load_base_weights

    d = Path(tmp)
    engine = _engine()
    bmt = engine.bmt
    assert (engine.rank, engine.world_size, engine.device.type) == (rank, world, "cpu" if cpu else "cuda")
    model = engine.shard(make_meta_model(), activation_checkpointing=True)
    assert isinstance(model.encoder.layers, bmt.TransformerBlockList)
    assert all(isinstance(p, bmt.DistributedParameter) for p in model.parameters())
    gathers = []
    real_gather = bmt.nccl.allGather
    bmt.nccl.allGather = lambda *a: (gathers.append(1), real_gather(*a))[1]
    if phase == "first":
        load_base_weights(engine, d / "init.pt")  # reading key names must not gather the model
    else:
        engine.load_model(d / "saved.pt")
    bmt.nccl.allGather = real_gather
    engine.build_optimizer(param_groups(model, engine.param_shapes), lr=LR, eps=1e-8)
    start = 0 if phase == "first" else SAVE_AT
    if phase == "resume":
        engine.load_optimizer(d / "optimizer")
    stats = []
    for step, b in enumerate(make_batches(STEPS, batch=BATCH)[start:], start + 1):
        b = rank_slice(b, rank, world)
        stats.append(engine_step(engine, model, b if cpu else {k: v.cuda() for k, v in b.items()}))
        if phase == "first" and step == SAVE_AT:
            engine.save_model(d / "saved.pt")
            engine.save_optimizer(d / "optimizer")
    final = engine.model_state_dict()
    if rank == 0:
        torch.save({"stats": stats, "final": final, "gathers_while_loading": len(gathers),
                    "keys": sorted(engine.state_dict_keys)}, d / f"{phase}.pt")
    engine.barrier()


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize("first_world,resume_world", [(2, 3), (3, 2)])
def test_training_matches_reference_and_optimizer_reshards(tmp_path, first_world, resume_world):
    torch.manual_seed(0)
    init_sd = TinyLM().state_dict()
    torch.save(init_sd, tmp_path / "init.pt")
    _spawn(_train_worker, first_world, str(tmp_path), "first", True)
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    ref_stats, ref_states = reference_run(init_sd, make_batches(STEPS, batch=BATCH))
    assert first["gathers_while_loading"] == 0
    assert first["keys"] == sorted(init_sd)
    for (loss, norm), (rloss, rnorm) in zip(first["stats"], ref_stats, strict=True):
        assert loss == pytest.approx(rloss, rel=1e-5) and norm == pytest.approx(rnorm, rel=1e-5)
    assert_sd_close(first["final"], ref_states[-1])  # AdamW with decoupled decay, clipping, lr scales, tied head
    saved = sorted(p.name for p in (tmp_path / "optimizer").iterdir())
    assert saved == [f"rank-{r}-of-{first_world}.pt" for r in range(first_world)]
    plain = TinyLM()
    plain.load_state_dict(torch.load(tmp_path / "saved.pt", weights_only=True), strict=True)
    assert_sd_close(plain.state_dict(), ref_states[SAVE_AT - 1])

    _spawn(_train_worker, resume_world, str(tmp_path), "resume", True)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    for (loss, norm), (rloss, rnorm) in zip(resumed["stats"], ref_stats[SAVE_AT:], strict=True):
        assert loss == pytest.approx(rloss, rel=1e-5) and norm == pytest.approx(rnorm, rel=1e-5)
    assert_sd_close(resumed["final"], ref_states[-1])


@pytest.mark.gpu
def test_real_nccl_single_gpu_matches_reference(tmp_path):
    torch.manual_seed(0)
    init_sd = TinyLM().state_dict()
    torch.save(init_sd, tmp_path / "init.pt")
    _spawn(_train_worker, 1, str(tmp_path), "first", False)
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    ref_stats, ref_states = reference_run(init_sd, make_batches(STEPS, batch=BATCH))
    for (loss, norm), (rloss, rnorm) in zip(first["stats"], ref_stats, strict=True):
        assert loss == pytest.approx(rloss, rel=1e-4) and norm == pytest.approx(rnorm, rel=1e-4)
    assert_sd_close(first["final"], ref_states[-1], atol=1e-4)


def _missing_rank_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _env(rank, world, port)
    engine = _engine()
    model = engine.shard(make_meta_model())
    engine.build_optimizer(param_groups(model, engine.param_shapes), lr=LR)
    try:
        engine.load_optimizer(Path(tmp) / "optimizer")
    except FileNotFoundError as exc:
        (Path(tmp) / f"error-{rank}.txt").write_text(str(exc))
    engine.barrier()


def test_incomplete_optimizer_state_names_both_world_sizes(tmp_path):
    (tmp_path / "optimizer").mkdir()
    torch.save({}, tmp_path / "optimizer" / "rank-0-of-3.pt")  # rank-1/2-of-3 missing
    _spawn(_missing_rank_worker, 2, str(tmp_path))
    msg = (tmp_path / "error-0.txt").read_text()
    assert "saved by 3 ranks" in msg and "this run has 2 ranks" in msg and "rank-1-of-3.pt" in msg


def _other_kind_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _env(rank, world, port)
    engine = _engine()
    model = engine.shard(make_meta_model(), state_dict=Path(tmp) / "init.pt")
    engine.build_optimizer(param_groups(model, engine.param_shapes), lr=LR)
    engine_step(engine, model, rank_slice(make_batches(1, batch=4)[0], rank, world))
    engine.save_optimizer(Path(tmp) / "optimizer")
    engine.build_optimizer(param_groups(model, engine.param_shapes), lr=LR, offload=True)
    try:
        engine.load_optimizer(Path(tmp) / "optimizer")
    except ValueError as exc:
        (Path(tmp) / f"error-{rank}.txt").write_text(str(exc))
    engine.barrier()


def test_optimizer_state_of_another_kind_is_refused(tmp_path):
    torch.manual_seed(0)
    torch.save(TinyLM().state_dict(), tmp_path / "init.pt")
    _spawn(_other_kind_worker, 2, str(tmp_path))
    msg = (tmp_path / "error-1.txt").read_text()
    assert "'offload': False" in msg and "'offload': True" in msg and "resume_no_optimze" in msg


# ---------------------------------------------------------------------------------------- fp16
def _fp16_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _env(rank, world, port)
    engine = _engine()
    model = engine.shard(make_meta_model(), dtype=torch.float16, state_dict=Path(tmp) / "init.pt")
    engine.build_optimizer(param_groups(model, engine.param_shapes), lr=LR)
    scales, changed = [engine.loss_scale], []
    for b in make_batches(8, batch=4):
        before = engine.model_state_dict()
        b = rank_slice(b, rank, world)
        per_token = engine.loss(model(b["inputs"], b["position_ids"]), b["targets"])
        engine.backward(per_token.sum() / engine.all_reduce(float((b["targets"] != -100).sum())))
        engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        engine.zero_grad()
        after = engine.model_state_dict()
        scales.append(engine.loss_scale)
        if rank == 0:
            changed.append(any(not torch.equal(before[k], after[k]) for k in before))
    if rank == 0:
        Path(tmp, "fp16.json").write_text(json.dumps({"scales": scales, "changed": changed,
                                                      "scales_loss": engine.scales_loss}))
    engine.barrier()


def test_fp16_scales_the_loss_and_skips_overflowing_steps(tmp_path):
    torch.manual_seed(0)
    torch.save(TinyLM().state_dict(), tmp_path / "init.pt")
    _spawn(_fp16_worker, 2, str(tmp_path))
    res = json.loads((tmp_path / "fp16.json").read_text())
    scales, changed = res["scales"], res["changed"]
    assert res["scales_loss"] and scales[0] == 2.0**20
    # 2**20 overflows fp16 gradients: each overflow skips the update and halves the scale, then steps are taken
    for i, took in enumerate(changed):
        assert scales[i + 1] == (scales[i] if took else scales[i] / 2), (i, scales, changed)
    assert not changed[0] and any(changed) and changed[-1]


# ---------------------------------------------------------------------------------------- nccl
def _nccl_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _env(rank, world, port)
    import bmtrain as bmt

    bmt.init_distributed(seed=0)
    nccl, comm, out = bmt.nccl, bmt.config["comm"], {}
    src = torch.arange(5, dtype=torch.bfloat16) + 10 * rank
    dst = torch.empty(5 * world, dtype=torch.bfloat16)
    nccl.allGather(src.storage(), dst.storage(), comm)
    out["gather"] = dst.tolist()
    x = torch.tensor([rank + 0.5, -rank, 3.0 * rank], dtype=torch.float32)
    nccl.allReduce(x.storage(), x.storage(), "sum", comm)
    out["sum"] = x.tolist()
    y = torch.tensor([rank, -rank], dtype=torch.int64)
    nccl.allReduce(y.storage(), y.storage(), "max", comm)
    out["max"] = y.tolist()
    z = (torch.arange(2 * world, dtype=torch.float16) + rank)
    part = torch.empty(2, dtype=torch.float16)
    nccl.reduceScatter(z.storage(), part.storage(), "sum", comm)
    out["scatter"] = part.tolist()
    b = torch.full((3,), float(rank))
    nccl.broadcast(b.storage(), b.storage(), world - 1, comm)
    out["bcast"] = b.tolist()
    g = torch.zeros(5 * world, dtype=torch.bfloat16)
    nccl.groupStart()
    nccl.allGather(src.storage(), g.storage(), comm)
    out["grouped_before_end"] = g.abs().sum().item()
    nccl.groupEnd()
    out["grouped"] = g.tolist()
    # ranks that disagree (NCCL would hang): every rank raises, naming the counts
    try:
        s = torch.zeros(3 + rank)
        nccl.allGather(s.storage(), torch.zeros((3 + rank) * world).storage(), comm)
        out["mismatch"] = "no error"
    except RuntimeError as exc:
        out["mismatch"] = str(exc)
    # DistributedParameter.gather() of a parameter inside a bmt.Block: the defect the LoRA save had
    lin = torch.nn.Linear(4, 3 + world, bias=True)
    for name, p in list(lin.named_parameters()):
        lin._parameters[name] = bmt.DistributedParameter(p.data)
    block = bmt.Block(lin, use_checkpoint=False)
    full = block.state_dict()["weight"]
    try:
        got = lin.weight.gather()
        out["inblock"] = "equal" if got.shape == full.shape and torch.equal(got, full) else "wrong values"
    except RuntimeError as exc:
        out["inblock"] = str(exc)
    Path(tmp, f"nccl-{rank}.json").write_text(json.dumps(out))
    bmt.synchronize()


@pytest.mark.parametrize("world", [2, 3])
def test_nccl_calls_carried_by_gloo(tmp_path, world):
    _spawn(_nccl_worker, world, str(tmp_path))
    for rank in range(world):
        out = json.loads((tmp_path / f"nccl-{rank}.json").read_text())
        assert out["gather"] == [10.0 * r + i for r in range(world) for i in range(5)]
        assert out["sum"] == [sum(r + 0.5 for r in range(world)), -sum(range(world)), 3.0 * sum(range(world))]
        assert out["max"] == [world - 1, 0]
        assert out["scatter"] == [sum(2 * rank + i + r for r in range(world)) for i in range(2)]
        assert out["bcast"] == [float(world - 1)] * 3
        assert out["grouped_before_end"] == 0 and out["grouped"] == out["gather"]  # NCCL runs a group at its end
        assert "different collectives" in out["mismatch"] and "count=3" in out["mismatch"], out["mismatch"]
        assert out["inblock"] != "equal"  # never silently right: a count mismatch or another tensor's bytes


# ---------------------------------------------------------------------------------------- exit
_EXIT_WORKER = """
import os, sys
sys.path.insert(0, {root!r})
from tests.support import bmtrain_cpu
bmtrain_cpu.install()
import bmtrain as bmt
bmt.init_distributed(seed=0, pipe_size=2)
bmt.synchronize()
"""


def _gloo_worker_threads() -> int:
    return sum(Path(f"/proc/self/task/{t}/comm").read_text().strip() == "pt_gloo_runloop"
               for t in os.listdir("/proc/self/task"))


def _teardown_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _env(rank, world, port)
    import bmtrain as bmt

    bmt.init_distributed(seed=0, pipe_size=2)
    bmt.synchronize()
    before = _gloo_worker_threads()
    bmt.nccl._shutdown_live_groups()  # what runs at exit
    Path(tmp, f"threads-{rank}.json").write_text(json.dumps([before, _gloo_worker_threads()]))


def test_exit_joins_every_gloo_worker_thread(tmp_path):
    """A gloo worker thread that drops the last reference to a finished collective's tensors needs the GIL; once
    the interpreter is finalizing, taking it ends the thread inside a noexcept destructor and the finished worker
    aborts (SIGABRT). So the exit hook destroys every group, which joins its threads while the GIL is free;
    ``shutdown()`` alone leaves gloo's threads running."""
    _spawn(_teardown_worker, 2, str(tmp_path))
    for rank in range(2):
        before, after = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert before > 0 and after == 0, (before, after)


def test_finished_workers_exit_cleanly_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_EXIT_WORKER.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for _ in range(2):  # before the fix: 8 aborts in 8 runs with pipe_size=2
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------- the backend
def _rewritten_nodes(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda" and getattr(node.value, "id", None) == "torch":
            bad.append("torch.cuda")
        shim = isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "_fm_cpu"
        if isinstance(node, ast.Attribute) and node.attr in ("is_cuda", "record_stream", "pin_memory") and not shim:
            bad.append(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            bad.append(".cuda()")
        if isinstance(node, ast.keyword) and node.arg == "device" and getattr(node.value, "value", None) == "cuda":
            bad.append('device="cuda"')
        if isinstance(node, ast.keyword) and node.arg == "pin_memory" and getattr(node.value, "value", None):
            bad.append("pin_memory=True")
    return bad


def test_rewrite_leaves_no_reference_to_the_gpu():
    import importlib.util

    from tests.support import bmtrain_cpu

    root = Path(importlib.util.find_spec("bmtrain").origin).parent
    total = 0
    for rel in bmtrain_cpu.SOURCE_SHA256:
        src = (root / rel).read_text()
        before = _rewritten_nodes(ast.parse(src))
        t = bmtrain_cpu.CudaToCpu()
        after = _rewritten_nodes(t.visit(ast.parse(src)))
        assert after == [], (rel, after)
        total += sum(t.counts.values())
        assert sum(t.counts.values()) >= len(before), rel
    assert total >= 159  # BMTrain 1.0.1 names the GPU 159 times outside the three replaced modules


_CHECK_BACKEND = """
import sys, importlib.metadata
sys.path[:0] = [{shadow!r}]
if {fake_version!r}:
    importlib.metadata.version = lambda name: {fake_version!r}
if {imported_first!r}:
    import types
    sys.modules["bmtrain"] = types.ModuleType("bmtrain")  # as if the real one were imported already
from tests.support import bmtrain_cpu
try:
    bmtrain_cpu.install()
except bmtrain_cpu.BackendError as exc:
    print("REFUSED", exc)
    raise SystemExit(0)
import bmtrain
assert bmtrain.__fm_cpu_backend__ and bmtrain.optim.optim_manager.__fm_cpu_backend__
try:
    bmtrain.C.adam_bf16_launcher
except RuntimeError as exc:
    print("C RAISES", exc)
print("LOADED")
"""


def _check_backend(shadow: str = "", fake_version: str = "", imported_first: bool = False) -> str:
    code = _CHECK_BACKEND.format(shadow=shadow, fake_version=fake_version, imported_first=imported_first)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_backend_runs_only_the_pinned_bmtrain_sources(tmp_path):
    import importlib.util
    import shutil

    out = _check_backend()
    assert "LOADED" in out and "C RAISES bmtrain.C.adam_bf16_launcher" in out
    out = _check_backend(fake_version="1.0.0")
    assert "REFUSED" in out and "runs BMTrain 1.0.1 only; found 1.0.0" in out
    root = Path(importlib.util.find_spec("bmtrain").origin).parent
    shutil.copytree(root, tmp_path / "bmtrain", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    zc = tmp_path / "bmtrain" / "zero_context.py"
    zc.write_text(zc.read_text().replace("partition_size", "partition_size ", 1))
    out = _check_backend(shadow=str(tmp_path))
    assert "REFUSED" in out and "zero_context.py" in out and "sha256" in out


def test_backend_refuses_a_bmtrain_imported_before_it():
    out = _check_backend(imported_first=True)
    assert "REFUSED bmtrain was imported before tests.support.bmtrain_cpu.install()" in out, out


_INIT_ENGINE = """
from fm.distributed.bmtrain import BMTrainEngine
try:
    BMTrainEngine().init()
except RuntimeError as exc:
    print("REFUSED", exc)
"""


def test_bmtrain_engine_without_a_gpu_says_to_use_fsdp():
    """The product has no switch to the CPU backend: without CUDA the engine refuses, whatever the environment
    says (the variable that used to switch the backend on included), and the real bmtrain it tried to import stays
    out of the pytest process (it runs in a subprocess)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the engine runs on it")
    for extra in ({}, {"FM_BMTRAIN_CPU": "1"}):
        res = subprocess.run([sys.executable, "-c", _INIT_ENGINE], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), **extra))
        assert res.returncode == 0, res.stderr
        assert "REFUSED engine 'bmtrain' needs CUDA" in res.stdout and "use engine: fsdp" in res.stdout, res.stdout


# ---------------------------------------------------------------------------------------- kernel ports
def _adamw_reference(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("kernel", ["adam_bf16", "adam_fp16", "adam_cpu_bf16", "adam_cpu_fp16"])
def test_adam_kernel_ports_equal_torch_adamw(kernel):
    from tests.support.bmtrain_cpu import optim_function as K

    torch.manual_seed(0)
    n, lr, wd, scale = 1000, 1e-3, 0.1, (1024.0 if "fp16" in kernel else 1.0)
    low = torch.float16 if "fp16" in kernel else torch.bfloat16
    master = torch.randn(n)
    param = master.to(low)
    m = torch.zeros(n, dtype=torch.float16 if kernel == "adam_fp16" else torch.float32)
    v = torch.zeros(n)
    grads = []
    p0 = master.clone()
    for step in range(1, 4):
        g_low = (torch.randn(n) * 0.01 * scale).to(low)  # the kernels take the scaled gradient
        grads.append(g_low.float() / scale)
        if kernel == "adam_bf16":
            K.adam_bf16(master, param, g_low, m, v, 0.9, 0.95, 1e-8, lr, scale, wd, step)
        elif kernel == "adam_fp16":
            K.adam_fp16(master, param, g_low, m, v, 0.9, 0.95, 1e-8, lr, scale, wd, step)
        else:
            K.adam_cpu(master, param, None, g_low, m, v, 0.9, 0.95, 1e-8, lr, scale, wd, step)
    ref = _adamw_reference(p0, grads, lr, wd)
    # fp16 keeps the first moment in fp16 (GPU kernel): a few 1e-4 of one update apart
    torch.testing.assert_close(master, ref, rtol=1e-6, atol=3e-6 if kernel == "adam_fp16" else 1e-7)
    if kernel == "adam_cpu_bf16":  # the offload kernel's bf16 copy drops the low bits (bf16_from_fp32_value)
        assert torch.equal(param.view(torch.int16), (master.view(torch.int32) >> 16).to(torch.int16))
        assert not torch.equal(param, master.to(torch.bfloat16))
    else:
        assert torch.equal(param, master.to(low))


def test_adam_cpu_delta_statistics():
    from tests.support.bmtrain_cpu import optim_function as K

    torch.manual_seed(1)
    p, g = torch.randn(64), torch.randn(64).to(torch.bfloat16)
    p0, info = p.clone(), torch.zeros(4)
    m, v = torch.zeros(64), torch.zeros(64)
    K.adam_cpu(p, torch.empty(64, dtype=torch.bfloat16), info, g, m, v, 0.9, 0.95, 1e-8, 1e-2, 1.0, 0.1, 1)
    delta = m / 0.1 / (torch.sqrt(v / 0.05) + 1e-8) + 0.1 * p0  # bias corrections of step 1
    torch.testing.assert_close(info, torch.stack([delta.mean(), delta.var(unbiased=False), delta.sum(),
                                                  (delta * delta).sum()]), rtol=1e-5, atol=1e-5)


def test_cross_entropy_kernel_ports_equal_torch():
    from tests.support.bmtrain_cpu import loss_function as K

    torch.manual_seed(2)
    m, n = 12, VOCAB
    x = (torch.randn(m, n) * 3).to(torch.bfloat16)
    t = torch.randint(0, n, (m,), dtype=torch.int32)
    t[[2, 7]] = -100
    softmax, out = torch.empty_like(x), torch.empty(m)
    K.cross_entropy_forward(m, n, x, t, softmax, out, -100)
    xf = x.float().requires_grad_()
    ref = F.cross_entropy(xf, t.long(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(softmax, torch.softmax(x.float(), -1).to(torch.bfloat16))
    grad_out = torch.rand(m)
    grad_out[[2, 7]] = 0  # FusedCrossEntropy weights ignored rows by 0
    K.cross_entropy_backward_inplace(m, n, grad_out, t, softmax, -100)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(softmax.float(), xf.grad, rtol=1e-2, atol=1e-3)
    mx = x.float().max(1).values
    torch.testing.assert_close(K.fused_sumexp(x, mx), torch.exp(x.float() - mx[:, None]).sum(1))


def test_overflow_check_port_sets_and_keeps_the_flag():
    from tests.support.bmtrain_cpu import loss_function as K

    flag = torch.zeros(1, dtype=torch.uint8)[0]
    K.has_inf_nan(torch.ones(5, dtype=torch.float16), flag)
    assert flag.item() == 0
    K.has_inf_nan(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16), flag)
    assert flag.item() == 1
    K.has_inf_nan(torch.ones(5, dtype=torch.float16), flag)
    assert flag.item() == 1  # the kernel only ever sets it; OptimManager starts from a fresh zero


def test_install_keeps_torchs_nccl():
    # bmtrain's nvidia-nccl-cu11 owns nvidia/nccl/lib/libnccl.so.2, as the nvidia-nccl-cu12 of a CUDA 12 torch does:
    # installed after torch it replaces torch's NCCL. So bmtrain is pinned apart and installed without dependencies.
    import importlib.metadata

    assert not any(ln.startswith("bmtrain") for ln in (ROOT / "requirements.txt").read_text().splitlines())
    assert "bmtrain==1.0.1" in (ROOT / "requirements-bmtrain.txt").read_text().splitlines()
    env_sh = (ROOT / "quick_start/_env.sh").read_text()
    assert 'pip install -q --no-deps -r "$fm_root/requirements-bmtrain.txt"' in env_sh
    assert any(r.startswith("nvidia-nccl-cu11") for r in importlib.metadata.requires("bmtrain"))
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("nvidia-nccl-cu11")
