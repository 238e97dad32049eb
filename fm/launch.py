"""Launching: the torchrun command from the environment, the preflight, signal forwarding and slurm node roles.

The shell launchers (``apps/*/*.sh``, ``quick_start/run_master.sh``, ``run_slave.sh``,
``train_multinode.sbatch``, ``torchrun_cmd.sh``) are thin wrappers around the commands here::

    python -m fm.launch app WORKER.py DEFAULT_CONFIG [--dry-run] [--lora] [--config X.json] [--key value …]
    python -m fm.launch node master|slave [--app PATH] [--config X.json] [--nnodes N] … [--key value …]
    python -m fm.launch multinode [--app PATH] [--config X.json] [--port P] [--requeue] [--dry-run] …
    python -m fm.launch run-node CMD [ARGS…]        # one node's task of the multinode job
    python -m fm.launch signal-node SIG             # signal that task's training workers

The topology comes from the variables users already set: ``GPUS_PER_NODE`` [slurm's GPUs, else
``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``, else 1], ``NNODES`` [1], ``NODE_RANK`` [``$RANK``, else 0],
``MASTER_ENDPOINT`` [localhost], ``MASTER_PORT`` [a free port on one node, else 12345], ``SIGNALS_TO_HANDLE``,
``RDZV_ID``, and slurm's (``SLURM_GPUS_ON_NODE``, ``SLURM_JOB_ID``, ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``,
``SLURM_JOB_NUM_NODES``). Only the standard library is imported until the preflight runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fm.errors import FmError

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
FORWARDED = ("USR1", "TERM", "INT", "HUP")  # what a node task passes on to the training workers
EXIT_USAGE = 2


def say(msg: str) -> None:
    print(f"[fm] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ topology
def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs this process may use: slurm's count, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else 1 (CPU)."""
    n = env.get("SLURM_GPUS_ON_NODE", "")
    if n.isdigit() and int(n) > 0:
        return int(n)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible != "-1":
        return len(visible.split(","))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU"))
        if count:
            return count
    return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Topology:
    nproc: int
    nnodes: int
    node_rank: int
    master: str
    port: int
    rdzv_id: str = "1"
    signals: str = SIGNALS

    def exports(self) -> dict[str, str]:
        return {"GPUS_PER_NODE": str(self.nproc), "NNODES": str(self.nnodes), "NODE_RANK": str(self.node_rank),
                "MASTER_ENDPOINT": self.master, "MASTER_PORT": str(self.port)}


def topology(env: Mapping[str, str]) -> Topology:
    """The launcher's defaults, each overridden by its environment variable (see the module docstring)."""
    nnodes = _int(env, "NNODES", 1)
    port = env.get("MASTER_PORT") or ""
    # one node: a free port avoids clashes between jobs on one machine; across nodes every node must agree
    port_n = int(port) if port else (free_port() if nnodes == 1 else 12345)
    return Topology(
        nproc=_int(env, "GPUS_PER_NODE", 0) or gpus_on_node(env), nnodes=nnodes,
        node_rank=_int(env, "NODE_RANK", _int(env, "RANK", 0)), master=env.get("MASTER_ENDPOINT") or "localhost",
        port=port_n, rdzv_id=env.get("RDZV_ID") or "1", signals=env.get("SIGNALS_TO_HANDLE") or SIGNALS)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} must be an integer") from None


class LaunchError(FmError, RuntimeError):
    """A launch cannot start; the message says what to change."""


class RendezvousTimeout(LaunchError):
    """No live master appeared in time (exit 1: a slave that waited, not a usage error)."""


def torchrun_command(target: Sequence[str], topo: Topology) -> list[str]:
    """One torchrun command (c10d rendezvous) for ``target`` (``[script.py, args…]`` or ``["-m", module, …]``)."""
    return ["torchrun", f"--nnodes={topo.nnodes}", f"--nproc_per_node={topo.nproc}", f"--node_rank={topo.node_rank}",
            f"--rdzv_id={topo.rdzv_id}", "--rdzv_backend=c10d", f"--rdzv_endpoint={topo.master}:{topo.port}",
            f"--signals-to-handle={topo.signals}", *target]


def torchrun_executable() -> list[str]:
    """torchrun beside this Python (a venv), else this Python's ``-m torch.distributed.run`` (the same program),
    never some other environment's torchrun from PATH: the workers must import this fm."""
    sibling = Path(sys.executable).with_name("torchrun")
    return [str(sibling)] if sibling.is_file() else [sys.executable, "-m", "torch.distributed.run"]


# ------------------------------------------------------------------------------------------ app launcher
def app_main(worker: Sequence[str], default_config: str, argv: Sequence[str], *, prog: str,
             env: Mapping[str, str] | None = None, lora_default: str | None = None, family: str | None = None,
             replace: bool = True) -> int:
    """What an app launcher does: compose the torchrun command, print it, check everything the workers will need
    (the preflight), then, unless ``--dry-run`` or a problem, replace this process with torchrun (``replace``;
    else run it as a child and return its exit status). The command line is :mod:`fm.compat.argv`'s, the one the
    workers parse too."""
    from fm.compat.argv import choose_config, parse_train_args
    from fm.errors import ConfigError

    env = dict(os.environ if env is None else env)
    try:
        args = parse_train_args(argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.help:
        print(app_help(prog, default_config))
        return 0
    config = choose_config(args, default_config, lora_default, env.get("TRAIN_CONFIG"))
    if not config:
        print(f"{prog}: error: no train config: give --config TRAIN.json (or set TRAIN_CONFIG); --help lists the "
              "keys", file=sys.stderr)
        return EXIT_USAGE
    try:
        topo = topology(env)
    except LaunchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    cmd = torchrun_command([*worker, "--train_config", config, *args.argv()], topo)
    print(shlex.join(cmd), flush=True)
    from fm.train.preflight import preflight

    report = preflight(config, args.overrides, world_size=topo.nnodes * topo.nproc, family=family)
    if args.dry_run:
        print(report.plan(topo), flush=True)
    if report.problems:
        print(report.message(), file=sys.stderr, flush=True)
        return EXIT_USAGE
    if args.dry_run:
        return 0
    env.update(topo.exports())
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # a big model saves for longer than torchrun's 30 s
    run = [*torchrun_executable(), *cmd[1:]]
    if not replace:
        return subprocess.run(run, env=env).returncode
    os.execve(run[0], run, env)
    return 0  # not reached


def app_help(prog: str, default_config: str) -> str:
    import textwrap

    from fm.train.config import keys_help

    default = f", else {default_config}" if default_config else ""
    intro = textwrap.fill(
        "Start training with torchrun on this machine: one process per GPU (one on a CPU-only machine). The train "
        f"config is --config TRAIN.json (else $TRAIN_CONFIG{default}); every --key value overrides one of its keys "
        "(last wins). Before any worker starts, the train config, the model config, the tokenizer, the dataset "
        "config (paths, weights, transforms), the weights to load and the output directories are checked; every "
        "problem is reported at once and nothing starts (exit 2).", 100)
    return f"""usage: {prog} [--dry-run] [--config TRAIN.json] [--lora] [--key value ...]

{intro}

options:
  --dry-run       print the torchrun command and the resolved plan, start nothing (exit 2 on a problem)
  --config PATH   the train config JSON (a --config naming a model config is the 'config' key)
  --lora          same as --lora true (the app's LoRA train config when --config is not given)
  -h, --help      this help

environment (defaults in brackets):
  GPUS_PER_NODE [slurm's GPUs, CUDA_VISIBLE_DEVICES, nvidia-smi, else 1]  NNODES [1]  NODE_RANK [$RANK, else 0]
  MASTER_ENDPOINT [localhost]  MASTER_PORT [a free port on one node, else 12345]  TRAIN_CONFIG  SIGNALS_TO_HANDLE

train keys (--key value; docs/training.md):
{keys_help()}"""


# ------------------------------------------------------------------------------------------ processes and signals
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(d))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_torchrun(argv: Sequence[str]) -> bool:
    """``torchrun …``, ``python …/torchrun …`` or ``python -m torch.distributed.run …``."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "torchrun":
        return True
    return len(argv) > 1 and (os.path.basename(argv[1]) == "torchrun" or argv[1:3] in (
        ["-m", "torch.distributed.run"], ["-m", "torch.distributed.launch"]))


def training_workers(pid: int) -> list[int]:
    """The training processes under ``pid``: the children of the torchrun agent(s) there. The signal goes to them,
    not to torchrun: torchrun forwards the signals it handles, but then exits 1 with a SignalException traceback
    even when every worker checkpointed and exited 0; signalled workers finish and torchrun exits 0."""
    tree = _children()
    out = []
    for p in [pid, *descendants(pid)]:
        if is_torchrun(_cmdline(p)):
            out += tree.get(p, [])
    return out


class NodeTask:
    """Runs a command as a child and waits for it; USR1/TERM/INT/HUP sent to this process (slurm's
    ``--signal=B:USR1@T``, ``scancel --batch --signal=USR1``) reach the training workers below it, which save a
    checkpoint and exit. ``forward`` replaces how a signal is passed on (the multinode job signals every node)."""

    def __init__(self, cmd: Sequence[str], *, forward: Callable[[str, int], None] | None = None,
                 on_signal: Callable[[], None] | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | None = None):
        self.cmd, self.forward, self.on_signal = list(cmd), forward or forward_signal, on_signal
        self.env, self.cwd = env, cwd
        self.got_signal = ""

    def run(self) -> int:
        child = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd)
        old = {}

        def handler(signum: int, frame) -> None:  # noqa: ARG001
            name = signal.Signals(signum).name.removeprefix("SIG")
            self.got_signal = name
            if self.on_signal:
                self.on_signal()
            self.forward(name, child.pid)

        for name in FORWARDED:
            sig = getattr(signal, f"SIG{name}")
            old[sig] = signal.signal(sig, handler)
        try:
            while True:
                try:
                    return child.wait()
                except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                    continue
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


def forward_signal(name: str, pid: int) -> None:
    """Deliver SIG``name`` to the training workers under ``pid`` (to ``pid`` itself if there are none yet)."""
    sig = getattr(signal, f"SIG{name}")
    workers = training_workers(pid)
    if workers:
        say(f"got SIG{name}: forwarding to the training processes ({' '.join(map(str, workers))}) to checkpoint "
            "and exit")
        targets = workers
    else:
        say(f"got SIG{name}: no torchrun workers below {pid} (yet, or on other nodes): forwarding to {pid}")
        targets = [pid]
    for p in targets:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def maybe_requeue(rc: int, got_signal: str, env: Mapping[str, str]) -> int:
    """With REQUEUE=1 inside a slurm job that received a stop signal, put the job back in the queue (it resumes
    from the latest checkpoint: resume_ckpt "latest"). Otherwise ``rc``."""
    if env.get("REQUEUE", "0") == "1" and got_signal:
        job = env.get("SLURM_JOB_ID")
        if job:
            say(f"REQUEUE=1 and SIG{got_signal}: scontrol requeue {job} (training exited with {rc})")
            subprocess.run(["scontrol", "requeue", job], check=True)
            return 0
        say("REQUEUE=1 but not inside a slurm job (SLURM_JOB_ID unset): not requeued")
    return rc


# ------------------------------------------------------------------------------------------ rendezvous file
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


# ------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("FM_ROOT_DIR") or Path(__file__).resolve().parents[1])
    usage = ("usage: python -m fm.launch app WORKER DEFAULT_CONFIG [ARGS…] | node master|slave [ARGS…] | "
             "multinode [ARGS…] | run-node CMD [ARGS…] | signal-node SIG")
    if not argv:
        print(usage, file=sys.stderr)
        return EXIT_USAGE
    cmd, rest = argv[0], argv[1:]
    if cmd == "app" and len(rest) >= 2:
        # app WORKER DEFAULT_CONFIG [--lora-config=X] [--family=F] [--prog=P] -- ARGS…
        worker, default, rest = rest[0], rest[1], rest[2:]
        opts = {}
        while rest and rest[0] != "--" and rest[0].startswith("--") and "=" in rest[0]:
            k, v = rest.pop(0)[2:].split("=", 1)
            opts[k] = v
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return app_main([worker], default, rest, prog=opts.get("prog", f"launch {worker}"),
                        lora_default=opts.get("lora-config"), family=opts.get("family"))
    if cmd == "node" and rest[:1] in (["master"], ["slave"]):
        return node_main(rest[0], root, rest[1:])
    if cmd == "multinode":
        return multinode_main(root, rest)
    if cmd == "run-node" and rest:
        return run_node_main(rest)
    if cmd == "signal-node":
        return signal_node_main(rest[0] if rest else "USR1")
    print(usage, file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
