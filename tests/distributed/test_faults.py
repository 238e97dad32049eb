"""Faults around a run: payloads in every file of a checkpoint, damaged checkpoints, a dead launcher, two runs
on one directory, and tensorboard after a resume.

In-process runs (fsdp, a world of one) build the checkpoints; the launcher and lock tests run torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fm.checkpoint import commit as ck
from fm.checkpoint import layout
from fm.io import CorruptFileError, UnsafeFileError
from fm.train.config import load_config
from fm.train.trainer import run
from tests.helpers import APP, ROOT, Payload, children, make_run, stats


def _in_process(cfg_path: Path, **over) -> int:
    return run(load_config(cfg_path, over))


def _reseal(ckpt: Path, rel: str) -> None:
    """Record ``rel``'s new bytes in the manifest, as anyone handing out a doctored checkpoint would."""
    marker = json.loads((ckpt / layout.COMPLETE).read_text())
    marker["files"][rel] = ck.file_digest(ckpt / rel)
    (ckpt / layout.COMPLETE).write_text(json.dumps(marker))


def test_a_payload_in_any_file_of_a_checkpoint_never_runs(tmp_path):
    import pickle

    import torch

    cfg = make_run(tmp_path / "src", repeat=True, train_iters=2, save_iters=2, warmup_iters=1, tensorboard="")
    assert _in_process(cfg) == 0
    src = tmp_path / "src" / "ckpt" / "run" / "2"
    files = sorted(json.loads((src / layout.COMPLETE).read_text())["files"])
    binary = [f for f in files if not f.endswith((".json", ".model")) and not f.endswith(layout.LOG_CKPT)]
    assert set(binary) >= {"fm9g_live_checkpoint-2.pt", "scheduler.pt", "rng/rank0.pt", "optimizer/.metadata",
                           "optimizer/__0_0.distcp"}
    marker = tmp_path / "PAYLOAD_RAN"
    for rel in binary:
        work = tmp_path / rel.replace("/", "_")
        shutil.copytree(tmp_path / "src", work)
        ckpt = work / "ckpt" / "run" / "2"
        if rel.endswith(".metadata"):
            (ckpt / rel).write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"evil": Payload(marker)}, ckpt / rel)
        _reseal(ckpt, rel)
        # refused, or (a data file whose byte ranges no longer fit) damaged: either way nothing unpickled it
        with pytest.raises((UnsafeFileError, CorruptFileError), match="refused for safety|damaged") as info:
            _in_process(work / "train.json", save=str(work / "ckpt"), train_iters=3)
        assert str(ckpt) in str(info.value), (rel, info.value)
        assert not marker.exists(), rel


def test_resume_passes_over_a_damaged_checkpoint(tmp_path, caplog):
    cfg = make_run(tmp_path, repeat=True, train_iters=4, save_iters=2, warmup_iters=1, tensorboard="")
    assert _in_process(cfg) == 0
    root = tmp_path / "ckpt" / "run"
    model = root / "4" / "fm9g_live_checkpoint-4.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated: a full disk or a copy cut short
    with pytest.raises(layout.CheckpointError, match=rf"checkpoint {root / '4'} is damaged: {model}: 1000 bytes"):
        _in_process(cfg, resume_ckpt="4", train_iters=5)
    with caplog.at_level("INFO"):
        assert _in_process(cfg, train_iters=5) == 0  # resume_ckpt "latest"
    assert f"checkpoint {root / '4'} is damaged ({model}: 1000 bytes" in caplog.text
    assert f"resuming from {root / '2'}, the newest checkpoint that verifies" in caplog.text
    assert "resumed at iteration 2" in caplog.text
    assert (root / "latest").read_text().strip() == "5"


def _start(cfg: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(APP), "--config",
           str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen) -> None:
    jsonl = run_dir / "train_stats.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < n):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_workers_stop_with_their_launcher_and_one_run_per_directory(tmp_path):
    cfg = make_run(tmp_path, repeat=True, train_iters=100000, save_iters=3, tensorboard=str(tmp_path / "tb"))
    run_dir = tmp_path / "ckpt" / "run"
    first = _start(cfg)
    _wait_for_steps(run_dir, 4, first)
    workers = children(first.pid)
    assert len(workers) == 2

    # a second run on the same directory fails at once, naming the live holder
    t0 = time.time()
    second = subprocess.run([sys.executable, str(APP), "--config", str(cfg)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert second.returncode != 0 and time.time() - t0 < 60
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] in workers
    assert f"{run_dir} is being written by pid {holder['pid']} on {holder['host']}" in second.stderr + second.stdout

    # SIGKILL the launcher's whole process group: torchrun started the workers in sessions of their own
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    before = _tree(tmp_path)
    time.sleep(3)
    assert _tree(tmp_path) == before  # nothing was written after they stopped
    # rank 0 leaves its lock behind when the launcher watch stops it, or removes it when the dead peer's
    # collective fails first (a clean exit releases the lock)
    lock_left = (run_dir / ".lock").exists()

    # the next run takes the dead holder's lock over and resumes from the last checkpoint
    latest = int((run_dir / "latest").read_text())
    rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(APP), "--config", str(cfg), "--train_iters", str(latest + 2)], cwd=ROOT,
                        capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert rc.returncode == 0, rc.stdout[-3000:]
    assert f"resumed at iteration {latest}" in rc.stdout + rc.stderr
    assert ("taking over the lock" in rc.stdout + rc.stderr) == lock_left
    assert not (run_dir / ".lock").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(layout.TMP_PREFIX)]

    # tensorboard shows every step once, with the values of the run that went on from the checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "run"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("Loss/train")]
    assert [s for s, _ in loss] == list(range(1, latest + 3))
    final = stats(run_dir)
    assert all(abs(v - final[s]["loss"]) < 1e-5 for s, v in loss if s > latest)
