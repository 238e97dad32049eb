"""Shared fixtures: the shipped demo tokenizer, small corpora, and GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_PATH = ROOT / "quick_start" / "tokenizer.model"
INSTRUCTIONS_PATH = ROOT / "quick_start" / "data" / "instructions.jsonl"


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
