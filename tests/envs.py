"""Cached virtual environments for tests that need other versions than the suite's own (an older transformers,
vLLM's pinned stack), built by the tests themselves on first use.

An environment lives under ``~/.cache/fm-test-envs/<name>-<hash of its requirements>-py<X.Y>`` (``FM_TEST_ENVS``
moves the folder): a new pin is a new environment. It is built in a temporary folder beside it, under a file
lock, and renamed into place only once pip has finished and its import check passes, so a killed or
concurrent build is never reused. Only ``<env>/bin/python`` is used afterwards (the scripts' shebangs name the
temporary folder). ``python -m tests.envs vllm`` builds the vLLM one by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_REQUIREMENTS = ROOT / "requirements-vllm.txt"
MARKER = "fm-env-complete"
PIP_TIMEOUT = int(os.environ.get("FM_TEST_ENV_PIP_TIMEOUT", "3600"))


class EnvUnavailable(RuntimeError):
    """pip (or venv) could not make the environment: no network, no wheel for this Python or CPU, ..."""


def cache_root() -> Path:
    return Path(os.environ.get("FM_TEST_ENVS") or Path.home() / ".cache" / "fm-test-envs")


def python(env: Path) -> Path:
    return env / "bin" / "python"


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _run(cmd: list[str], log: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, text=True)


def ensure(name: str, requirements: Sequence[str] | Path, *, no_deps: bool = False, check: str = "") -> Path:
    """The environment's folder with ``requirements`` (pip arguments, or a requirements file) installed, built
    first when missing; ``check``: Python code that must run in it (an import), else the build fails.
    Raises EnvUnavailable when pip or venv cannot build it."""
    spec = requirements.read_text() if isinstance(requirements, Path) else "\n".join(requirements)
    digest = hashlib.sha256(f"{spec}\n{no_deps}\n{check}".encode()).hexdigest()[:16]
    final = cache_root() / f"{name}-{digest}-py{sys.version_info.major}.{sys.version_info.minor}"
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build finishes first; then its result is reused
        if (final / MARKER).is_file():
            return final
        for stale in final.parent.glob(f".{final.name}.build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no marker: not ours, or half-removed
            shutil.rmtree(final)
        tmp = final.parent / f".{final.name}.build-{os.getpid()}"
        log = final.parent / f"{final.name}.build.log"
        log.write_text("")
        pip_args = ["-r", str(requirements)] if isinstance(requirements, Path) else list(requirements)
        try:
            _build(tmp, log, pip_args + (["--no-deps"] if no_deps else []), check)
            (tmp / MARKER).write_text(spec)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build(tmp: Path, log: Path, pip_args: list[str], check: str) -> None:
    out = _run([sys.executable, "-m", "venv", str(tmp)], log, timeout=600)
    if out.returncode:
        raise EnvUnavailable(f"python -m venv failed:\n{_tail(log.read_text())}")
    py = str(python(tmp))
    try:
        out = _run([py, "-m", "pip", "install", "--no-input", "--progress-bar", "off", "--disable-pip-version-check",
                    *pip_args], log, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise EnvUnavailable(f"pip install {' '.join(pip_args)} took over {PIP_TIMEOUT} s (log: {log}):\n"
                             f"{_tail(log.read_text())}") from None
    if out.returncode:
        raise EnvUnavailable(f"pip install {' '.join(pip_args)} failed (log: {log}):\n{_tail(log.read_text())}")
    if check:  # installed, so from here on a problem is a real failure, not a reason to skip
        out = _run([py, "-c", check], log, timeout=600)
        if out.returncode:
            raise RuntimeError(f"the {tmp.name} environment installed but its check fails (log: {log}):\n"
                               f"{_tail(log.read_text())}")


def vllm() -> Path:
    """The vLLM (CPU build) environment of tests/integration/test_vllm.py: requirements-vllm.txt pins every
    package, installed without dependency resolution."""
    return ensure("vllm", VLLM_REQUIREMENTS, no_deps=True,
                  check="import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, "
                        "'transformers', transformers.__version__)")


if __name__ == "__main__":
    if sys.argv[1:] != ["vllm"]:
        sys.exit("usage: python -m tests.envs vllm")
    print(python(vllm()))
