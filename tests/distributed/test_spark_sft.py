"""Spark LoRA fine-tuning with 2 processes (torchrun, FSDP2 on gloo, tiny spark): base weights loaded
from a .pt, only adapters train, adapter-only PEFT checkpoints gathered from the shards, and an exact
resume from such a checkpoint (the same losses as the uninterrupted run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "spark_13b" / "sft_spark.py"
SPARK_TINY = ROOT / "apps" / "spark_13b" / "model_configs" / "tiny.json"


def _launch(train_config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(APP), "--config", str(train_config),
           "--lora", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "train_stats.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def test_two_process_fsdp_lora_and_exact_resume(tmp_path, tokenizer_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fm.models.registry import build_model, load_model_config

    records = [json.loads(x) for x in (ROOT / "quick_start/data/spark_sft.jsonl").read_text().splitlines()]
    idx = tmp_path / "idx"
    pre = [sys.executable, str(ROOT / "apps/spark_13b/preprocess_sft_data.py"), "--raw_data_path",
           str(ROOT / "quick_start/data/spark_sft.jsonl"), "--output_filepath", str(idx)]
    subprocess.run(pre, cwd=ROOT, check=True, capture_output=True)
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([{"task_name": "sft", "abs_weight": 1.0, "path": str(idx), "allow_repeat": True,
                                "transforms": str(ROOT / "dataset_configs/transforms/spark_chat.py")}]))
    mc = load_model_config(str(SPARK_TINY))
    torch.manual_seed(21)
    base = build_model(mc, device="cpu", dtype=torch.float32)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    cfg = {"model_unique": "lora", "config": str(SPARK_TINY), "dataset_config": str(mix),
           "tokenizer_path": tokenizer_path, "engine": "fsdp", "dtype": "fp32", "max_length": 96, "batch_size": 2,
           "train_iters": 6, "save_iters": 3, "lr": 1e-2, "lr_scheduler": "cosine", "warmup_iters": 1,
           "inspect_iters": 0, "seed": 5, "save": str(tmp_path / "ckpt"), "tensorboard": "", "eos_token": "<end>",
           "load_model": str(tmp_path / "base.pt"), "lora_r": 4, "lora_alpha": 8.0,
           "lora_targets": "q,k,v,out,fc0,fc1,fc2", "resume_ckpt": "latest"}
    train = tmp_path / "train.json"
    train.write_text(json.dumps(cfg))
    assert len(records) > 8

    first = _launch(train)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trainable params: 39,424 || all params: 1,873,920" in first.stderr + first.stdout
    run_dir = tmp_path / "ckpt" / "lora"
    want = _losses(run_dir)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    ckpt3, ckpt6 = run_dir / "3", run_dir / "6"
    for c in (ckpt3, ckpt6):
        assert (c / "adapter_config.json").is_file() and not list(c.glob("fm9g_live_checkpoint-*.pt"))
    a3 = load_file(str(ckpt3 / "adapter_model.safetensors"))
    a6 = load_file(str(ckpt6 / "adapter_model.safetensors"))
    assert len(a6) == mc.num_layers * 7 * 2 and all(not torch.equal(a3[k], a6[k]) for k in a6 if "lora_B" in k)
    # the full-shape adapter from the shards loads with PEFT onto the base
    pm = PeftModel.from_pretrained(base, str(ckpt6))
    assert pm.base_model.model.encoder.layers[0].self_attention.q_proj.lora_B["default"].weight.shape == (128, 4)
    # the adapter folder opens as the base the trainer recorded with the adapter folded in, as PEFT merges it
    from fm.checkpoint.open import open_checkpoint

    opened = open_checkpoint(ckpt6)
    assert opened.kind == "lora" and opened.base.path == tmp_path / "base.pt" and opened.model_config == mc
    merged = opened.state_dict()
    ref = pm.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)

    # resume from step 3 in a fresh run directory: steps 4..6 repeat exactly
    shutil.copytree(ckpt3, tmp_path / "ckpt2" / "lora" / "3")
    (tmp_path / "ckpt2" / "lora" / "latest").write_text("3\n")
    second = _launch(train, "--save", str(tmp_path / "ckpt2"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    got = _losses(tmp_path / "ckpt2" / "lora")
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it] == pytest.approx(want[it], rel=1e-5, abs=1e-6), (it, got, want)
