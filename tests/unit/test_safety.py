"""Hostile and broken files: no loader runs code from a file, a damaged file is named, a full disk is one line.

A payload is a pickle whose unpickling runs ``touch <marker>``: every test checks the marker is never made.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fm.checkpoint import commit as ck
from fm.checkpoint import layout
from fm.io import CorruptFileError, UnsafeFileError, load_pickle, load_torch
from tests.helpers import Payload

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def marker(tmp_path) -> Path:
    yield tmp_path / "PAYLOAD_RAN"
    assert not (tmp_path / "PAYLOAD_RAN").exists(), "a payload ran"


def _payload_pt(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(2), "evil": Payload(marker), **extra}, path)
    return path


def _loaders():
    from fm.checkpoint.open import open_checkpoint
    from fm.distributed import bmtrain as bmt_engine
    from fm.distributed import fsdp
    from fm.export import spark_import
    from fm.train import lora

    return {
        "load_torch": lambda p: load_torch(p),
        "model state dict (fsdp/bmtrain engines, trainer resume)": fsdp.load_full_state_dict,
        "bmtrain optimizer shard": bmt_engine._load,
        "rng state": ck.read_rng_state,
        "scheduler": lambda p: layout.read_scheduler_state(p.parent),
        "lora base weights": lora._read_state,
        "spark importer shard": spark_import._load,
        "checkpoint opener (generate, export, eval, LoRA merge)": lambda p: open_checkpoint(p).state_dict(),
    }


@pytest.mark.parametrize("name", list(_loaders()))
def test_no_loader_runs_code_from_a_file(tmp_path, marker, name):
    path = _payload_pt(tmp_path / "ckpt" / layout.SCHEDULER_FILE, marker)
    with pytest.raises(UnsafeFileError, match=rf"{path}: refused for safety: .*posix\.system"):
        _loaders()[name](path)


def test_importers_refuse_payloads(tmp_path, marker):
    from fm.export.llama import load_hf_state_dict
    from fm.export.spark_import import import_megatron

    hf_dir = tmp_path / "hf"
    _payload_pt(hf_dir / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin: refused for safety"):
        load_hf_state_dict(hf_dir)
    meg = tmp_path / "megatron"
    _payload_pt(meg / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeFileError, match="mp_rank_00_model_states.pt: refused for safety"):
        import_megatron(meg, None)


def test_fm_eval_refuses_a_hostile_hf_directory_in_one_line(tmp_path, marker, capsys, tokenizer_path):
    # an HF directory goes to transformers (any causal LM can be scored); its pickled weights are read by fm first
    from fm.eval.__main__ import main

    hf_dir = tmp_path / "hf"
    bad = _payload_pt(hf_dir / "pytorch_model.bin", marker)
    (hf_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    mmlu = tmp_path / "mmlu"
    for split in ("test", "dev"):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"x_{split}.csv").write_text("q,a,b,c,d,A\n")
    assert main(["--checkpoint", str(hf_dir), "--mmlu-dir", str(mmlu), "--tokenizer", tokenizer_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: refused for safety") and len(err.strip().splitlines()) == 1, err


def test_released_megatron_shards_still_load(tmp_path):
    # Megatron-DeepSpeed pickles its args and numpy RNG states beside the weights: exactly those are allowed
    from fm.export.spark_import import _load

    np.random.seed(3)
    obj = {"module": {"language_model": {"w": torch.ones(3)}}, "iteration": 100,
           "args": argparse.Namespace(tensor_model_parallel_size=1, params_dtype=torch.float16),
           "rng_state": [{"np_rng_state": np.random.get_state(), "random_rng_state": (3, tuple(range(625)), None),
                          "torch_rng_state": torch.get_rng_state()}]}
    torch.save(obj, tmp_path / "mp_rank_00_model_states.pt")
    got = _load(tmp_path / "mp_rank_00_model_states.pt")
    assert got["args"].tensor_model_parallel_size == 1 and got["iteration"] == 100
    assert np.array_equal(got["rng_state"][0]["np_rng_state"][1], np.random.get_state()[1])


def test_restricted_unpickler_allows_only_what_it_names(tmp_path, marker):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"size": torch.Size([2, 3])}))
    assert load_pickle(good, {("torch", "Size")}) == {"size": torch.Size([2, 3])}
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(UnsafeFileError, match=r"bad.pkl: refused for safety: it asks for posix.system"):
        load_pickle(bad, {("torch", "Size")})
    bad.write_bytes(good.read_bytes()[:10])
    with pytest.raises(CorruptFileError, match="bad.pkl: damaged"):
        load_pickle(bad, {("torch", "Size")})


def _fsdp_world_of_one():
    from fm.distributed import build_engine
    from tests.distributed.tinylm import engine_step, make_batches, make_meta_model, param_groups

    engine = build_engine("fsdp", seed=0)
    engine.init()
    model = engine.shard(make_meta_model())
    engine.build_optimizer(param_groups(model), lr=1e-3)
    engine_step(engine, model, make_batches(1)[0])
    return engine


class _ByName:
    """Pickles as ``getattr(cls, name)``: how Python 3.11.0-3.11.4 (Debian 12's 3.11.2) write an Enum member."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_enum_members_pickled_by_name_load_and_nothing_else_getattr_reaches():
    """On Python 3.11.2 torch's optimizer checkpoint metadata holds an Enum as getattr(...): resume refused it."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from fm.distributed.fsdp import _DCP_METADATA_GLOBALS

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    data = pickle.dumps([_ByName(_MEM_FORMAT_ENCODING, member.name)])
    assert load_pickle("m", _DCP_METADATA_GLOBALS, data=data) == [member]
    for cls, name in ((torch.Size, "count"), (_MEM_FORMAT_ENCODING, "__class__"), (_MEM_FORMAT_ENCODING, "mro")):
        with pytest.raises(UnsafeFileError, match=r"refused for safety: it asks for getattr\("):
            load_pickle("m", _DCP_METADATA_GLOBALS, data=pickle.dumps(_ByName(cls, name)))
    with pytest.raises(UnsafeFileError, match="builtins.eval"):  # getattr's target must itself be allowed
        load_pickle("m", _DCP_METADATA_GLOBALS, data=pickle.dumps(_ByName(eval, "__call__")))


def test_dcp_optimizer_checkpoint_cannot_run_code(tmp_path, marker):
    engine = _fsdp_world_of_one()
    try:
        engine.save_optimizer(tmp_path / "opt")
        engine.load_optimizer(tmp_path / "opt")  # the real files load
        # .metadata is a pickle: one that builds anything but checkpoint metadata is refused
        meta = tmp_path / "opt" / ".metadata"
        meta.write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(UnsafeFileError, match=r"\.metadata: refused for safety: it asks for posix.system"):
            engine.load_optimizer(tmp_path / "opt")
        # non-tensor values (param_groups entries) are torch.save'd bytes inside the .distcp file
        engine.optimizer.param_groups[0]["note"] = Payload(marker)
        engine.save_optimizer(tmp_path / "opt2")
        engine.optimizer.param_groups[0]["note"] = "placeholder"  # the template asks for the value
        with pytest.raises(UnsafeFileError, match=r"opt2: the value of .*note.* was refused for safety"):
            engine.load_optimizer(tmp_path / "opt2")
    finally:
        engine.shutdown()


def test_damaged_files_are_named(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    for mmap in (False, True):
        with pytest.raises(CorruptFileError, match=r"cut.pt: not a complete torch file .* truncated or damaged"):
            load_torch(tmp_path / "cut.pt", mmap=mmap)
    (tmp_path / "rng").mkdir()
    torch.save(ck.rng_state(), tmp_path / "rng" / "rank1.pt")
    full = (tmp_path / "rng" / "rank1.pt").read_bytes()
    (tmp_path / "rng" / "rank1.pt").write_bytes(full[:100])
    with pytest.raises(CorruptFileError, match=r"rank1.pt: not a complete torch file"):
        ck.read_rng_state(tmp_path / "rng" / "rank1.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
        load_torch(tmp_path / "nothing.pt")


def test_truncated_index_h5_is_named(tmp_path):
    from fm.data.convert import Options, convert
    from fm.data.indexed import IndexedDataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"input": "", "output": f"line {i}"}) + "\n"
                                                     for i in range(2000)))
    convert(str(tmp_path / "in"), str(tmp_path / "idx"), Options(language="en", progress=False))
    h5 = tmp_path / "idx" / "index.h5"
    h5.write_bytes(h5.read_bytes()[:3000])
    with pytest.raises(ValueError, match=rf"{h5}: not a readable HDF5 index .* truncated or damaged"):
        IndexedDataset(str(tmp_path / "idx"))
    h5.write_bytes(h5.read_bytes()[:500])
    with pytest.raises(ValueError, match=rf"{h5}: not a readable HDF5 index"):
        IndexedDataset(str(tmp_path / "idx"))


# ---------------------------------------------------------------------------------------- checksums
def test_checkpoint_manifest_catches_every_kind_of_damage(tmp_path):
    m = ck.CheckpointManager(tmp_path)
    m.save(1, [ck.torch_part("fm9g_live_checkpoint-1.pt", {"w": torch.randn(5000)}),
               ck.json_part(layout.LOG_CKPT, {"iteration": 1}), ck.torch_part("rng/rank0.pt", ck.rng_state())])
    d = tmp_path / "1"
    files = json.loads((d / layout.COMPLETE).read_text())["files"]
    assert sorted(files) == [layout.LOG_CKPT, "fm9g_live_checkpoint-1.pt", "rng/rank0.pt"]
    assert files[layout.LOG_CKPT] == ck.file_digest(d / layout.LOG_CKPT)
    assert ck.verify_checkpoint(d) == []
    model = d / "fm9g_live_checkpoint-1.pt"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    assert ck.verify_checkpoint(d) == [f"{model}: its contents changed since the save (CRC32 "
                                       f"{ck.file_digest(model)[1]}, saved {files[model.name][1]})"]
    model.write_bytes(bytes(raw[:100]))
    assert ck.verify_checkpoint(d) == [f"{model}: 100 bytes, {files[model.name][0]} when saved (truncated or "
                                       "overwritten)"]
    (d / "rng" / "rank0.pt").unlink()
    shares = [ck.verify_checkpoint(d, r, 2) for r in range(2)]
    assert sorted(p for s in shares for p in s) == sorted(ck.verify_checkpoint(d)) and all(len(s) == 1 for s in shares)


# ---------------------------------------------------------------------------------------- run lock
def test_run_lock_names_its_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    import socket

    from fm.train.guard import LOCK_FILE, RunLock, RunLockError

    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockError, match=rf"{tmp_path} is being written by pid {os.getpid()} on "
                                           rf"{socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    second = RunLock(tmp_path)
    with caplog.at_level("WARNING", logger="fm.train.guard"):
        second.acquire()
    assert f"taking over the lock of pid {int(dead.stdout)}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()


# ---------------------------------------------------------------------------------------- full disks
def _small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # writes past 200 KB fail (EFBIG), as on a
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                    # full disk, without needing one


def test_converter_on_a_full_disk_says_so_in_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"input": "", "output": "word " * 50}) + "\n"
                                                     for _ in range(3000)))  # ~800 KB
    stale = tmp_path / ".idx.tmp-999999999-abcd"  # left by a killed conversion (no such pid)
    stale.mkdir()
    cmd = [sys.executable, str(ROOT / "quick_start/convert_json2index.py"), "--path", str(tmp_path / "in"),
           "--output", str(tmp_path / "idx"), "--language", "en", "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_small_files, cwd=ROOT)
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"into {tmp_path / 'idx'}" in err[0] and "File too large" in err[0]
    assert "partial files were removed" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temp dir, the stale one gone too


def test_a_terminated_convert_worker_leaves_at_once_and_silently():
    """The converter's SIGTERM handler is inherited by its forked workers; the parent terminates them when a run
    fails. A worker must exit there and then (status 128+15), not raise SystemExit wherever it is (which printed
    "Exception ignored ... Traceback" in about 1 run of 17 of the test above)."""
    code = """
import os, signal, sys, time
from fm.data.convert import exit_on_sigterm
exit_on_sigterm()
pid = os.fork()
if pid == 0:
    try:
        time.sleep(30)
    finally:
        os._exit(0)  # reached only if SIGTERM raised an exception in the child
time.sleep(0.2)
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip() == "child 143" and not r.stderr, (r.stdout, r.stderr)


def test_export_on_a_full_disk_says_so_in_one_line(tmp_path):
    from fm.models.registry import build_model, load_model_config

    cfg = ROOT / "apps/fm9g_2b/model_configs/tiny.json"
    torch.save(build_model(load_model_config(str(cfg))).state_dict(), tmp_path / "m.pt")
    cmd = [sys.executable, "-m", "fm.export.hf", "export", "--checkpoint", str(tmp_path / "m.pt"), "--config",
           str(cfg), "--output", str(tmp_path / "hf")]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_small_files, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'hf'}: ") and "File too large" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_transform_errors_give_the_line_number_people_count(tmp_path, tokenizer):
    from fm.data.loader import build_train_loader
    from fm.data.mixture import TransformError
    from tests.helpers import write_index

    write_index(tmp_path / "d", [{"input": "", "output": f"text {i}"} for i in range(5)])
    (tmp_path / "t.py").write_text("def transform(data, num_sample, r):\n"
                                   "    if data['output'] == 'text 4':\n        raise ValueError('bad record')\n"
                                   "    return data\n")
    (tmp_path / "mix.json").write_text(json.dumps([{"task_name": "t", "abs_weight": 1, "path": str(tmp_path / "d"),
                                                    "transforms": str(tmp_path / "t.py"), "allow_repeat": False}]))
    loader = build_train_loader(str(tmp_path / "mix.json"), tokenizer, batch_size=1, max_length=64, seed=0)
    with pytest.raises(TransformError, match=rf"on line 5 of {tmp_path / 'd' / 'data.jsonl'}"):
        list(loader)
