"""FSDP2 engine on CPU/gloo: 2-rank training equals a single-process reference; checkpoints reshard 2 -> 1."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.distributed.tinylm import (
    LR,
    MAX_NORM,
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


# ---------------------------------------------------------------- the 2-rank worker
def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from fm.distributed import build_engine

    tmpdir = Path(tmp)
    engine = build_engine("fsdp", seed=1)
    engine.init()
    assert (engine.rank, engine.world_size, engine.is_main) == (rank, world, rank == 0)
    model = engine.shard(make_meta_model(), activation_checkpointing=True, state_dict=tmpdir / "init.pt")
    engine.build_optimizer(param_groups(model), lr=LR, eps=1e-8)
    results: dict = {"stats": []}
    for step, b in enumerate(make_batches()):
        results["stats"].append(engine_step(engine, model, rank_slice(b, rank, world)))
        if step == 0:
            engine.save_model(tmpdir / "step1.pt")
            engine.save_optimizer(tmpdir / "optim1")
    final = engine.model_state_dict()
    # async checkpoint with 2 ranks: DCP writes from a background thread on the engine's checkpoint group
    from fm.checkpoint.commit import CheckpointManager, standard_parts

    manager = CheckpointManager(tmpdir / "run", async_save=True, comm=engine, keep_last_n=1)
    for step in (1, 2):
        manager.save(step, standard_parts(engine, step, log_ckpt={"iteration": step}, dataset_state={"r": rank}))
        engine.all_reduce(1.0)  # the training loop goes on using the main process group meanwhile
    manager.close()
    results["coll"] = {
        "sum": engine.all_reduce(rank + 1.0),
        "max": engine.all_reduce(rank + 1.0, op="max"),
        "min": engine.all_reduce(torch.tensor([rank + 1.0, -rank]), op="min").tolist(),
        "gather": engine.all_gather_object({"r": rank}),
        "bcast": engine.broadcast_object(f"from{rank}", src=1),
    }
    results["keys"] = sorted(model.state_dict())
    if rank == 0:
        torch.save({"final": final, **results}, tmpdir / "results.pt")
    engine.barrier()
    engine.shutdown()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    init_sd = TinyLM().state_dict()
    torch.save(init_sd, tmp / "init.pt")
    mp.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, init_sd, torch.load(tmp / "results.pt", weights_only=False)


def test_two_rank_training_matches_single_process(two_rank_run):
    tmp, init_sd, res = two_rank_run
    ref_stats, ref_states = reference_run(init_sd, make_batches())
    for (loss, norm), (rloss, rnorm) in zip(res["stats"], ref_stats):
        assert loss == pytest.approx(rloss, rel=1e-5)
        assert norm == pytest.approx(rnorm, rel=1e-5)  # global clip norm, not a per-rank one
    assert ref_stats[0][1] > MAX_NORM  # clipping really happened
    assert_sd_close(res["final"], ref_states[-1])
    assert res["keys"] == sorted(init_sd)  # no wrapper prefixes (activation checkpointing on)


def test_async_checkpoint_two_ranks(two_rank_run):
    from fm.checkpoint import layout

    tmp, _, res = two_rank_run
    root = tmp / "run"
    assert layout.list_checkpoints(root) == [2] and layout.find_latest(root) == 2
    d = root / "2"
    assert sorted(p.name for p in (d / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    assert (d / "optimizer" / ".metadata").is_file()
    assert_sd_close(torch.load(layout.model_file(d), weights_only=True), res["final"], atol=0)


def test_collectives(two_rank_run):
    _, _, res = two_rank_run
    c = res["coll"]
    assert c["sum"] == 3.0 and c["max"] == 2.0
    assert c["min"] == [1.0, -1.0]
    assert c["gather"] == [{"r": 0}, {"r": 1}]
    assert c["bcast"] == "from1"


def test_full_state_dict_loads_into_plain_model(two_rank_run):
    tmp, init_sd, _ = two_rank_run
    _, ref_states = reference_run(init_sd, make_batches()[:1])
    sd = torch.load(tmp / "step1.pt", weights_only=True)
    plain = TinyLM()
    plain.load_state_dict(sd, strict=True)
    assert_sd_close(plain.state_dict(), ref_states[0])


def test_optimizer_reshards_two_to_one(two_rank_run):
    """Resume the 2-rank step-1 checkpoint in ONE process; step 2 equals the uninterrupted run."""
    from fm.distributed import build_engine

    tmp, init_sd, res = two_rank_run
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert k not in os.environ  # this process is a plain single-process run
    engine = build_engine("fsdp", seed=3)
    engine.init()
    try:
        assert engine.world_size == 1
        model = engine.shard(make_meta_model(), state_dict=tmp / "step1.pt")
        engine.build_optimizer(param_groups(model), lr=LR, eps=1e-8)
        engine.load_optimizer(tmp / "optim1")
        loss, norm = engine_step(engine, model, make_batches()[1])
        assert (loss, norm) == pytest.approx(res["stats"][1], rel=1e-5)
        assert_sd_close(engine.model_state_dict(), res["final"])
        # load_model on the sharded model, strict key check
        engine.load_model(tmp / "step1.pt")
        assert_sd_close(engine.model_state_dict(), torch.load(tmp / "step1.pt", weights_only=True))
        with pytest.raises(KeyError, match="missing"):
            engine.load_model({"input_embedding.weight": init_sd["input_embedding.weight"]})
    finally:
        engine.shutdown()


def test_real_dragonfly_model_shards_layer_by_layer():
    """The MODELS helper's tiny dragonfly (tied head, GQA): sharded logits, loss and clip norm equal plain ones."""
    from fm.distributed import build_engine
    from fm.models import registry

    cfg = registry.load_model_config(str(Path(__file__).resolve().parents[2] / "apps/fm9g_2b/model_configs/tiny.json"))
    torch.manual_seed(0)
    plain = registry.build_model(cfg, device="cpu", dtype=torch.float32)
    sd = copy.deepcopy(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    pos = torch.arange(16).repeat(2, 1)
    ref = plain(ids, pos)
    ref_loss = F.cross_entropy(ref.reshape(-1, ref.shape[-1]), ids.reshape(-1))
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e9)
    engine = build_engine("fsdp")
    engine.init()
    try:
        model = engine.shard(registry.build_model(cfg, device="meta"), state_dict=sd, activation_checkpointing=True)
        engine.build_optimizer([{"params": list(model.parameters())}], lr=1e-3)
        out = model(ids, pos)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        per_token = engine.loss(out, ids)
        engine.backward(per_token.mean())
        assert per_token.shape == (ids.numel(),) and per_token.dtype == torch.float32
        assert per_token.mean().item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert engine.clip_grad_norm(0.0).item() == pytest.approx(ref_norm.item(), rel=1e-5)
        assert sorted(engine.model_state_dict()) == sorted(sd)
        assert registry.mup_scaled_param_names(model) == registry.mup_scaled_param_names(plain)
    finally:
        engine.shutdown()
