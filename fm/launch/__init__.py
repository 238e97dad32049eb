"""Launching training: ``python -m fm.launch`` is the shell launchers' one entry point.

The shell launchers (``apps/*/*.sh``, ``quick_start/run_master.sh``, ``run_slave.sh``, ``train_multinode.sbatch``,
``torchrun_cmd.sh``) are thin wrappers around these commands::

    python -m fm.launch app WORKER.py DEFAULT_CONFIG [--dry-run] [--lora] [--config X.json] [--key value ...]
    python -m fm.launch node master|slave [--app PATH] [--config X.json] [--nnodes N] ... [--key value ...]
    python -m fm.launch multinode [--app PATH] [--config X.json] [--port P] [--requeue] [--dry-run] ...
    python -m fm.launch run-node CMD [ARGS...]        # one node's task of the multinode job
    python -m fm.launch signal-node SIG               # signal that task's training workers

By concern: :mod:`fm.launch.topology` (the environment's topology, the torchrun command), :mod:`fm.launch.app` (the
app launcher: command line, preflight, torchrun), :mod:`fm.launch.processes` (node tasks, signals to the
workers, requeue), :mod:`fm.launch.nodes` (master/slave rendezvous file, the multi-node slurm job). Only the
standard library is imported until the preflight runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fm.launch.app import app_help, app_main
from fm.launch.nodes import (
    Rendezvous,
    multinode_main,
    node_main,
    node_parser,
    node_pid_file,
    run_node_main,
    signal_node_main,
)
from fm.launch.processes import (
    NodeTask,
    descendants,
    forward_signal,
    is_torchrun,
    maybe_requeue,
    training_workers,
)
from fm.launch.topology import (
    EXIT_USAGE,
    SIGNALS,
    LaunchError,
    RendezvousTimeout,
    Topology,
    free_port,
    gpus_on_node,
    topology,
    torchrun_command,
    torchrun_executable,
)

__all__ = ["EXIT_USAGE", "SIGNALS", "LaunchError", "NodeTask", "Rendezvous", "RendezvousTimeout", "Topology",
           "app_help", "app_main", "descendants", "forward_signal", "free_port", "gpus_on_node", "is_torchrun",
           "main", "maybe_requeue", "multinode_main", "node_main", "node_parser", "node_pid_file", "run_node_main",
           "signal_node_main", "topology", "torchrun_command", "torchrun_executable", "training_workers"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("FM_ROOT_DIR") or Path(__file__).resolve().parents[2])
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
