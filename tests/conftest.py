"""Shared fixtures: the shipped demo tokenizer, small corpora, GPU skipping, and the guard that fails the session
when a test wrote inside the checkout (tests write only under their ``tmp_path``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_PATH = ROOT / "quick_start" / "tokenizer.model"
INSTRUCTIONS_PATH = ROOT / "quick_start" / "data" / "instructions.jsonl"


# Written by the tools that run the suite, not by tests: the venv, bytecode, pytest's and ruff's caches, the
# editable install's metadata.
_TOOL_PATHS = (".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")


def checkout_files() -> dict[str, tuple[str, int, int]]:
    """Every file git does not see as clean (modified, untracked or ignored) outside the tools' own folders:
    path -> (git status, mtime_ns, size), so a test that creates, changes or removes one shows up."""
    out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--ignored", "--untracked-files=all", "--", ".",
                          *(f":(exclude,glob){p}" for p in _TOOL_PATHS)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = {}
    for entry in filter(None, out.split("\0")):
        code, path = entry[:2], entry[3:]
        try:
            st = os.lstat(ROOT / path)
            files[path] = (code, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            files[path] = (code, 0, -1)
    return files


def pytest_sessionstart(session):
    session.config._fm_checkout_before = checkout_files() if (ROOT / ".git").exists() else None


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_fm_checkout_before", None)
    if before is None:
        return
    after = checkout_files()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        shown = "\n  ".join(changed[:20]) + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else "")
        print(f"\nERROR: the test session created, changed or removed files inside the checkout {ROOT} (tests write "
              f"only under their tmp_path):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run on a GPU host to cover it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(TOKENIZER_PATH)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from fm.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tests run on 2 cores, often with 2 processes: keep torch from oversubscribing.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
