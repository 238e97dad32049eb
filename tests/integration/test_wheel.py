"""``pip install`` of the wheel into a fresh environment runs the whole workflow from another directory, with no
checkout file on the path: shipped model configs, tokenizer, transforms and demo data travel as package data, the
``fm`` console command does every step, torchrun's workers import the installed fm, and what one step writes the
next opens by itself (checkpoints carry their model config and tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def test_wheel_install_runs_the_demo_workflow_elsewhere(tmp_path):
    # built from a copy of what the wheel is made of, so no stale build/ directory in the checkout leaks into it
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fm", src / "fm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(src)], cwd=tmp_path, env=os.environ)
    (wheel,) = wheels.glob("fm-*.whl")
    # test support (e.g. the BMTrain CPU backend, tests/support/bmtrain_cpu) is not part of the product
    names = zipfile.ZipFile(wheel).namelist()
    assert "fm/distributed/bmtrain.py" in names
    assert not [n for n in names if "bmtrain_cpu" in n or n.startswith("tests/")], names
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=os.environ)
    py = venv / "bin" / "python"
    # the dependencies (torch, ...) come from this environment without being downloaded again; a plain path entry
    # does not run that directory's .pth files, so this checkout's editable fm stays invisible
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     os.environ).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=os.environ)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRAIN_CONFIG")}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", OMP_NUM_THREADS="1", VIRTUAL_ENV=str(venv))
    fm = str(venv / "bin" / "fm")
    where = _run([str(py), "-c", "import fm, fm.models.registry as r; print(fm.__file__); print(r.CONFIG_DIR)"],
                 work, env).split()
    assert all(str(venv) in w and str(ROOT) not in w for w in where), where

    # the demo: corpus, txt2jsonl, convert, stats, train with torchrun (2 workers), generate
    out = _run([fm, "demo", "--out", "demo", "--train-iters", "6"], work, env)
    assert "engine fsdp, world size 2" in out and '"generate":' in out
    run = work / "demo" / "checkpoints" / "tiny_demo"
    assert (run / "6" / "model_config.json").is_file() and (run / "6" / "tokenizer.model").is_file()

    # fm train from a config of the user's own, naming shipped things only: dry run, then 2 steps
    train = work / "train.json"
    train.write_text(json.dumps({"model_unique": "mine", "config": "tiny", "tokenizer_path": "demo",
                                 "dataset_config": str(work / "demo" / "demo_mixture.json"), "engine": "fsdp",
                                 "max_length": 64, "batch_size": 2, "train_iters": 2, "save_iters": 2,
                                 "save": "ckpt", "tensorboard": "", "inspect_iters": 0}))
    assert "preflight      ok" in _run([fm, "train", "--config", str(train), "--dry-run"], work, env)
    _run([fm, "train", "--config", str(train)], work, {**env, "GPUS_PER_NODE": "1"})

    # what one step wrote, the next opens with nothing else given
    _run([fm, "export", "--checkpoint", str(run), "--output", "hf"], work, env)
    gen = _run([fm, "generate", "--checkpoint", "hf", "--prompt", "The module", "--max-new-tokens", "5",
                "--device", "cpu"], work, env)
    assert json.loads(gen.strip().splitlines()[-1])["input"] == "The module"
    _run([fm, "eval", "--checkpoint", "ckpt/mine", "--ppl-data", "demo/index/instructions", "--device", "cpu",
          "--output", "eval.json"], work, env)
    assert json.loads((work / "eval.json").read_text())["tokenizer"].endswith("ckpt/mine/2/tokenizer.model")
