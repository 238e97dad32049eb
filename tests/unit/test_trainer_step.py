"""The trainer's step: device discipline, one host sync per optimizer step, skip rules, resumable state.

* On the ``meta`` device (standing in for a GPU) the whole step runs: tiny dragonfly forward and
  backward over 2-task micro-batches with gradient accumulation, per-token losses, per-task sums, the
  real fsdp clip, the agreement and the logging. A CPU tensor mixed into device work, or any read of a
  device value other than the step's one copy to the host, fails on meta.
* On the CPU the synchronising calls that fm's own code makes during steps are counted (item, tolist,
  cpu, bool/int/float of a tensor, nonzero, ...), logging included: at most one per optimizer step.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fm.distributed.fsdp import FSDPEngine
from fm.train.config import load_config
from fm.train.metrics import MetricsWriter
from fm.train.step import Agreement
from fm.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "apps" / "fm9g_2b" / "model_configs" / "tiny.json")
SYNC_CALLS = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal",
              "is_nonzero", "masked_select", "unique", "argwhere", "__format__"}


def packed_batch(batch: int, length: int, tasks: int, seed: int) -> dict:
    """Rows of 4 samples each, tasks alternating inside every row; as the train loader hands a batch over."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(10, 8000, (batch, length), generator=g)
    targets = torch.roll(inputs, -1, dims=1)
    seg = length // 4
    targets[:, seg - 1::seg] = -100
    targets[:, :2] = -100  # an input part, as in instruction data
    task_ids = ((torch.arange(length) // seg) % tasks).repeat(batch, 1)
    return {"inputs": inputs, "targets": targets, "task_ids": task_ids,
            "position_ids": (torch.arange(length) % seg).repeat(batch, 1),
            "cu_seqlens": torch.arange(0, batch * length + 1, seg, dtype=torch.int32), "max_seqlen": seg,
            "lengths": torch.full((batch,), length), "num_tokens": batch * length,
            "num_targets": int((targets != -100).sum()), "task_names": [f"t{i}" for i in range(tasks)],
            "indexes": {}}


class MetaEngine(FSDPEngine):
    """The fsdp engine's loss and clip on the meta device, in a world of one without a process group."""

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("meta")
        self.reduced: list[str] = []

    def init(self) -> None:
        pass

    def shard(self, model, *, dtype=None, activation_checkpointing=False, state_dict=None, checkpoint_every=1,
              offload=False, compile=False):
        self._param_shapes = {n: p.shape for n, p in model.named_parameters()}
        self._state_keys = set(model.state_dict())
        self.model = model
        return model

    def all_reduce(self, value, op="sum"):
        assert isinstance(value, torch.Tensor), "the step all-reduces device tensors, not Python numbers"
        self.reduced.append(value.device.type)
        return value

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _trainer(tmp_path: Path, engine, **over) -> Trainer:
    cfg = load_config(None, {"config": TINY, "engine": "fsdp", "dtype": "fp32", "max_length": 32, "batch_size": 2,
                             "grad_accum": 2, "train_iters": 100, "warmup_iters": 2, "inspect_iters": 0,
                             "save": str(tmp_path / "ckpt"), "tensorboard": "", "model_unique": "step", **over})
    tr = Trainer(cfg, engine)
    tr.setup_engine()
    tr.build_model()
    tr.loader = SimpleNamespace(task_names=_batches()[0]["task_names"], state_dict=dict)
    return tr


def _batches() -> list[dict]:
    return [packed_batch(2, 32, 2, s) for s in range(4)]


def _start(tr: Trainer) -> None:
    tr.start(itertools.cycle(_batches()))  # the loop's own path: the next step's batches come during a step


@pytest.mark.parametrize("extra", [{}, {"stability": {"spike_zscore": 3, "spike_window": 2, "skip_spikes": True},
                                      "optim": {"z_loss": 1e-4}}], ids=["plain", "spikes-and-z-loss"])
def test_step_runs_on_a_stand_in_device(tmp_path, extra):
    engine = MetaEngine()
    tr = _trainer(tmp_path, engine, **extra)
    tr.metrics = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=tmp_path / "s.jsonl")
    copies = []

    def to_host(t: torch.Tensor) -> list[float]:  # the one copy to the host; meta has no values to copy
        copies.append(t.device.type)
        return [0.0] * t.numel()

    tr.to_host = to_host
    _start(tr)
    for _ in range(2):
        tr.metrics.log_step(tr.train_step())
    tr.metrics.close()
    assert copies == ["meta"] * 3  # one per step, plus the agreement before the first step
    assert set(engine.reduced) == {"meta"}
    assert all(p.grad is None or p.grad.device.type == "meta" for p in tr.model.parameters())
    assert tr.iteration == 2 and (tmp_path / "s.jsonl").read_text().count("\n") == 2


class CountSyncs(TorchFunctionMode):
    """Counts calls that make the host wait for an accelerator when fm's own code makes them. Reads inside
    torch (e.g. an optimizer's host-side step counters) and BMTrain are theirs; device reads there would fail
    the meta test."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        # (copies to the host through .to("cpu") look like the step's host-to-device copies on a CPU: the meta
        # test catches those, as meta tensors cannot be copied out)
        if name in SYNC_CALLS:
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if f"{Path(ROOT, 'fm')}/" in where:
                self.calls.append((name, f"{Path(where).name}:{frame.f_lineno}"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [{}, {"stability": {"spike_zscore": 0.5, "spike_window": 2, "skip_spikes": True},
                                      "optim": {"z_loss": 1e-4}}], ids=["plain", "spikes-and-z-loss"])
def test_one_host_sync_per_optimizer_step(tmp_path, extra):
    # loss-spike detection and its skipping decide from the step's one agreement; the z-loss rides in it
    from fm.distributed import build_engine

    engine = build_engine("fsdp", seed=0)
    engine.init()
    try:
        tr = _trainer(tmp_path, engine, **extra)
        tr.metrics = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=tmp_path / "s.jsonl")
        _start(tr)
        tr.metrics.log_step(tr.train_step())  # warm-up
        steps = 3
        with CountSyncs() as counter:
            for _ in range(steps):
                tr.metrics.log_step(tr.train_step())
        tr.metrics.close()
    finally:
        engine.shutdown()
    assert len(counter.calls) <= steps, counter.calls
    assert [name for name, _ in counter.calls] == ["tolist"] * steps  # fm.train.step.to_host


def _count_bmtrain_worker(rank: int, port: int, tmp: str) -> None:
    import json
    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tests.support.bmtrain_cpu import install

    install()
    from fm.distributed import build_engine

    engine = build_engine("bmtrain", seed=0)
    engine.init()
    tr = _trainer(Path(tmp), engine)
    tr.metrics = MetricsWriter(enabled=True, tensorboard_dir=None, jsonl_path=Path(tmp) / "s.jsonl")
    _start(tr)
    tr.metrics.log_step(tr.train_step())
    with CountSyncs() as counter:
        for _ in range(3):
            tr.metrics.log_step(tr.train_step())
    Path(tmp, "calls.json").write_text(json.dumps(counter.calls))


def test_one_host_sync_per_optimizer_step_on_bmtrain(tmp_path):
    import json

    import torch.multiprocessing as mp

    from tests.distributed.tinylm import free_port

    mp.spawn(_count_bmtrain_worker, args=(free_port(), str(tmp_path)), nprocs=1)
    calls = json.loads((tmp_path / "calls.json").read_text())
    assert [name for name, _ in calls] == ["tolist"] * 3, calls


def test_counter_sees_syncs():
    # the counter itself must not be blind: fm code reading a tensor is counted, torch internals are not
    from fm.train import metrics

    with CountSyncs() as counter:
        metrics.inspect_stats(torch.nn.Linear(2, 2), lambda t, op: t)
    assert [n for n, _ in counter.calls] == ["cpu", "tolist", "cpu", "tolist"], counter.calls


class _Optim:
    param_groups = [{"lr": 1.0, "lr_scale": 1.0}]


def _update_with(agreed: Agreement, scales_loss: bool) -> tuple[Trainer, list[str]]:
    calls: list[str] = []
    engine = SimpleNamespace(optimizer_step=lambda: calls.append("step"), zero_grad=lambda: calls.append("zero"),
                             scales_loss=scales_loss)
    tr = Trainer(load_config(None, {}), engine)
    tr.scheduler = SimpleNamespace(step=lambda: calls.append("schedule"))
    tr.update(agreed)
    return tr, calls


def _agreed(loss_bad: bool, norm: float) -> Agreement:
    return Agreement(loss_sum=1.0, nonfinite_loss=loss_bad, grad_norm=norm, stop=False, tokens=1, next_targets=1,
                     next_missing=False, task_loss_sum=(), task_targets=())


@pytest.mark.parametrize(("loss_bad", "norm", "scales", "calls", "consecutive"), [
    (False, 1.0, False, ["step", "schedule", "zero"], 0),
    (False, math.inf, False, ["zero"], 1),  # non-finite gradients: skipped, counted
    (True, 1.0, False, ["zero"], 1),  # non-finite loss on some rank
    (False, math.inf, True, ["step", "zero"], 0),  # fp16 overflow: the engine skips and halves the scale
    (True, math.nan, True, ["zero"], 1),  # a non-finite loss is a failure even under loss scaling
])
def test_skip_rules(loss_bad, norm, scales, calls, consecutive):
    tr, got = _update_with(_agreed(loss_bad, norm), scales)
    assert got == calls
    assert tr.skipped_consecutive == consecutive
    assert tr.state.skipped_total == (0 if calls[-2:] == ["schedule", "zero"] else 1)


def test_trainer_state_round_trip():
    tr = Trainer(load_config(None, {}))
    tr.load_state_dict({"iteration": 7, "consumed_tokens": 900, "task_tokens": {"a": 5}, "skipped_total": 1,
                        "optimizer_steps": 6, "world_size": 2, "reason": "end", "time": 0.0})  # a .log_ckpt
    empty = {"losses": [], "total": 0, "consecutive": 0, "stage": None}  # no loss-spike statistics there
    assert tr.state_dict() == {"iteration": 7, "skipped_total": 1, "consumed_tokens": 900, "task_tokens": {"a": 5},
                               "stability": empty}
    tr.load_state_dict({"iteration": 3})  # older checkpoints carry fewer counters
    assert tr.state_dict() == {"iteration": 3, "skipped_total": 0, "consumed_tokens": 0, "task_tokens": {},
                               "stability": empty}


def test_the_product_reads_no_test_switch():
    # faults come in as callbacks (tests/support/faults.py), the BMTrain CPU backend by the tests' worker
    found = [f"{p.relative_to(ROOT)}: {name}" for p in Path(ROOT, "fm").rglob("*.py")
             for name in ("FM_TEST_", "FM_BMTRAIN_CPU") if name in p.read_text(encoding="utf-8")]
    assert not found, found


def test_nan_steps_spec():
    from tests.support.faults import parse_nan_steps

    assert parse_nan_steps("1:2, 0:5") == {(1, 2), (0, 5)} and parse_nan_steps("") == set()
