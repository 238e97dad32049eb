"""A run's checkpoints carry the tokenizer it read at its start: with ``data.tokenizer`` empty a resumed run takes
the resume step's tokenizer, and later saves must not read that step directory again (keep_last_n deletes it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
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


# ------------------------------------------------------------------------------------ stop ids, tokenizer_source
def test_generation_config_eos_ids_stop_generate_and_travel_with_import(tmp_path, monkeypatch, capsys):
    from fm import generate as gen
    from fm.export.hf import _import_tokenizer
    from tests.unit.test_generate import DRAGONFLY

    hf_dir = build_hf_tokenizer(tmp_path / "model")
    tok = load_tokenizer(hf_dir)
    extra = [tok.piece_to_id("<|endoftext|>"), tok.eos_id]
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": extra}))
    assert load_tokenizer(hf_dir).stop_ids == (tok.eos_id, extra[0])
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": extra[0]}))  # an int
    assert load_tokenizer(hf_dir).stop_ids == (tok.eos_id, extra[0])
    # fm import takes it along: an imported .pt keeps its stop tokens
    dest = _import_tokenizer(hf_dir, tmp_path / "imported.pt")
    assert (dest / "generation_config.json").is_file() and load_tokenizer(dest).stop_ids == (tok.eos_id, extra[0])
    seen = []
    real = gen.generate

    def spy(model, prompts, **kw):
        seen.append(kw["config"].stop_token_ids)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    (tmp_path / "m.json").write_text(json.dumps({**DRAGONFLY, "vocab_size": 600}))
    assert gen.main(["--config", str(tmp_path / "m.json"), "--tokenizer", str(dest), "--max-new-tokens", "2",
                     "--device", "cpu", "--prompt", "hi"]) == 0
    assert seen == [(tok.eos_id, extra[0])]
    capsys.readouterr()
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    from fm.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id must be"):
        load_tokenizer(hf_dir)


def test_tokenizer_source_from_the_resume_checkpoint_and_its_errors(tmp_path):
    from fm.train.config import ConfigError, tokenizer_source

    hf_dir = build_hf_tokenizer(tmp_path / "tok")
    first = _trainer(tmp_path, str(hf_dir), "")
    first.checkpointer.save(3)
    first.checkpointer.wait()
    mix = first.cfg.data.mixture

    def cfg(**over):
        return load_config(None, {"config": TINY, "save": str(tmp_path / "ckpt"), "model_unique": "run",
                                  "dataset_config": mix, "tokenizer_path": "", **over})

    run = first.cfg.run.dir()
    spec, where = tokenizer_source(cfg(resume_ckpt="latest"))
    assert spec == str(run / "3" / "tokenizer") and where == f"checkpoint.resume.source {run / '3'}"
    junk = tmp_path / "junk"  # a directory of no checkpoint form: CheckpointFormError
    junk.mkdir()
    with pytest.raises(ConfigError, match=r"data.tokenizer is empty and checkpoint.resume.source '.*junk' "
                                          r"\(.*\) cannot be opened: .*not a checkpoint"):
        tokenizer_source(cfg(resume_ckpt=str(junk)))
    with pytest.raises(ConfigError, match=r"model.init_from '.*junk' cannot be opened: .*not a checkpoint"):
        tokenizer_source(cfg(resume_ckpt="", load_model=str(junk)))


# ------------------------------------------------------------------------------------ tokenizer_config branches
def test_special_tokens_map_and_added_token_id_mismatch(tmp_path):
    from fm.tokenizer import TokenizerError

    d = build_hf_tokenizer(tmp_path / "tok")
    config = json.loads((d / "tokenizer_config.json").read_text())
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.pop(k)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"},
                                                           "pad_token": "<|im_start|>"}))
    tok = load_tokenizer(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (tok.piece_to_id("<|endoftext|>"), tok.piece_to_id("<|im_start|>"),
                                                     None)
    n = tok.vocab_size
    config["added_tokens_decoder"][str(n + 5)] = {"content": "<|new|>", "special": True}  # would land on id n
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=rf"added token '<\|new\|>' has id {n + 5} there but would get id {n}"):
        load_tokenizer(d)
    config["added_tokens_decoder"] = {str(n): {"content": "<|new|>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(d)
    assert tok.piece_to_id("<|new|>") == n and tok.vocab_size == n + 1 and tok.encode("a<|new|>")[-1] == n
