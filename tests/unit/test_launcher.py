"""fm.launch (what every launcher script runs): topology from the environment, the app launchers' options, the
torchrun command, the preflight (every problem before any worker starts), the rendezvous file, and signal
forwarding to the training workers below a torchrun (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fm import launch
from fm.train.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]


def test_topology_from_the_environment_and_its_defaults():
    t = launch.topology({"GPUS_PER_NODE": "3", "NNODES": "2", "NODE_RANK": "1", "RANK": "5",
                         "MASTER_ENDPOINT": "g3002", "MASTER_PORT": "12346"})
    assert (t.nproc, t.nnodes, t.node_rank, t.master, t.port) == (3, 2, 1, "g3002", 12346)  # NODE_RANK over RANK
    t = launch.topology({"RANK": "2", "NNODES": "3", "SLURM_GPUS_ON_NODE": "4"})
    assert (t.node_rank, t.nproc, t.port, t.master) == (2, 4, 12345, "localhost")  # fixed port across nodes
    t = launch.topology({"CUDA_VISIBLE_DEVICES": "0,1,5"})
    assert (t.nproc, t.nnodes, t.node_rank) == (3, 1, 0) and 0 < t.port < 65536  # one node: a free port
    with pytest.raises(launch.LaunchError, match="NNODES='two' must be an integer"):
        launch.topology({"NNODES": "two"})
    cmd = launch.torchrun_command(["app.py", "--config", "x y.json"], t)
    assert cmd[:4] == ["torchrun", "--nnodes=1", "--nproc_per_node=3", "--node_rank=0"]
    assert "--rdzv_backend=c10d" in cmd and f"--signals-to-handle={launch.SIGNALS}" in cmd
    assert cmd[-3:] == ["app.py", "--config", "x y.json"]


def _good_run(tmp_path: Path) -> Path:
    from tests.helpers import make_launch_run

    return make_launch_run(tmp_path)


def test_dry_run_prints_the_command_and_the_plan(tmp_path, capsys):
    cfg = _good_run(tmp_path)
    rc = launch.app_main(["w.py"], "default.json", ["--dry-run", "--config", str(cfg), "--train_iters", "9"],
                         prog="t", env={"GPUS_PER_NODE": "2", "MASTER_PORT": "1234"})
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.splitlines()[0].endswith(f"w.py --train_config {cfg} --train_iters 9")
    for part in ("world          1 node(s) x 2 process(es) = 2", "model          dragonfly",
                 "token shares a 67%, b 33%",
                 "9 x (batch 2 x grad_accum 1 x 2 process(es)) rows of 64 tokens = 256 tokens per step",
                 f"run directory  {tmp_path / 'elsewhere' / 'run'} (starts fresh)", "preflight      ok"):
        assert part in out, part


def test_preflight_reports_every_problem_at_once(tmp_path, capsys):
    """Three config mistakes, a missing tokenizer, a broken dataset config and an unwritable save directory: one
    message, exit 2, no torchrun (the test would hang or fail if it started)."""
    cfg = _good_run(tmp_path)
    data = json.loads(cfg.read_text())
    (tmp_path / "a_file").write_text("")
    data.update(warmup_iter=10, batch_size="two", engine="deepspeed", tokenizer_path=str(tmp_path / "no.model"),
                save=str(tmp_path / "a_file" / "ckpt"))
    cfg.write_text(json.dumps(data))
    mix = Path(data["dataset_config"])
    mix.write_text(json.dumps([{"task_name": "a", "abs_weight": 0, "path": "a"}, {"task_name": "c", "path": "nope",
                                                                                  "abs_weight": 1}]))
    rc = launch.app_main(["w.py"], "d.json", ["--config", str(cfg)], prog="t", env={"MASTER_PORT": "1"})
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("preflight: 7 problems; nothing was started:\n"), err
    for part in ("unknown key 'warmup_iter'; did you mean \"warmup_iters\"?",
                 "batch_size (data.batch_size): must be an integer, got 'two'",
                 "engine (engine.name): 'deepspeed' is not one of auto, bmtrain, fsdp",
                 f"data.tokenizer: tokenizer not found: {tmp_path / 'no.model'}",
                 f"data.mixture {mix}: entry 0 (task 'a'): abs_weight: must be > 0, got 0",
                 f"data.mixture {mix}: entry 1 (task 'c'): path not found",
                 f"run.save_dir: {tmp_path / 'a_file' / 'ckpt'}: {tmp_path / 'a_file'} is a file, not a directory"):
        assert part in err, part


def test_preflight_checks_model_vocab_weights_and_resume(tmp_path):
    cfg = _good_run(tmp_path)
    model = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**model, "vocab_size": 100, "num_heads": 3}))
    r = preflight(str(cfg), [("load_model", str(tmp_path / "base.pt")), ("resume_ckpt", "7")])
    text = "\n".join(r.problems)
    assert "num_heads=3 must be a multiple of num_kv_heads=2" in text
    assert "checkpoint.resume.source: checkpoint" in text and "is missing or incomplete" in text
    (tmp_path / "model.json").write_text(json.dumps({**model, "vocab_size": 100}))
    r = preflight(str(cfg), [("load_model", str(tmp_path / "base.pt"))])
    assert any("has 8000 pieces but the model config's vocab_size is 100" in p for p in r.problems)
    assert any(p.startswith("model.init_from: checkpoint not found") for p in r.problems)
    (tmp_path / "model.json").write_text(json.dumps(model))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    r = preflight(str(cfg), [("resume_ckpt", str(weights))])  # a bare .pt resumes the weights only
    assert not r.problems and f"resumes from {weights}" in r.facts["run directory"]


def test_help_lists_every_train_key(capsys):
    assert launch.app_main(["w.py"], "d.json", ["--help"], prog="fm train", env={}) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fm train [--dry-run]")
    assert "  --lora.targets LIST_OF_STRING  [default q,k,v]  (upstream --lora_targets)" in out


def test_rendezvous_file_heartbeat_and_timeout(tmp_path):
    env = {"RDZV_HEARTBEAT": "0.1", "RDZV_STALE": "1", "RDZV_POLL": "0.05"}
    master = launch.Rendezvous(tmp_path / "r" / "fm.env", env)
    master.publish(launch.Topology(nproc=1, nnodes=2, node_rank=0, master="g1", port=29400))
    first = master.path.stat().st_mtime
    time.sleep(0.4)
    assert master.path.stat().st_mtime > first  # the heartbeat touches it
    got = launch.Rendezvous(master.path, env).wait(5)
    assert (got["MASTER_ENDPOINT"], got["MASTER_PORT"], got["NNODES"]) == ("g1", "29400", "2")
    master.withdraw()
    assert not master.path.exists()
    master.path.write_text("MASTER_ENDPOINT=dead\nMASTER_PORT=1\nNNODES=2\n")
    os.utime(master.path, (time.time() - 60, time.time() - 60))  # its master stopped touching it
    with pytest.raises(launch.RendezvousTimeout, match=f"no live master published {master.path} within 0.3s"):
        launch.Rendezvous(master.path, env).wait(0.3)


FAKE_TORCHRUN = """\
import signal, subprocess, sys, time
# a stand-in agent: one worker that saves on USR1; the agent itself must never be signalled
signal.signal(signal.SIGUSR1, lambda *a: open(sys.argv[1] + ".agent", "w").write("signalled"))
worker = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
def stop(*a):
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
open(sys.argv[1] + ".ready", "w").write("")
time.sleep(60)
''', sys.argv[1]])
sys.exit(worker.wait())
"""


def test_a_stop_signal_reaches_the_workers_not_torchrun(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text(f"#!{sys.executable}\n" + FAKE_TORCHRUN)
    (bindir / "torchrun").chmod(0o755)
    marker = tmp_path / "worker"
    node = subprocess.Popen([sys.executable, "-m", "fm.launch", "run-node", str(bindir / "torchrun"), str(marker)],
                            cwd=ROOT, env={**os.environ, "FM_PID_DIR": str(tmp_path), "SLURM_JOB_ID": "5"},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "worker.ready").exists():
        assert time.time() < deadline and node.poll() is None, node.communicate()
        time.sleep(0.05)
    assert (tmp_path / "fm-node-5-0.pid").read_text() == str(node.pid)  # where signal-node finds it
    node.send_signal(signal.SIGUSR1)
    _, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert marker.read_text() == "saved" and not (tmp_path / "worker.agent").exists()
    assert "got SIGUSR1: forwarding to the training processes" in err
    assert not (tmp_path / "fm-node-5-0.pid").exists()


def test_requeue_only_inside_slurm_after_a_signal(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.nodes.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    assert launch.maybe_requeue(0, "USR1", {"REQUEUE": "1", "SLURM_JOB_ID": "42"}) == 0
    assert calls == [["scontrol", "requeue", "42"]]
    assert launch.maybe_requeue(3, "USR1", {"REQUEUE": "1"}) == 3 and len(calls) == 1
    assert launch.maybe_requeue(1, "", {"REQUEUE": "1", "SLURM_JOB_ID": "42"}) == 1 and len(calls) == 1


def test_torchrun_is_recognised_in_its_spellings():
    assert launch.is_torchrun(["/venv/bin/python", "/venv/bin/torchrun", "--nnodes=1"])
    assert launch.is_torchrun(["python", "-m", "torch.distributed.run", "x.py"])
    assert not launch.is_torchrun(["python", "train.py", "torchrun"])
    script = textwrap.dedent("""\
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 30
        while not launch.descendants(p.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert len(launch.descendants(p.pid)) == 1 and launch.training_workers(p.pid) == []  # no torchrun there
    finally:
        for c in launch.descendants(p.pid):
            os.kill(c, signal.SIGKILL)
        p.kill()
        p.wait()


def test_the_worker_scripts_answer_help(capsys):
    """``python apps/fm9g_2b/pretrain_dragonfly.py --help`` used to fail with "--help needs a value"."""
    import importlib.util

    from fm.train.cli import main

    assert main(["--help"]) == 0 and "  --run.train_iters INT  [default 10000]" in capsys.readouterr().out
    spec = importlib.util.spec_from_file_location("pretrain_dragonfly", ROOT / "apps/fm9g_2b/pretrain_dragonfly.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.main(["-h"]) == 0 and capsys.readouterr().out.startswith("usage: pretrain_dragonfly.py")
    assert main(["--config", "/nonexistent.json"]) == 2  # not a train config file: the model config key
    assert "model config '/nonexistent.json': no such file" in capsys.readouterr().err
