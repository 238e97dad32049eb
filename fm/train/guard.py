"""One writer per run directory, and no worker that outlives its launcher.

* :class:`RunLock`: ``<run dir>/.lock`` names the host and pid of the run writing the directory and is
  refreshed every few seconds. A second run on the directory fails at once, saying who holds it; a lock
  whose holder is gone (a dead pid on this host, or no refresh for :data:`STALE_AFTER_S`) is taken over
  with a warning. Rank 0 holds it for the whole run.
* :func:`watch_launcher`: torchrun starts every worker in its own session, so killing torchrun (or its
  process group) leaves the workers running. A worker whose launcher disappears stops within a second or
  two, before it writes anything more (no checkpoint: the last committed one stays the resume point).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fm.errors import FmError
from fm.io import atomic_write_bytes

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
REFRESH_S = 5.0
STALE_AFTER_S = 60.0
EXIT_ORPHANED = 143  # as if terminated: the launcher is gone


class RunLockError(FmError, RuntimeError):
    """The run directory is being written by another live run."""


def _alive(holder: dict[str, Any], age_s: float) -> bool:
    if age_s > STALE_AFTER_S:
        return False  # its refresher stopped: the holder is gone (or hung beyond saving anything)
    if holder.get("host") != socket.gethostname():
        return True  # another machine's pid cannot be checked from here; its lock is fresh
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
        self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            holder, age = {}, float("inf")
        if _alive(holder, age):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise RunLockError(f"{self.path.parent} is being written by pid {holder.get('pid')} on "
                               f"{holder.get('host')} (running since {since}; lock {self.path}): wait for that run, "
                               "stop it, or give this one another model_unique or save directory")
        log.warning("%s: taking over the lock of pid %s on %s, which is gone", self.path.parent, holder.get("pid"),
                    holder.get("host"))
        atomic_write_bytes(json.dumps(self.me).encode(), self.path)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(poll_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun: a daemon thread that ends this process when its launcher (the parent) is gone."""
    if not launched_by_torchrun():
        return None  # a plain `python …` run (nohup, a shell that exits) keeps going, as users expect
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                sys.stderr.write(f"fm: the launcher (pid {parent}) is gone: stopping worker {os.getpid()} now, "
                                 "without writing anything more\n")
                sys.stderr.flush()
                os._exit(EXIT_ORPHANED)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
