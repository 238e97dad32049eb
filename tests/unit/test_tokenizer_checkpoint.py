"""A run's checkpoints carry the tokenizer it read at its start: with ``data.tokenizer`` empty a resumed run takes
the resume step's tokenizer, and later saves must not read that step directory again (keep_last_n deletes it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from fm.checkpoint.layout import find_latest, list_checkpoints
from fm.tokenizer import load_tokenizer
from fm.train.config import load_config
from fm.train.trainer import Trainer
from tests.helpers import make_mixture
from tests.support.hf_fixtures import build_hf_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "apps" / "fm9g_2b" / "model_configs" / "tiny.json")


class _Snap:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class OneProcess:
    """Enough of an engine for the checkpointer in a world of one (tiny model and optimizer states)."""

    rank, world_size, is_main, name = 0, 1, True, "stub"

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, src=0):
        return obj

    def barrier(self):
        pass

    def snapshot_model(self):
        return _Snap({"w": torch.zeros(2)})

    def snapshot_optimizer(self):
        return _Snap({"m": torch.zeros(2)})

    def write_optimizer(self, snap, d: Path):
        d.mkdir(parents=True, exist_ok=True)
        torch.save(snap, d / "state.pt")
        return ["state.pt"]

    def release_snapshot(self, what):
        pass


def _trainer(tmp_path: Path, tokenizer: str, resume: str) -> Trainer:
    mix = make_mixture(tmp_path, {"t": ([{"input": "", "output": "hello world"}] * 4, {})})
    cfg = load_config(None, {"config": TINY, "engine": "fsdp", "dtype": "fp32", "max_length": 32, "batch_size": 1,
                             "train_iters": 100, "warmup_iters": 1, "save": str(tmp_path / "ckpt"), "tensorboard": "",
                             "model_unique": "run", "dataset_config": mix, "tokenizer_path": tokenizer,
                             "resume_ckpt": resume, "keep_last_n": 1})
    tr = Trainer(cfg, OneProcess())
    tr.build_loader()  # the tokenizer: data.tokenizer, or (empty) the resume checkpoint's
    from fm.models.registry import load_model_config

    tr.model_config = load_model_config(TINY)
    tr.scheduler = SimpleNamespace(num_iters=0, state_dict=lambda: {}, load_state_dict=lambda s: None)
    tr.lora_config = None
    tr.build_checkpointer()
    return tr


def test_resumed_run_with_the_checkpoints_tokenizer_saves_after_pruning(tmp_path):
    hf_dir = build_hf_tokenizer(tmp_path / "tok")
    first = _trainer(tmp_path, str(hf_dir), "")
    first.checkpointer.save(5)
    first.checkpointer.wait()
    run = first.cfg.run.dir()
    assert find_latest(run) == 5 and (run / "5" / "tokenizer" / "tokenizer.json").is_file()

    tr = _trainer(tmp_path, "", "latest")  # data.tokenizer "": the tokenizer of <run>/5
    assert Path(tr.tokenizer.path) == run / "5" / "tokenizer"
    tr.checkpointer.save(6)  # keep_last_n 1: step 5 (the tokenizer's source) is deleted
    tr.checkpointer.save(7)
    tr.checkpointer.wait()
    assert list_checkpoints(run) == [7]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (run / "7" / "tokenizer" / name).read_bytes() == (hf_dir / name).read_bytes()
    complete = json.loads((run / "7" / "COMPLETE").read_text())
    assert "tokenizer/tokenizer.json" in complete["files"]
    assert load_tokenizer(run / "7" / "tokenizer").encode("hello") == load_tokenizer(hf_dir).encode("hello")


def _fsynced(monkeypatch) -> list[str]:
    """The paths fsynced from now on (file descriptors read back through /proc)."""
    import os

    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_tokenizer_files_written_are_fsynced(tmp_path, monkeypatch):
    from fm.checkpoint.commit import tokenizer_part
    from fm.tokenizer import copy_tokenizer_files, resolve_tokenizer

    hf_dir = build_hf_tokenizer(tmp_path / "tok")
    step = tmp_path / "step"
    step.mkdir()
    seen = _fsynced(monkeypatch)
    written = tokenizer_part(hf_dir)(step)
    tok_dir = step / "tokenizer"
    synced = {Path(p).name for p in seen if Path(p).parent == tok_dir}  # temp names, renamed into place
    assert len(synced) == len(written) == 2 and str(tok_dir) in seen
    seen.clear()
    tokenizer_part(resolve_tokenizer("demo"))(step)
    assert any(Path(p).parent == step and "tokenizer.model" in Path(p).name for p in seen)
    seen.clear()
    copy_tokenizer_files(hf_dir, tmp_path / "beside.tokenizer")
    assert sum(Path(p).parent.name.startswith(".tmp-beside.tokenizer") for p in seen) == 2  # the files
    assert any(Path(p).name.startswith(".tmp-beside.tokenizer") for p in seen)  # their directory
    assert str(tmp_path) in seen  # the rename into place


def test_write_tokenizer_beside_removes_the_other_kind(tmp_path):
    from fm.checkpoint.open import open_checkpoint, tokenizer_beside, write_tokenizer_beside
    from fm.tokenizer import resolve_tokenizer
    from tests.unit.test_checkpoint_open import _run_dir

    run, _, _ = _run_dir(tmp_path, resolve_tokenizer("demo"))
    pt = tmp_path / "m.pt"
    pt.write_bytes((run / "5" / "fm9g_live_checkpoint-5.pt").read_bytes())
    (tmp_path / "m.json").write_text((run / "5" / "model_config.json").read_text())
    write_tokenizer_beside(pt, "demo")
    hf_dir = build_hf_tokenizer(tmp_path / "tok")
    assert write_tokenizer_beside(pt, hf_dir) == tokenizer_beside(pt, "hf")
    assert not tokenizer_beside(pt).exists()  # the stale .tokenizer.model would be found first
    assert open_checkpoint(pt).tokenizer == tokenizer_beside(pt, "hf")
    write_tokenizer_beside(pt, "demo")
    assert not tokenizer_beside(pt, "hf").exists() and open_checkpoint(pt).tokenizer == tokenizer_beside(pt)


def test_hf_directory_with_tokenizer_model_and_json_opens_as_hf(tmp_path):
    from fm.checkpoint.open import _tokenizer_in
    from fm.tokenizer import resolve_tokenizer, tokenizer_kind

    hf_dir = build_hf_tokenizer(tmp_path / "hf")
    (hf_dir / "tokenizer.model").write_bytes(Path(resolve_tokenizer("demo")).read_bytes())  # Mistral, Llama-2
    ck = SimpleNamespace(path=hf_dir, base=None)
    assert _tokenizer_in(ck) == hf_dir == Path(resolve_tokenizer(hf_dir))
    assert tokenizer_kind(_tokenizer_in(ck)) == "hf"
