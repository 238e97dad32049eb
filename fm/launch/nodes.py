"""Several machines: the master/slave scripts (a rendezvous file on shared storage) and one multi-node slurm job
(``srun`` of one node task per machine, stop signals delivered through an extra step)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fm.launch.processes import NodeTask, forward_signal, maybe_requeue
from fm.launch.topology import (
    EXIT_USAGE,
    SIGNALS,
    LaunchError,
    RendezvousTimeout,
    Topology,
    free_port,
    gpus_on_node,
    say,
    topology,
)


class Rendezvous:
    """The master's address in a file on shared storage, written atomically and touched while the master lives (a
    heartbeat: slaves ignore a file whose master died without cleaning up). Read as KEY=value, never executed."""

    def __init__(self, path: Path, env: Mapping[str, str]):
        self.path, self.env = Path(path), env
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, topo: Topology) -> None:
        from fm.io import atomic_write_bytes

        text = (f"# written by quick_start/run_master.sh; slaves read it (quick_start/run_slave.sh)\n"
                f"MASTER_ENDPOINT={topo.master}\nMASTER_PORT={topo.port}\nNNODES={topo.nnodes}\n"
                f"MASTER_JOB={self.env.get('SLURM_JOB_ID') or f'pid{os.getpid()}'}\n"
                f"STARTED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(text.encode(), self.path)
        beat = float(self.env.get("RDZV_HEARTBEAT") or 15)
        self._thread = threading.Thread(target=self._heartbeat, args=(beat,), daemon=True)
        self._thread.start()
        say(f"master: published {topo.master}:{topo.port} (NNODES={topo.nnodes}) in {self.path}")

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def withdraw(self) -> None:
        """At once on a stop signal, so that a requeued slave never reads a stale address."""
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def fresh(self) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        return st.st_size > 0 and time.time() - st.st_mtime <= float(self.env.get("RDZV_STALE") or 120)

    def read(self) -> dict[str, str]:
        out = {}
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            k, eq, v = line.partition("=")
            if eq and not k.startswith("#"):
                out[k.strip()] = v.strip()
        return out

    def wait(self, timeout: float) -> dict[str, str]:
        poll = float(self.env.get("RDZV_POLL") or 2)
        start, said = time.monotonic(), False
        while not self.fresh():
            if time.monotonic() - start >= timeout:
                raise RendezvousTimeout(
                    f"no live master published {self.path} within {timeout:g}s. Submit quick_start/run_master.sh "
                    "with the same --name/RDZV_NAME and a --rdzv-dir/RDZV_DIR on storage shared by all machines, "
                    "raise RDZV_TIMEOUT, or give the master with --master HOST:PORT.")
            if not said:
                say(f"slave: waiting up to {timeout:g}s for the master's rendezvous file {self.path}")
                said = True
            time.sleep(poll)
        values = self.read()
        if not all(values.get(k) for k in ("MASTER_ENDPOINT", "MASTER_PORT", "NNODES")):
            raise LaunchError(f"{self.path} lacks MASTER_ENDPOINT, MASTER_PORT or NNODES; delete it, restart the "
                              "master")
        return values


# ------------------------------------------------------------------------------------------ master / slave
NODE_OPTIONS = {  # option: (variable, help)
    "--app": ("APP", "app launcher [apps/fm9g_2b/pretrain_dragonfly.sh]"),
    "--config": ("TRAIN_CONFIG", "train config JSON [the launcher's default]"),
    "--name": ("RDZV_NAME", "rendezvous name, the same for master and slaves [fm]"),
    "--rdzv-dir": ("RDZV_DIR", "shared directory for it [<checkout>/data/rendezvous]"),
    "--nnodes": ("NNODES", "number of machines [master: 1; slave: from the file]"),
    "--port": ("MASTER_PORT", "master: rendezvous port [a free port]"),
    "--node-rank": ("NODE_RANK", "slave: this machine's rank (1, 2, ...) [$RANK, else 1]"),
    "--master": ("MASTER_ENDPOINT", "slave: HOST[:PORT], skip the rendezvous file (give --nnodes too)"),
    "--timeout": ("RDZV_TIMEOUT", "slave: seconds to wait for the master [1800]"),
}


def node_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"quick_start/run_{role}.sh", add_help=True,
        description=f"One machine ({role}) of a multi-node torchrun training; every option is also an environment "
                    "variable. Other arguments go to the app launcher: train config overrides (--train_iters 1000).",
        epilog="Environment: GPUS_PER_NODE [slurm's GPUs, else detected, else 1], SIGNALS_TO_HANDLE, FM_ROOT.")
    for opt, (var, text) in NODE_OPTIONS.items():
        p.add_argument(opt, dest=var, help=f"{text} (${var})")
    p.add_argument("--train-config", dest="TRAIN_CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--requeue", action="store_true", help="requeue the job after a stop signal (resumes from "
                   "latest) (REQUEUE=1)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return p


def node_main(role: str, root: Path, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    args, rest = node_parser(role).parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    prog = f"run_{role}.sh"
    for var, _ in NODE_OPTIONS.values():
        if getattr(args, var, None) is not None:
            env[var] = getattr(args, var)
    if args.requeue:
        env["REQUEUE"] = "1"
    if args.MASTER_ENDPOINT and ":" in args.MASTER_ENDPOINT:
        env["MASTER_ENDPOINT"], env["MASTER_PORT"] = args.MASTER_ENDPOINT.rsplit(":", 1)
    app = _app_path(env.get("APP") or "apps/fm9g_2b/pretrain_dragonfly.sh", root)
    if not app.is_file():
        print(f"{prog}: error: app launcher {app} not found (--app / APP, e.g. apps/fm9g_2b/pretrain_dragonfly.sh)",
              file=sys.stderr)
        return EXIT_USAGE
    rdzv = Rendezvous(Path(env.get("RDZV_DIR") or root / "data" / "rendezvous") / f"{env.get('RDZV_NAME') or 'fm'}.env",
                      env)
    env["GPUS_PER_NODE"] = env.get("GPUS_PER_NODE") or str(gpus_on_node(env))
    # torchrun reads PET_<OPTION> for options a launcher does not pass: make sure slurm's USR1 is handled.
    env["PET_SIGNALS_TO_HANDLE"] = env.get("SIGNALS_TO_HANDLE") or SIGNALS
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    try:
        if role == "master":
            env["NNODES"] = env.get("NNODES") or "1"
            env["NODE_RANK"] = "0"
            env["MASTER_ENDPOINT"] = env.get("MASTER_ENDPOINT") or socket.gethostname()
            env["MASTER_PORT"] = env.get("MASTER_PORT") or str(free_port())
        else:
            env["NODE_RANK"] = env.get("NODE_RANK") or env.get("RANK") or "1"
            if env.get("MASTER_ENDPOINT"):
                env["MASTER_PORT"] = env.get("MASTER_PORT") or "12345"
                if not env.get("NNODES"):
                    raise LaunchError("with --master/MASTER_ENDPOINT give --nnodes/NNODES too")
            elif args.dry_run:
                print(f"[fm] slave (dry run): would wait for the master's rendezvous file {rdzv.path}")
                return 0
            else:
                found = rdzv.wait(float(env.get("RDZV_TIMEOUT") or 1800))
                env["MASTER_ENDPOINT"], env["MASTER_PORT"] = found["MASTER_ENDPOINT"], found["MASTER_PORT"]
                env["NNODES"] = env.get("NNODES") or found["NNODES"]
                say(f"slave: master is {env['MASTER_ENDPOINT']}:{env['MASTER_PORT']} (NNODES={env['NNODES']}, job "
                    f"{found.get('MASTER_JOB', '?')})")
        topo = topology(env)
    except LaunchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RendezvousTimeout) else EXIT_USAGE
    print(f"[fm] {role} on {socket.gethostname()}: NNODES={topo.nnodes} NODE_RANK={topo.node_rank} "
          f"MASTER={topo.master}:{topo.port} GPUS_PER_NODE={topo.nproc} job={env.get('SLURM_JOB_ID') or 'none'} "
          f"restarts={env.get('SLURM_RESTART_COUNT') or 0}", flush=True)
    env.update(topo.exports())
    if args.dry_run:
        if role == "master":
            print(f"[fm] master (dry run): would publish the rendezvous file {rdzv.path}", flush=True)
        return subprocess.run(["bash", str(app), "--dry-run", *rest], env=env).returncode
    if role == "master":
        rdzv.publish(topo)
    task = NodeTask(["bash", str(app), *rest], env=env, cwd=str(root),
                    on_signal=rdzv.withdraw if role == "master" else None)
    try:
        rc = task.run()
    finally:
        if role == "master":
            rdzv.withdraw()
    say(f"{role}: training exited with status {rc}" + (f" after SIG{task.got_signal}" if task.got_signal else ""))
    return maybe_requeue(rc, task.got_signal, env)


def _app_path(app: str, root: Path) -> Path:
    p = Path(app)
    return p if p.is_absolute() else root / p


# ------------------------------------------------------------------------------------------ one multi-node job
def node_pid_file(env: Mapping[str, str]) -> Path:
    """Where the run-node task of this job on this machine records its pid (node-local)."""
    name = f"fm-node-{env.get('SLURM_JOB_ID') or 0}-{env.get('SLURM_NODEID') or 0}.pid"
    return Path(env.get("FM_PID_DIR") or "/tmp") / name


def run_node_main(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """One node's task of the multinode job (srun runs it once per node): node rank from slurm; records its pid so
    that ``signal-node`` (a later srun step on the same node) can find it."""
    env = dict(os.environ if env is None else env)
    env["NODE_RANK"] = env.get("SLURM_NODEID") or env.get("NODE_RANK") or "0"
    env["GPUS_PER_NODE"] = env.get("GPUS_PER_NODE") or str(gpus_on_node(env))
    pid_file = node_pid_file(env)
    pid_file.write_text(str(os.getpid()))
    try:
        return NodeTask(cmd, env=env).run()
    finally:
        pid_file.unlink(missing_ok=True)


def signal_node_main(name: str, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    pid_file = node_pid_file(env)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        say(f"signal-node: no running node task on {socket.gethostname()} ({pid_file})")
        return 0
    forward_signal(name.removeprefix("SIG"), pid)
    return 0


def multinode_main(root: Path, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    p = argparse.ArgumentParser(prog="train_multinode.sbatch", description="multi-node training in one slurm job")
    p.add_argument("--app", dest="APP", help="app launcher [apps/fm9g_2b/pretrain_dragonfly.sh] ($APP)")
    p.add_argument("--config", "--train-config", dest="TRAIN_CONFIG", help="train config JSON ($TRAIN_CONFIG)")
    p.add_argument("--port", dest="MASTER_PORT", help="rendezvous port [20000 + job id %% 20000] ($MASTER_PORT)")
    p.add_argument("--requeue", action="store_true", help="requeue the job after a stop signal (REQUEUE=1)")
    p.add_argument("--dry-run", action="store_true", help="print the srun and torchrun commands, run nothing")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    for var in ("APP", "TRAIN_CONFIG", "MASTER_PORT"):
        if getattr(args, var):
            env[var] = getattr(args, var)
    if args.requeue:
        env["REQUEUE"] = "1"
    if not env.get("SLURM_JOB_ID") and not args.dry_run:
        print("train_multinode.sbatch: error: not inside a slurm job: submit it with sbatch (or try --dry-run)",
              file=sys.stderr)
        return EXIT_USAGE
    app = _app_path(env.get("APP") or "apps/fm9g_2b/pretrain_dragonfly.sh", root)
    if not app.is_file():
        print(f"train_multinode.sbatch: error: app launcher {app} not found (--app / APP)", file=sys.stderr)
        return EXIT_USAGE
    if env.get("SLURM_JOB_NODELIST") and not env.get("MASTER_ENDPOINT"):  # the first node; every node agrees
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        env["MASTER_ENDPOINT"] = hosts[0]
    env["MASTER_ENDPOINT"] = env.get("MASTER_ENDPOINT") or "localhost"
    job = env.get("SLURM_JOB_ID") or "0"
    env["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + int(job) % 20000)
    env["NNODES"] = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    env["RDZV_ID"] = env.get("RDZV_ID") or job  # one rendezvous per job: two jobs on one endpoint never join
    env["PET_SIGNALS_TO_HANDLE"] = env.get("SIGNALS_TO_HANDLE") or SIGNALS
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    nnodes = env["NNODES"]
    # One task per node, each running the launcher under run-node (which forwards USR1/TERM to its workers);
    # --kill-on-bad-exit ends the other nodes when one fails.
    cmd = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           "bash", str(root / "quick_start" / "torchrun_cmd.sh"), "run-node", "bash", str(app), *rest]
    print(f"[fm] multinode job {env.get('SLURM_JOB_ID') or 'none'} (restarts {env.get('SLURM_RESTART_COUNT') or 0}): "
          f"NNODES={nnodes} MASTER={env['MASTER_ENDPOINT']}:{env['MASTER_PORT']}", flush=True)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return subprocess.run(["bash", str(app), "--dry-run", *rest], env={**env, "NODE_RANK": "0"}).returncode

    def via_srun(name: str, pid: int) -> None:
        # Signalling srun would make slurm signal every process of the step, torchrun included, which then exits 1
        # even after a clean checkpoint; instead an extra step on every node (--overlap) signals just the workers.
        say(f"got SIG{name}: asking the training processes on all {nnodes} node(s) to checkpoint and exit")
        step = subprocess.run(["srun", "--overlap", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1",
                               "--cpus-per-task=1", "bash", str(root / "quick_start" / "torchrun_cmd.sh"),
                               "signal-node", name], env=env)
        if step.returncode != 0:
            say(f"the signal step failed: signalling srun ({pid}) instead")
            os.kill(pid, getattr(signal, f"SIG{name}"))

    task = NodeTask(cmd, forward=via_srun, env=env, cwd=str(root))
    rc = task.run()
    say(f"multinode: training exited with status {rc}" + (f" after SIG{task.got_signal}" if task.got_signal else ""))
    return maybe_requeue(rc, task.got_signal, env)
