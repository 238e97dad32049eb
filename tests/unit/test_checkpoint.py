"""Checkpoint directories: atomic commit, ``latest`` last, incomplete dirs ignored, keep-last-n, async == sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fm.checkpoint import commit as ck
from fm.checkpoint import layout
from fm.checkpoint.commit import CheckpointManager, json_part, torch_part
from fm.checkpoint.layout import find_latest, list_checkpoints


def parts_for(step: int, size: int = 1000) -> list:
    g = torch.Generator().manual_seed(step)
    return [
        torch_part(layout.MODEL_FILE.format(step=step), {"w": torch.randn(size, generator=g)}),
        json_part(layout.LOG_CKPT, {"iteration": step, "consumed_tokens": step * 10}),
        json_part(layout.DATASET_FILE, {"pos": step}),
    ]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_layout_and_latest(tmp_path):
    m = CheckpointManager(tmp_path)
    final = m.save(100, parts_for(100))
    assert final == tmp_path / "100"
    assert sorted(tree(final)) == sorted([layout.COMPLETE, layout.DATASET_FILE, layout.LOG_CKPT,
                                          "fm9g_live_checkpoint-100.pt"])
    assert (tmp_path / "latest").read_text() == "100\n"
    assert json.loads((final / layout.COMPLETE).read_text())["step"] == 100
    assert layout.read_log_ckpt(final) == {"iteration": 100, "consumed_tokens": 1000}
    assert layout.model_file(final).name == "fm9g_live_checkpoint-100.pt"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert find_latest(tmp_path) == 100


def test_commit_order_complete_rename_then_latest(tmp_path, monkeypatch):
    events: list[str] = []
    real = os.replace

    def spy(src, dst):
        events.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", spy)
    CheckpointManager(tmp_path).save(7, parts_for(7))
    assert events[-3:] == [layout.COMPLETE, "7", "latest"]  # COMPLETE inside, then the dir rename, then latest


def test_failed_part_leaves_no_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, parts_for(1))

    def boom(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device", str(d / "half.bin"))

    with pytest.raises(layout.CheckpointError, match=r"checkpoint .*2 was not saved \(rank\(s\) \[0\]\): .*half.bin: "
                                                     r"No space left on device; nothing was committed"):
        m.save(2, [*parts_for(2), boom])
    assert not (tmp_path / "2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []  # removed at once
    assert (tmp_path / "latest").read_text() == "1\n"
    assert find_latest(tmp_path) == 1
    m.save(3, parts_for(3))


def test_incomplete_and_temporary_dirs_are_ignored(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(200, parts_for(200))
    (tmp_path / "300").mkdir()  # renamed by hand / upstream dir without COMPLETE
    (tmp_path / "300" / "fm9g_live_checkpoint-300.pt").write_bytes(b"partial")
    (tmp_path / ".tmp-400-abcd").mkdir()
    (tmp_path / "latest").write_text("300\n")  # latest pointing at a broken dir
    assert list_checkpoints(tmp_path) == [200]
    assert find_latest(tmp_path) == 200
    assert layout.resolve_checkpoint(tmp_path, "latest") == tmp_path / "200"
    assert layout.resolve_checkpoint(tmp_path, 200) == tmp_path / "200"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        layout.resolve_checkpoint(tmp_path, 300)
    assert layout.resolve_checkpoint(tmp_path, str(tmp_path / "300")) == tmp_path / "300"  # explicit path: allowed
    assert find_latest(tmp_path / "nothing") is None
    assert layout.resolve_checkpoint(tmp_path / "nothing") is None


def test_keep_last_n(tmp_path):
    m = CheckpointManager(tmp_path, keep_last_n=2)
    for s in (10, 20, 30, 40):
        m.save(s, parts_for(s))
    assert list_checkpoints(tmp_path) == [30, 40]
    assert find_latest(tmp_path) == 40


def test_keep_last_n_after_a_resume_from_an_earlier_step(tmp_path, caplog):
    # a run saved 10..40 (keep 2: 30, 40), then resumed from 30 saving every 5 steps: the current run's 35 and 37
    # are kept, 30 goes, and the abandoned branch's 40 is neither counted nor deleted (a warning names it)
    m = CheckpointManager(tmp_path, keep_last_n=2)
    for s in (10, 20, 30, 40):
        m.save(s, parts_for(s))
    again = CheckpointManager(tmp_path, keep_last_n=2)
    again.save(35, parts_for(35))
    with caplog.at_level("WARNING", logger="fm.checkpoint.commit"):
        again.save(37, parts_for(37))
    assert list_checkpoints(tmp_path) == [35, 37, 40] and find_latest(tmp_path) == 37
    assert "checkpoint 37:" in caplog.text and "newer step(s) [40]" in caplog.text
    again.save(45, parts_for(45))  # past the old branch: it counts as any older step
    assert list_checkpoints(tmp_path) == [40, 45]


def test_resave_same_step_replaces(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(5, parts_for(5))
    m.save(5, [json_part(layout.LOG_CKPT, {"iteration": 5, "again": True})])
    assert layout.read_log_ckpt(tmp_path / "5") == {"iteration": 5, "again": True}
    assert list_checkpoints(tmp_path) == [5]


def test_async_writes_same_bytes_as_sync(tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    CheckpointManager(sync).save(3, parts_for(3, size=200_000))
    m = CheckpointManager(asyn, async_save=True)
    state = {"iteration": 3}
    m.save(3, [*parts_for(3, size=200_000), json_part("extra.json", state)])
    state["iteration"] = 999  # mutated after save() returned: the snapshot must not see it
    m.close()
    a, b = tree(sync / "3"), tree(asyn / "3")
    a.pop(layout.COMPLETE), b.pop(layout.COMPLETE)
    assert json.loads(b.pop("extra.json")) == {"iteration": 3}
    assert a == b
    assert find_latest(asyn) == 3


def test_async_error_raised_at_next_wait(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)

    def boom(d: Path) -> None:
        raise ValueError("bad part")

    m.save(1, [boom])
    with pytest.raises(RuntimeError, match="not saved"):
        m.close()
    assert find_latest(tmp_path) is None


CRASH_SCRIPT = """
import os, sys
from pathlib import Path
from fm.checkpoint.commit import CheckpointManager, json_part

def crash(d: Path) -> None:
    (d / "fm9g_live_checkpoint-2.pt").write_bytes(b"half a file")
    os._exit(1)  # killed mid-save: no cleanup, no exception handling

m = CheckpointManager(sys.argv[1])
m.save(1, [json_part(".log_ckpt", {"iteration": 1})])
m.save(2, [json_part(".log_ckpt", {"iteration": 2}), crash])
"""


def test_crash_mid_save_is_ignored(tmp_path, repo_root):
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], cwd=repo_root, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert r.returncode == 1, r.stderr.decode()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-2-")]  # the half-written save
    assert find_latest(tmp_path) == 1
    assert layout.read_log_ckpt(tmp_path / "1") == {"iteration": 1}


class ThreadComm:
    """Two 'ranks' as threads: enough of the Engine collectives for the commit protocol."""

    def __init__(self, rank: int, world: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, world, shared
        self.is_main = rank == 0

    def _exchange(self, value):
        s = self.shared
        s["barrier"].wait()
        s["slots"][self.rank] = value
        s["barrier"].wait()
        out = list(s["slots"])
        s["barrier"].wait()
        return out

    def broadcast_object(self, obj, src=0):
        return self._exchange(obj)[src]

    def all_gather_object(self, obj):
        return self._exchange(obj)

    def barrier(self):
        self._exchange(None)


@pytest.mark.parametrize("async_save", [False, True])
def test_two_ranks_write_into_one_dir(tmp_path, async_save):
    shared = {"barrier": threading.Barrier(2), "slots": [None, None]}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            comm = ThreadComm(rank, 2, shared)
            m = CheckpointManager(tmp_path, comm=comm, async_save=async_save, keep_last_n=1)
            for step in (1, 2):
                parts = [torch_part(f"rank{rank}.pt", torch.full((4,), float(rank + step)))]
                if rank == 0:
                    parts.append(json_part(layout.LOG_CKPT, {"iteration": step}))
                m.save(step, parts)
            m.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert list_checkpoints(tmp_path) == [2]
    d = tmp_path / "2"
    assert sorted(p.name for p in d.iterdir()) == sorted([layout.COMPLETE, layout.LOG_CKPT, "rank0.pt", "rank1.pt"])
    assert torch.load(d / "rank1.pt").tolist() == [3.0] * 4
    assert json.loads((d / layout.COMPLETE).read_text())["world_size"] == 2


def test_rng_state_roundtrip():
    import random

    state = ck.rng_state()
    a = (random.random(), torch.rand(3).tolist())
    ck.set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == a


def test_fsdp_engine_standard_parts_async(tmp_path, tokenizer_path):
    """World-1 FSDP engine: the full upstream layout, written asynchronously, loads back."""
    from fm.distributed import build_engine
    from tests.distributed.tinylm import TinyLM, make_meta_model, param_groups

    engine = build_engine("fsdp", seed=0)
    engine.init()
    try:
        model = engine.shard(make_meta_model())
        engine.build_optimizer(param_groups(model), lr=1e-3)
        logits = model(torch.randint(0, 64, (2, 8)))
        engine.backward(engine.loss(logits, torch.randint(0, 64, (2, 8))).mean())
        engine.optimizer_step()
        m = CheckpointManager(tmp_path / "run", async_save=True, comm=engine)
        before = engine.model_state_dict()
        opt_before = {id(p): {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                              for k, v in st.items()} for p, st in engine.optimizer.state.items()}
        m.save(1, ck.standard_parts(engine, 1, log_ckpt={"iteration": 1}, dataset_state={"x": 1},
                                    config={"lr": 1e-3}, tokenizer_path=tokenizer_path,
                                    scheduler_state={"step": 1}))
        engine.optimizer_step()  # training goes on while the thread writes: the snapshot must not change
        m.close()
        d = tmp_path / "run" / "1"
        names = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
        assert {layout.COMPLETE, layout.LOG_CKPT, layout.DATASET_FILE, layout.CONFIG_FILE, layout.TOKENIZER_FILE,
                layout.SCHEDULER_FILE, "rng/rank0.pt", "fm9g_live_checkpoint-1.pt", "optimizer/.metadata"} <= names
        sd = torch.load(layout.model_file(d), weights_only=True)
        plain = TinyLM()
        plain.load_state_dict(sd, strict=True)
        for k, v in before.items():
            assert torch.equal(sd[k], v), k
        engine.load_optimizer(d / layout.OPTIMIZER_DIR)
        for p, st in engine.optimizer.state.items():  # the state as of the save, not after the extra step
            for k, v in st.items():
                got = v.full_tensor() if hasattr(v, "full_tensor") else v
                assert torch.equal(got, opt_before[id(p)][k]), k
    finally:
        engine.shutdown()


def test_staging_buffers_reused_only_after_release():
    from fm.distributed.base import StagingBuffers

    pool = StagingBuffers()
    a = {"w": torch.ones(3), "s": [torch.zeros(2), 5]}
    s1 = pool.stage("optimizer", a)
    assert s1["w"].data_ptr() != a["w"].data_ptr() and s1["s"][1] == 5
    s2 = pool.stage("optimizer", {"w": torch.full((3,), 2.0), "s": [torch.ones(2), 6]})  # s1 not written yet
    assert s2["w"].data_ptr() != s1["w"].data_ptr() and s1["w"].tolist() == [1.0] * 3
    pool.release("optimizer")
    s3 = pool.stage("optimizer", {"w": torch.full((3,), 3.0), "s": [torch.ones(2), 7]})
    assert s3["w"].data_ptr() == s1["w"].data_ptr() and s3["w"].tolist() == [3.0] * 3  # reused in place
    s4 = pool.stage("model", {"w": torch.ones(4)})  # kinds are independent
    assert s4["w"].shape == (4,)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_everything_written_follows_the_umask(tmp_path, mask):
    """Checkpoints, latest, exports and adapters get the permissions a plain open()/mkdir() would give, so a
    teammate or a serving container running as another user can read them (mkstemp alone makes 0600)."""
    from fm.io import atomic_dir, atomic_write_bytes
    from fm.train import lora

    old = os.umask(mask)
    try:
        final = CheckpointManager(tmp_path / "run").save(5, parts_for(5))
        atomic_write_bytes(b"x", tmp_path / "f.bin")
        with atomic_dir(tmp_path / "export") as d:
            (d / "config.json").write_text("{}")
        adapter = lora.save_adapter(tmp_path / "adapter", {"base_model.model.x.lora_A.weight": torch.ones(2, 2)},
                                    {"r": 2, "lora_alpha": 4, "target_modules": ["q"]})
    finally:
        os.umask(old)
    files = [final / "fm9g_live_checkpoint-5.pt", final / layout.COMPLETE, final / layout.DATASET_FILE,
             tmp_path / "run" / "latest", tmp_path / "f.bin", tmp_path / "export" / "config.json",
             adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))
    for d in (final, final / "dataset_ckpt", tmp_path / "export", adapter):
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, (d, oct(d.stat().st_mode))
