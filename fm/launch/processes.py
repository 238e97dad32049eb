"""Processes and signals: a node's task, the training workers below it, and what a stop signal does to them."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from fm.launch.topology import FORWARDED, say


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
