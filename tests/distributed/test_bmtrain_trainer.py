"""The trainer on engine bmtrain: BMTrain 1.0.1's own code on the CPU backend, 2 processes under torchrun.

Tiny dragonfly (tied head, muP groups) and tiny spark (sliding window) train 20 steps with gradient
accumulation, clipping and parameter statistics to the losses and weights of the fsdp engine; a
bmtrain run killed with SIGKILL resumes exactly; its checkpoint loads into the plain model and into
the fsdp engine; LoRA under bmtrain saves the adapter fsdp saves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.tinylm import assert_sd_close, free_port
from tests.helpers import launch, make_run, on_worker, stats

ROOT = Path(__file__).resolve().parents[2]
SPARK_TINY = ROOT / "apps" / "spark_13b" / "model_configs" / "tiny.json"
TRAIN = {"train_iters": 20, "save_iters": 10, "grad_accum": 2, "clip_grad": 0.3, "inspect_iters": 10,
         "weight_decay": 0.1}


def _run(tmp: Path, engine: str, faults: dict | None = None, **overrides) -> Path:
    cfg = make_run(tmp, repeat=True, engine=engine, **{**TRAIN, **overrides})
    rc, out = launch(cfg, bmtrain_cpu=engine == "bmtrain", faults=faults)
    if not (faults or {}).get("die_after"):
        assert rc == 0, out[-4000:]
        if {**TRAIN, **overrides}["inspect_iters"]:
            _assert_inspect_tables(out)
    return tmp / "ckpt" / "run"


def _assert_inspect_tables(out: str) -> None:
    """Every parameter trains here, so the inspect table has a gradient for each one, on every engine: under ZeRO
    a rank whose shard of a parameter is empty must still print the parameter's gradient (not nan)."""
    tables = out.split("parameter statistics at iteration")[1:]
    assert tables, out[-4000:]
    for table in tables:
        lines = table.splitlines()[3:]  # after the iteration, the header and the rule
        rows = lines[:next((i for i, ln in enumerate(lines) if len(ln.split()) != 6), len(lines))]
        assert len(rows) > 10 and all(ln.split()[-1] not in ("nan", "-") for ln in rows), table


def _assert_same_training(a: dict[int, dict], b: dict[int, dict], rel: float = 1e-5) -> None:
    # (at lr 1e-2 the spark tiny model is sensitive enough that fp32 sums in another order move its late
    # gradient norms by 1e-4: keep the lr of its own tiny config)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for i in a:
        assert a[i]["loss"] == pytest.approx(b[i]["loss"], rel=rel), i
        assert a[i]["grad_norm"] == pytest.approx(b[i]["grad_norm"], rel=rel), i
        assert a[i]["task_loss"] == pytest.approx(b[i]["task_loss"], rel=rel), i
    assert b[1]["grad_norm"] > TRAIN["clip_grad"]  # clipping really happened


def _model(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / str(step) / f"fm9g_live_checkpoint-{step}.pt", weights_only=True)


def _fsdp_load_worker(rank: int, world: int, port: int, model_config: str, path: str, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from fm.distributed import build_engine
    from fm.models.registry import build_model, load_model_config

    engine = build_engine("fsdp")
    engine.init()
    engine.shard(build_model(load_model_config(model_config), device="meta"))
    engine.load_model(path)
    sd = engine.model_state_dict()
    if rank == 0:
        torch.save(sd, out)
    engine.shutdown()


def test_dragonfly_trains_like_fsdp_and_resumes_exactly_after_sigkill(tmp_path):
    fsdp = stats(_run(tmp_path / "fsdp", "fsdp"))
    run = _run(tmp_path / "bmt", "bmtrain")
    bmt = stats(run)
    _assert_same_training(bmt, fsdp)
    assert_sd_close(_model(run, 20), _model(tmp_path / "fsdp" / "ckpt" / "run", 20))
    assert sorted(p.name for p in (run / "20" / "optimizer").iterdir()) == ["rank-0-of-2.pt", "rank-1-of-2.pt"]

    crashed = _run(tmp_path / "crash", "bmtrain", faults={"die_after": 13})
    assert max(stats(crashed)) == 13
    _run(tmp_path / "crash", "bmtrain")
    got = stats(crashed)
    for i in range(11, 21):
        assert (got[i]["loss"], got[i]["grad_norm"]) == (bmt[i]["loss"], bmt[i]["grad_norm"]), i
    assert all(torch.equal(a, b) for a, b in zip(_model(crashed, 20).values(), _model(run, 20).values()))

    # The bmtrain checkpoint loads into the plain model, strictly, and into the fsdp engine on 2 ranks.
    from fm.models.registry import build_model, load_model_config

    plain = build_model(load_model_config(str(tmp_path / "bmt" / "model.json")))
    plain.load_state_dict(_model(run, 20), strict=True)
    out = tmp_path / "fsdp_loaded.pt"
    mp.spawn(_fsdp_load_worker, args=(2, free_port(), str(tmp_path / "bmt" / "model.json"),
                                      str(run / "20" / "fm9g_live_checkpoint-20.pt"), str(out)), nprocs=2)
    assert_sd_close(torch.load(out, weights_only=True), _model(run, 20), atol=0)


def test_spark_trains_like_fsdp(tmp_path):
    spark = {"config": str(SPARK_TINY), "save_iters": 20, "inspect_iters": 0, "lr": 3e-3}  # tiny_pretrain's lr
    fsdp = stats(_run(tmp_path / "fsdp", "fsdp", **spark))
    run = _run(tmp_path / "bmt", "bmtrain", **spark)
    _assert_same_training(stats(run), fsdp)
    # The key bias gets no gradient in exact arithmetic (softmax ignores a constant added to every key), so Adam
    # steps it by rounding noise of either engine: compare it to its own scale, everything else to 1e-5.
    got, want = _model(run, 20), _model(tmp_path / "fsdp" / "ckpt" / "run", 20)
    kbias = [k for k in want if k.endswith("k_proj.bias")]
    assert kbias and all((got.pop(k) - want.pop(k)).abs().max() < 0.1 * 3e-3 * 20 for k in kbias)
    assert_sd_close(got, want)


def _lora_launch(cfg: Path, engine: str, faults: dict | None = None) -> subprocess.CompletedProcess:
    import os

    app = ROOT / "apps" / "spark_13b" / "sft_spark.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *on_worker(app, bmtrain_cpu=engine == "bmtrain", faults=faults), "--config", str(cfg), "--lora"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))


def test_lora_under_bmtrain_saves_the_adapter_fsdp_saves(tmp_path, tokenizer_path):
    from safetensors.torch import load_file

    from fm.models.registry import build_model, load_model_config

    idx = tmp_path / "idx"
    subprocess.run([sys.executable, str(ROOT / "apps/spark_13b/preprocess_sft_data.py"), "--raw_data_path",
                    str(ROOT / "quick_start/data/spark_sft.jsonl"), "--output_filepath", str(idx)],
                   cwd=ROOT, check=True, capture_output=True)
    (tmp_path / "mix.json").write_text(json.dumps([{
        "task_name": "sft", "abs_weight": 1.0, "path": str(idx), "allow_repeat": True,
        "transforms": str(ROOT / "dataset_configs/transforms/spark_chat.py")}]))
    torch.manual_seed(21)
    torch.save(build_model(load_model_config(str(SPARK_TINY)), device="cpu").state_dict(), tmp_path / "base.pt")
    adapters, losses = {}, {}
    for engine in ("fsdp", "bmtrain"):
        cfg = {"model_unique": "lora", "config": str(SPARK_TINY), "dataset_config": str(tmp_path / "mix.json"),
               "tokenizer_path": tokenizer_path, "engine": engine, "dtype": "fp32", "max_length": 96,
               "batch_size": 2, "grad_accum": 2, "train_iters": 6, "save_iters": 3, "lr": 1e-2, "warmup_iters": 1,
               "inspect_iters": 3, "seed": 5, "save": str(tmp_path / engine), "tensorboard": "",
               "eos_token": "<end>", "load_model": str(tmp_path / "base.pt"), "lora_r": 4, "lora_alpha": 8.0,
               "lora_targets": "q,k,v,out,fc0,fc1,fc2", "resume_ckpt": "latest"}
        path = tmp_path / f"{engine}.json"
        path.write_text(json.dumps(cfg))
        if engine == "bmtrain":  # killed after step 4, resumed from the adapter checkpoint of step 3
            assert _lora_launch(path, engine, {"die_after": 4}).returncode != 0
        res = _lora_launch(path, engine)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        run = tmp_path / engine / "lora"
        adapters[engine] = load_file(str(run / "6" / "adapter_model.safetensors"))
        losses[engine] = {i: r["loss"] for i, r in stats(run).items()}
    assert sorted(adapters["bmtrain"]) == sorted(adapters["fsdp"]) and len(adapters["fsdp"]) == 4 * 7 * 2
    assert_sd_close(adapters["bmtrain"], adapters["fsdp"], atol=1e-4)  # lr 1e-2: see _assert_same_training
    assert any(t.abs().max() > 0 for k, t in adapters["bmtrain"].items() if "lora_B" in k)  # B starts at zero
    assert losses["bmtrain"] == pytest.approx(losses["fsdp"], rel=1e-5)
