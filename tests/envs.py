"""Cached virtual environments for tests that need other versions of a library than the suite's own (an older
transformers, vLLM's pinned stack): built once per requirement set under ~/.cache/fm-test-envs, atomically
(in a temporary directory renamed into place, so a killed build is never reused), and reused after."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CACHE = Path(os.environ.get("FM_TEST_ENVS", Path.home() / ".cache" / "fm-test-envs"))


class EnvUnavailable(RuntimeError):
    """pip could not build the environment (no network, no wheel for this Python or CPU): the reason."""


def cached_env(name: str, requirements: Sequence[str], timeout: float = 1800) -> Path:
    """The python executable of an environment with exactly ``requirements`` installed."""
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    final = CACHE / f"{name}-{key}"
    python = final / "bin" / "python"
    if (final / "READY").is_file():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{name}-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        proc = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", *requirements],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise EnvUnavailable(f"pip install {' '.join(requirements)} failed:\n{proc.stderr[-3000:]}")
        (tmp / "READY").write_text("\n".join(requirements) + "\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same environment first
            if not (final / "READY").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python
