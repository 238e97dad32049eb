"""Launchers without slurm: the torchrun command every app launcher composes (``--dry-run``), the master/slave
node scripts (rendezvous file, timeout, signal forwarding) and two "nodes" on this machine training as one
world of size 2 (fsdp on gloo, loopback), plus shellcheck on every shell script when it is installed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, clean_env, complete_steps, make_launch_run

LAUNCHERS = sorted(ROOT.glob("apps/*/*.sh"))
SHELL_SCRIPTS = sorted({*ROOT.glob("apps/*/*.sh"), *ROOT.glob("quick_start/*.sh"), *ROOT.glob("quick_start/*.sbatch"),
                        *ROOT.glob("tests/**/*.sh")})


def dry_run(script: Path, *args: str, rc: int = 0, **env: str) -> tuple[list[str], str]:
    """(the torchrun command a launcher prints with --dry-run, split back into its arguments; all its output)."""
    out = subprocess.run(["bash", str(script), "--dry-run", *args], cwd=ROOT, env=clean_env(**env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == rc, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("torchrun ")]
    assert len(lines) == 1, out.stdout
    return shlex.split(lines[0]), out.stdout + out.stderr


def opts(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


# ------------------------------------------------------------------------------------------ launchers
# (the logic is fm.launch's, unit-tested in tests/unit/test_launcher.py; here: each script's wiring, end to end)
WIRING = {"pretrain_dragonfly.sh": ("apps/fm9g_2b/pretrain_dragonfly.py", "apps/fm9g_2b/train_configs/2.4b.json"),
          "pretrain_spark.sh": ("apps/spark_13b/pretrain_spark.py", "apps/spark_13b/train_configs/13b_pretrain.json"),
          "sft_spark.sh": ("apps/spark_13b/sft_spark.py", "apps/spark_13b/train_configs/13b_lora.json")}


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_composes_torchrun_from_env_and_checks_first(launcher, tmp_path):
    cfg = make_launch_run(tmp_path)
    cmd, out = dry_run(launcher, "--exp_group", "a b 'c'", "--config", str(cfg), GPUS_PER_NODE="3", NNODES="2",
                       NODE_RANK="1", MASTER_ENDPOINT="g3002", MASTER_PORT="12346", RANK="5")
    o = opts(cmd)
    assert cmd[0] == "torchrun"
    assert (o["nnodes"], o["nproc_per_node"], o["node_rank"]) == ("2", "3", "1")  # NODE_RANK wins over RANK
    assert (o["rdzv_backend"], o["rdzv_endpoint"]) == ("c10d", "g3002:12346")
    assert "SIGUSR1" in o["signals-to-handle"].split(",")
    worker = WIRING[launcher.name][0]
    # quotes and spaces stay one argument
    assert cmd[-5:] == [worker, "--train_config", str(cfg), "--exp_group", "a b 'c'"]
    assert "world          2 node(s) x 3 process(es) = 6" in out and "preflight      ok" in out


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_defaults_and_a_failed_preflight(launcher, tmp_path):
    # the launcher's own default train config (the big one), with its mixture pointed at a file that does not
    # exist (the checkout's own data may or may not be there, e.g. after the demo): the command is still printed,
    # then every problem, and nothing starts (exit 2)
    missing = tmp_path / "absent" / "mix.json"
    args = (*(("--lora",) if launcher.name == "sft_spark.sh" else ()), "--dataset_config", str(missing))
    cmd, out = dry_run(launcher, *args, rc=2, RANK="2", NNODES="3")
    o = opts(cmd)
    assert (o["node_rank"], o["nnodes"]) == ("2", "3")
    assert o["rdzv_endpoint"] == "localhost:12345"  # across nodes the port must be fixed, not random
    worker = cmd.index(WIRING[launcher.name][0])
    assert cmd[worker:worker + 3] == [WIRING[launcher.name][0], "--train_config", WIRING[launcher.name][1]]
    assert cmd[cmd.index("--dataset_config") + 1] == str(missing)
    assert "preflight: " in out and "nothing was started" in out and str(missing) in out
    if shutil.which("nvidia-smi") is None:
        assert o["nproc_per_node"] == "1"  # CPU: one process


def test_node_scripts_dry_run(tmp_path):
    env = {"RDZV_DIR": str(tmp_path)}
    cfg = str(make_launch_run(tmp_path / "run"))
    out = subprocess.run(["bash", "quick_start/run_master.sh", "--dry-run", "--nnodes", "2", "--port", "23456",
                          "--config", cfg, "--save", str(tmp_path / "a b")], cwd=ROOT,
                         env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"would publish the rendezvous file {tmp_path}/fm.env" in out.stdout
    cmd = shlex.split(next(ln for ln in out.stdout.splitlines() if ln.startswith("torchrun ")))
    o = opts(cmd)
    assert (o["nnodes"], o["node_rank"], o["rdzv_endpoint"]) == ("2", "0", f"{os.uname().nodename}:23456")
    assert cmd[-4:] == ["--train_config", cfg, "--save", str(tmp_path / "a b")]
    assert not (tmp_path / "fm.env").exists()

    out = subprocess.run(["bash", "quick_start/run_slave.sh", "--dry-run", "--master", "g3002:23456", "--nnodes", "3",
                          "--node-rank", "2", "--app", "apps/spark_13b/pretrain_spark.sh", "--config", cfg], cwd=ROOT,
                         env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(next(ln for ln in out.stdout.splitlines() if ln.startswith("torchrun ")))
    o = opts(cmd)
    assert (o["nnodes"], o["node_rank"], o["rdzv_endpoint"]) == ("3", "2", "g3002:23456")
    assert cmd[-3].endswith("pretrain_spark.py")


def test_slave_times_out_with_a_clear_error_and_ignores_a_stale_file(tmp_path):
    stale = tmp_path / "fm.env"
    stale.write_text("MASTER_ENDPOINT=deadhost\nMASTER_PORT=1\nNNODES=2\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # its master stopped touching it an hour ago
    t0 = time.monotonic()
    out = subprocess.run(["bash", "quick_start/run_slave.sh", "--timeout", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=clean_env(RDZV_DIR=str(tmp_path), RDZV_POLL="0.2"))
    assert out.returncode == 1
    assert f"no live master published {stale} within 2s" in out.stderr
    assert "run_master.sh" in out.stderr and "RDZV_TIMEOUT" in out.stderr
    assert time.monotonic() - t0 < 30


def test_master_forwards_usr1_to_the_workers(tmp_path):
    """A signal to the node script (as slurm's --signal=B:USR1 does) reaches the training process, which saves
    a checkpoint; torchrun is not signalled, so everything exits 0."""
    cfg = make_launch_run(tmp_path, train_iters=100000, save_iters=0)
    proc = subprocess.Popen(["bash", "quick_start/run_master.sh", "--config", str(cfg), "--save", str(tmp_path / "ck")],
                            cwd=ROOT, env=clean_env(RDZV_DIR=str(tmp_path / "rdzv")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stats = tmp_path / "ck" / "run" / "train_stats.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not stats.exists() or len(stats.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    assert (tmp_path / "rdzv" / "fm.env").is_file()
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "stop signal received" in out and "training exited with status 0 after SIGUSR1" in out
    (step,) = complete_steps(tmp_path / "ck" / "run")
    assert json.loads((tmp_path / "ck" / "run" / str(step) / ".log_ckpt").read_text())["reason"] == "signal"
    assert not (tmp_path / "rdzv" / "fm.env").exists()  # the master withdrew its address


def test_two_nodes_on_one_machine(tmp_path):
    """run_master.sh and run_slave.sh as plain bash: 2 nodes × 1 process form one world of size 2."""
    cfg = make_launch_run(tmp_path)
    env = clean_env(RDZV_DIR=str(tmp_path / "rdzv"), RDZV_POLL="0.5")
    common = ["--config", str(cfg), "--save", str(tmp_path / "ckpt dir")]
    slave = subprocess.Popen(["bash", "quick_start/run_slave.sh", *common], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)  # the slave starts first and waits for the master's file
    master = subprocess.Popen(["bash", "quick_start/run_master.sh", "--nnodes", "2", *common], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_m, _ = master.communicate(timeout=300)
    out_s, _ = slave.communicate(timeout=120)
    assert master.returncode == 0, out_m
    assert slave.returncode == 0, out_s
    assert "waiting up to 1800s for the master's rendezvous file" in out_s
    assert "NNODES=2 NODE_RANK=1" in out_s  # NNODES came from the master's file
    logs = out_m + out_s
    assert "engine fsdp, world size 2" in logs
    run = tmp_path / "ckpt dir" / "run"
    assert complete_steps(run) == [3, 6]
    assert json.loads((run / "6" / ".log_ckpt").read_text())["world_size"] == 2
    assert not (tmp_path / "rdzv" / "fm.env").exists()


# ------------------------------------------------------------------------------------------ shellcheck
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    out = subprocess.run(["shellcheck", "-x", "-s", "bash", str(script.relative_to(ROOT))], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_multinode_sbatch_dry_run(tmp_path):
    cfg = str(make_launch_run(tmp_path))
    out = subprocess.run(["bash", "quick_start/train_multinode.sbatch", "--dry-run", "--port", "29400",
                          "--config", cfg, "--save", "/tmp/a b"], cwd=ROOT,
                         env=clean_env(SLURM_JOB_NUM_NODES="3", SLURM_JOB_ID="77", MASTER_ENDPOINT="g3002"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    srun = shlex.split(next(ln for ln in lines if ln.startswith("srun ")))
    assert srun[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[6:8] == [str(ROOT / "quick_start" / "torchrun_cmd.sh"), "run-node"]
    assert srun[-2:] == ["--save", "/tmp/a b"]
    o = opts(shlex.split(next(ln for ln in lines if ln.startswith("torchrun "))))
    # One rendezvous id per job (the job id): two jobs on the same endpoint never join each other.
    assert (o["nnodes"], o["rdzv_endpoint"], o["rdzv_id"]) == ("3", "g3002:29400", "77")
    out = subprocess.run(["bash", "quick_start/train_multinode.sbatch"], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not inside a slurm job" in out.stderr


def test_usr1_during_setup_still_checkpoints(tmp_path):
    """slurm's warning can come while the model is still being built: the stop request must survive until
    the first step, which then saves and exits 0 (launch fix: handlers installed at the top of run())."""
    cfg = make_launch_run(tmp_path, train_iters=100000, save_iters=0)
    proc = subprocess.Popen(["bash", "quick_start/run_master.sh", "--config", str(cfg), "--save", str(tmp_path / "ck")],
                            cwd=ROOT, env=clean_env(RDZV_DIR=str(tmp_path / "rdzv")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "resolved train config" in line:  # logged during setup, before the model is built
            proc.send_signal(signal.SIGUSR1)
            break
    out = "".join(lines) + proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    assert "stop signal received: saving at iteration 1" in out
    assert complete_steps(tmp_path / "ck" / "run") == [1]
