"""The app launcher: ``fm train`` and every ``apps/*/*.sh`` (``python -m fm.launch app WORKER DEFAULT_CONFIG ...``).

It parses the command line (:mod:`fm.compat.argv`, the grammar its workers parse too), composes the torchrun
command, prints it, runs the preflight (:mod:`fm.train.preflight`) and only then replaces itself with torchrun.
Until the preflight, only the standard library and fm's torch-free modules are imported (a test keeps it so): a
mistake costs a second, not torch's import on a login node.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

from fm.launch.topology import EXIT_USAGE, LaunchError, topology, torchrun_command, torchrun_executable


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
