"""Where the workers run: the topology from the environment users already set, and the torchrun command.

The variables (defaults in brackets): ``GPUS_PER_NODE`` [slurm's GPUs, else ``CUDA_VISIBLE_DEVICES``, else
``nvidia-smi``, else 1], ``NNODES`` [1], ``NODE_RANK`` [``$RANK``, else 0], ``MASTER_ENDPOINT`` [localhost],
``MASTER_PORT`` [a free port on one node, else 12345], ``SIGNALS_TO_HANDLE``, ``RDZV_ID``. Standard library only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fm.errors import FmError

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
FORWARDED = ("USR1", "TERM", "INT", "HUP")  # what a node task passes on to the training workers
EXIT_USAGE = 2


def say(msg: str) -> None:
    print(f"[fm] {msg}", file=sys.stderr, flush=True)


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
