"""Early warnings of instability: loss spikes (``stability.*``), z-loss (``optim.z_loss``) in the trainer's step, and
the in-loop downstream evaluation (``eval.downstream_*``).

Single-process: a Trainer on the fsdp engine (a world of one on gloo) stepping on given batches, and in-process
``run(cfg)`` of the tiny two-task run (tests/helpers.py ``make_run``) with a spike injected through a callback.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fm.train.callbacks import Callback
from fm.train.config import ConfigError, load_config
from fm.train.stability import SpikeDetector
from fm.train.trainer import LossSpikeError, Trainer, run
from tests.helpers import ROOT, downstream_rows, fm_eval_mc, make_benchmarks, make_run

TINY = str(ROOT / "apps" / "fm9g_2b" / "model_configs" / "tiny.json")


class Spike(Callback):
    """The losses of (1-based) iterations ``at`` are multiplied by ``factor``: a corrupted batch."""

    def __init__(self, at, factor: float = 50.0):
        self.at, self.factor = set(at), factor

    def micro_batch(self, trainer, micro, loss):
        return loss * self.factor if trainer.iteration + 1 in self.at else loss


# ------------------------------------------------------------------------------------------------ detector
def test_detector_warms_up_then_flags_by_z_score_and_round_trips():
    d = SpikeDetector(zscore=3.0, window=4)
    for x in (2.0, 2.2, 1.8):
        assert d.check(x).z is None  # warm-up: the window is not full
        d.observe(x, False)
    d.observe(2.0, False)
    mean, std = 2.0, math.sqrt(0.02)
    c = d.check(2.0 + 2 * std)
    assert not c.spike and c.z == pytest.approx(2.0) and c.mean == pytest.approx(mean)
    c = d.check(2.0 + 4 * std)
    assert c.spike and c.z == pytest.approx(4.0)
    d.observe(9.0, True)  # a spike stays out of the window
    assert list(d.losses) == [2.0, 2.2, 1.8, 2.0] and d.total == d.consecutive == 1
    d.observe(float("nan"), False)  # a non-finite step: neither in the window nor the end of a streak
    assert d.consecutive == 1 and len(d.losses) == 4
    d.observe(1.9, False)
    assert d.consecutive == 0 and list(d.losses) == [2.2, 1.8, 2.0, 1.9]
    e = SpikeDetector(zscore=3.0, window=4)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))  # as the checkpoint's .log_ckpt stores it
    assert e.state_dict() == d.state_dict() and e.check(2.5) == d.check(2.5)
    assert not SpikeDetector(0.0, 4).check(1e9).spike  # 0 = off


def test_a_new_data_stage_empties_the_window_and_restarts_the_streak():
    d = SpikeDetector(zscore=3.0, window=3)
    assert not d.enter_stage(0)  # the first step: nothing to restart
    for x in (2.0, 2.1, 1.9):
        d.observe(x, False)
    d.observe(9.0, True)
    assert not d.enter_stage(0) and len(d.losses) == 3 and d.consecutive == 1
    assert d.enter_stage(1) and not d.losses and d.consecutive == 0 and d.total == 1
    assert d.check(6.0).z is None  # the new stage's level fills the window before anything is a spike
    for x in (6.0, 6.1, 5.9):
        d.observe(x, False)
    assert not d.check(6.05).spike and d.check(9.0).spike  # re-armed on the new stage's statistics
    e = SpikeDetector(zscore=3.0, window=3)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert e.stage == 1 and not e.enter_stage(1) and e.enter_stage(2) and not e.losses


# ------------------------------------------------------------------------------------------------ the step
def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(10, 8000, (2, 32), generator=g)
    targets = torch.roll(inputs, -1, dims=1)
    targets[:, 15::16] = -100
    task_ids = ((torch.arange(32) // 16) % 2).repeat(2, 1)
    return {"inputs": inputs, "targets": targets, "task_ids": task_ids,
            "position_ids": (torch.arange(32) % 16).repeat(2, 1),
            "cu_seqlens": torch.arange(0, 65, 16, dtype=torch.int32), "max_seqlen": 16, "num_tokens": 64,
            "num_targets": int((targets != -100).sum()), "task_names": ["t0", "t1"], "indexes": {}}


@pytest.fixture
def engine():
    from fm.distributed import build_engine

    e = build_engine("fsdp", seed=0)
    e.init()
    yield e
    e.shutdown()


def _trainer(tmp_path: Path, engine, callbacks=(), **over) -> Trainer:
    cfg = load_config(None, {"config": TINY, "engine": "fsdp", "dtype": "fp32", "max_length": 32, "batch_size": 2,
                             "train_iters": 100, "warmup_iters": 0, "lr_scheduler": "constant", "inspect_iters": 0,
                             "save": str(tmp_path / "ckpt"), "tensorboard": "", "model_unique": "s", **over})
    tr = Trainer(cfg, engine, list(callbacks))
    tr.setup_engine()
    tr.build_model()
    tr.loader = SimpleNamespace(task_names=["t0", "t1"], state_dict=dict)
    tr.start(itertools.cycle([_batch(s) for s in range(3)]))
    return tr


def test_a_spike_is_detected_logged_and_skipped_leaving_the_weights(tmp_path, engine, caplog):
    tr = _trainer(tmp_path, engine, [Spike({6})], stability={"spike_zscore": 4, "spike_window": 4,
                                                            "skip_spikes": True})
    steps = [tr.train_step() for _ in range(5)]
    assert not any(s["spike"] for s in steps) and steps[3]["loss_z"] is None and steps[4]["loss_z"] is not None
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    lr_steps = tr.scheduler.num_iters
    with caplog.at_level(logging.WARNING, logger="fm.train"):
        s = tr.train_step()
    assert s["spike"] and s["skipped"] and s["skip_reason"] == "spike" and s["spikes"] == 1 and s["loss_z"] > 4
    assert all(torch.equal(p.detach(), before[n]) for n, p in tr.model.named_parameters())
    assert tr.scheduler.num_iters == lr_steps and tr.state.skipped_total == 1 and tr.skipped_consecutive == 0
    msg = caplog.text
    assert "loss spike at iteration 6" in msg and "update skipped" in msg
    assert "t0 (" in msg and "t1 (" in msg and "targets" in msg  # the step's tasks, from the agreement
    s = tr.train_step()  # the next good step trains again
    assert not s["spike"] and not s["skipped"] and tr.spikes.consecutive == 0
    assert not all(torch.equal(p.detach(), before[n]) for n, p in tr.model.named_parameters())


def test_without_skipping_a_spike_is_logged_and_applied(tmp_path, engine):
    tr = _trainer(tmp_path, engine, [Spike({6})], stability={"spike_zscore": 4, "spike_window": 4})
    for _ in range(5):
        tr.train_step()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    s = tr.train_step()
    assert s["spike"] and not s["skipped"] and tr.spikes.total == 1
    assert not all(torch.equal(p.detach(), before[n]) for n, p in tr.model.named_parameters())


def test_z_loss_in_the_step_equals_the_formula_on_both_loss_paths(tmp_path, engine):
    # one step with optim.z_loss on the fsdp engine, chunked head (loss_chunk 8) and full logits (loss_chunk 0):
    # the logged z-loss is the mean over target tokens of coef * lse^2 of the model's logits before the step, and
    # both paths take the same step
    coef = 1e-2
    weights = []
    for chunk in (8, 0):
        torch.manual_seed(0)
        tr = _trainer(tmp_path / str(chunk), engine, optim={"z_loss": coef}, loss_chunk=chunk, grad_accum=1)
        b = _batch(0)
        with torch.no_grad():
            logits = tr.model(b["inputs"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"]).flatten(0, 1).float()
        t = b["targets"].reshape(-1)
        ce = F.cross_entropy(logits, t, reduction="none")
        lse = logits.exp().sum(-1).log()
        s = tr.train_step()
        n = int((t != -100).sum())
        assert s["z_loss"] == pytest.approx(float((coef * lse.square())[t != -100].sum()) / n, rel=1e-5)
        assert s["loss"] == pytest.approx(float(ce.sum()) / n, rel=1e-5)  # Loss/train stays the cross-entropy
        weights.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    for k in weights[0]:  # Adam's first step is about lr * sign(grad): tiny gradients may differ by rounding
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-2 * 1e-2)
    tr = _trainer(tmp_path / "off", engine)
    assert tr.train_step()["z_loss"] is None


class Level(Callback):
    """From (1-based) iteration ``start`` on every loss is ``factor`` times higher: a data stage of harder data."""

    def __init__(self, start: int, factor: float = 3.0):
        self.start, self.factor = start, factor

    def micro_batch(self, trainer, micro, loss):
        return loss * self.factor if trainer.iteration + 1 >= self.start else loss


def test_a_stage_switch_to_a_higher_loss_is_no_endless_spike(tmp_path, engine):
    # stage 1 from iteration 6 on, its loss 3x stage 0's: the window restarts at the switch and refills with the
    # new level (before the fix every step after the switch was a skipped spike, and the run stopped)
    stab = {"spike_zscore": 4, "spike_window": 3, "skip_spikes": True, "max_consecutive_spikes": 2}
    tr = _trainer(tmp_path, engine, [Level(7)], stability=stab)
    tr.stage_starts = [0, 6]
    steps = [tr.train_step() for _ in range(6)]
    saved = json.loads(json.dumps(tr.state_dict()))  # a checkpoint at iteration 6: its last step was stage 0
    steps += [tr.train_step() for _ in range(8)]
    assert [s["stage"] for s in steps] == [0] * 6 + [1] * 8
    assert steps[6]["loss"] > 2 * steps[5]["loss"] and steps[6]["loss_z"] is None  # the window refills first
    assert not any(s["spike"] or s["skipped"] for s in steps) and tr.spikes.consecutive == 0
    assert steps[9]["loss_z"] is not None and tr.spikes.stage == 1  # re-armed after 3 good steps of stage 1

    # a resume across the boundary: the checkpoint's last step was stage 0, the next step is stage 1
    assert saved["iteration"] == 6 and saved["stability"]["stage"] == 0 and len(saved["stability"]["losses"]) == 3
    again = _trainer(tmp_path / "again", engine, [Level(7)], stability=stab)
    again.stage_starts = [0, 6]
    again.load_state_dict(saved)
    s = again.train_step()
    assert s["stage"] == 1 and not s["spike"] and s["loss_z"] is None and len(again.spikes.losses) == 1


def test_resuming_restarts_the_spike_streak_and_infers_an_old_checkpoints_stage(tmp_path, engine):
    tr = _trainer(tmp_path, engine, stability={"spike_zscore": 4, "spike_window": 3})
    tr.stage_starts = [0, 5]
    old = {"iteration": 6, "stability": {"losses": [2.0, 2.1, 2.2], "total": 3, "consecutive": 3}}  # no "stage"
    tr.load_state_dict(old)
    tr._resume_spike_state()
    assert tr.spikes.consecutive == 0 and tr.spikes.total == 3 and tr.spikes.stage == 1
    assert list(tr.spikes.losses) == [2.0, 2.1, 2.2]  # the same stage: the window stays


def test_the_decay_stage_logs_how_far_the_schedule_lags(tmp_path, engine, caplog):
    # a skipped spike at iteration 3: at the "decay" stage's first step (iteration 5) the lr schedule is one step
    # behind, and the log says so
    tr = _trainer(tmp_path, engine, [Spike({3})], train_iters=10, lr_scheduler="warmupstabledrop", drop_iters=0.5,
                  data={"mixture": "m.json", "stages": [{"start_iter": "decay", "mixture": "d.json"}]},
                  stability={"spike_zscore": 4, "spike_window": 2, "skip_spikes": True})
    tr.stage_starts = tr.cfg.stage_starts()
    assert tr.stage_starts == [0, 5]
    with caplog.at_level(logging.INFO, logger="fm.train"):
        steps = [tr.train_step() for _ in range(6)]
    assert steps[2]["skipped"] and tr.scheduler.num_iters == 5 and tr.state.skipped_total == 1
    msg = caplog.text
    assert "data stage 1 from iteration 5: the loss-spike window restarts" in msg
    assert "the lr schedule is at step 4, 1 behind the iteration count (1 skipped steps so far" in msg
    assert 'data.stages[0] starts at "decay" (iteration 5)' in msg and "its decay begins 1 iteration(s) later " \
        "(at iteration 6 if no more steps are skipped)" in msg


# ------------------------------------------------------------------------------------------------ the loop
def _log_ckpt(rd: Path, step: int) -> dict:
    return json.loads((rd / str(step) / ".log_ckpt").read_text())


@pytest.mark.parametrize("skip", [True, False], ids=["skipped-saved", "applied-not-saved"])
def test_consecutive_spikes_stop_the_run_naming_the_last_good_checkpoint(tmp_path, skip):
    path = make_run(tmp_path, repeat=True, train_iters=12, save_iters=3, tensorboard="")
    cfg = load_config(path, {"stability": {"spike_zscore": 6, "spike_window": 4, "skip_spikes": skip,
                                           "max_consecutive_spikes": 2}})
    rd = tmp_path / "ckpt" / "run"
    with pytest.raises(LossSpikeError) as got:
        run(cfg, callbacks=[Spike({7, 8, 9}, factor=100.0)])
    msg = str(got.value)
    assert got.value.exit_code == 4 and "2 consecutive loss spikes at iteration 8" in msg
    if skip:  # the spikes never touched the weights: saved at the stop, and that is the good checkpoint
        assert f"the last good checkpoint is {rd / '8'}" in msg and (rd / "8").is_dir()
        assert _log_ckpt(rd, 8)["stability"]["consecutive"] == 2 and _log_ckpt(rd, 8)["skipped_total"] == 2
    else:  # the spikes were applied: nothing saved after them; the checkpoint before them is named
        assert f"the last good checkpoint is {rd / '6'}" in msg and not (rd / "8").exists()
    rows = [json.loads(x) for x in (rd / "train_stats.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r.get("spike")] == [7, 8]
    if skip:  # resuming (latest: step 8) restarts the streak: one more spike does not stop the run again
        assert run(cfg, callbacks=[Spike({9}, factor=100.0)]) == 0
        assert _log_ckpt(rd, 12)["stability"]["total"] == 3 and _log_ckpt(rd, 12)["stability"]["consecutive"] == 0


def test_the_spike_statistics_resume_exactly(tmp_path):
    # one run of 8 steps; another resumed from its step 4: the same window and counters at step 8
    path = make_run(tmp_path, repeat=True, train_iters=8, save_iters=4, tensorboard="")
    stab = {"stability": {"spike_zscore": 2, "spike_window": 3}}
    assert run(load_config(path, stab), callbacks=[Spike({6}, factor=30.0)]) == 0
    rd = tmp_path / "ckpt" / "run"
    whole = _log_ckpt(rd, 8)["stability"]
    assert whole["total"] == 1 and len(whole["losses"]) == 3
    assert _log_ckpt(rd, 4)["stability"]["losses"] == [r["loss"] for r in (
        json.loads(x) for x in (rd / "train_stats.jsonl").read_text().splitlines()) if 2 <= r["iter"] <= 4]
    assert run(load_config(path, {**stab, "resume_ckpt": str(rd / "4"), "model_unique": "again"}),
               callbacks=[Spike({6}, factor=30.0)]) == 0
    assert _log_ckpt(tmp_path / "ckpt" / "again", 8)["stability"] == whole


# ------------------------------------------------------------------------------------------------ downstream
def test_downstream_eval_logs_what_fm_eval_scores(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ceval, mmlu = make_benchmarks(tmp_path / "bench")
    path = make_run(tmp_path, repeat=True, train_iters=4, save_iters=2)
    cfg = load_config(path, {"eval": {"downstream_interval": 2, "downstream_limit": 2, "ceval_dir": str(ceval),
                                      "mmlu_dir": str(mmlu)}})
    assert run(cfg) == 0
    rd = tmp_path / "ckpt" / "run"
    rows = downstream_rows(rd)
    assert [r["iter"] for r in rows] == [2, 4]
    for row in rows:
        ref = fm_eval_mc(rd / str(row["iter"]), ceval, mmlu, limit=2)
        for task in ("ceval", "mmlu"):
            got = row["downstream"][task]
            assert got["total"] == ref[task]["total"] == 5  # the first 2 questions of 3 subjects, one of 1
            assert (got["correct"], got["accuracy"], got["macro_accuracy"]) == (
                ref[task]["correct"], ref[task]["micro_accuracy"], ref[task]["macro_accuracy"])
    acc = EventAccumulator(str(tmp_path / "tb" / "run"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"Eval/ceval/accuracy", "Eval/mmlu/accuracy", "Eval/mmlu/macro_accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("Eval/ceval/accuracy")] == [2, 4]
    assert "Stability/spikes" in tags and "Loss/z_loss" not in tags


def test_downstream_interval_needs_a_benchmark_directory():
    with pytest.raises(ConfigError, match="eval.downstream_interval: 5 needs eval.ceval_dir"):
        load_config(None, {"eval": {"downstream_interval": 5}})


def test_preflight_reads_the_downstream_benchmarks(tmp_path):
    from fm.train.preflight import preflight

    ceval, mmlu = make_benchmarks(tmp_path / "bench")
    path = make_run(tmp_path, repeat=True)
    ok = preflight(str(path), [("eval.downstream_interval", "5"), ("eval.ceval_dir", str(ceval)),
                               ("eval.mmlu_dir", str(mmlu)), ("eval.downstream_limit", "2")])
    assert not ok.problems, ok.problems
    assert ok.facts["downstream evaluation"] == ("every 5 steps: ceval 5 questions of 3 subjects, "
                                                 "mmlu 5 questions of 3 subjects")
    bad = preflight(str(path), [("eval.downstream_interval", "5"), ("eval.ceval_dir", str(tmp_path / "nowhere")),
                                ("eval.mmlu_dir", str(mmlu)), ("eval.downstream_subjects", "alpha, nope")])
    assert len(bad.problems) == 2 and bad.problems[0].startswith("eval.ceval_dir: ")
    assert bad.problems[1].startswith("eval.mmlu_dir: ") and "nope" in bad.problems[1]
    # a subject file without question rows: refused, naming the directory and the subject
    (ceval / "val" / "gamma_val.csv").write_text("id,question,A,B,C,D,answer\n")
    empty = preflight(str(path), [("eval.downstream_interval", "5"), ("eval.ceval_dir", str(ceval)),
                                  ("eval.downstream_subjects", "gamma")])
    assert empty.problems == [f"eval.ceval_dir: {ceval}: subject(s) gamma have no questions in the val split (so the "
                              "benchmark has no question at all); give the benchmark's files with their questions, "
                              "or leave those subjects out with eval.downstream_subjects"], empty.problems


def test_downstream_score_skips_a_task_without_questions():
    from fm.eval.downstream import PreparedTask, score

    class Model(torch.nn.Module):  # the letter B always wins
        def forward(self, inputs, *a, **kw):
            out = torch.zeros(*inputs.shape, 8)
            out[..., 2] = 1.0
            return out

    empty = PreparedTask("ceval", [1, 2, 3, 4], ["gamma"], [], [], [])
    some = PreparedTask("mmlu", [1, 2, 3, 4], ["alpha"], [[5, 6], [5, 7, 6]], [0, 0], ["B", "C"])
    for world_size in (1, 2):
        got = score(Model(), [empty, some], rank=0, world_size=world_size, all_reduce=lambda t, op: t,
                    device=torch.device("cpu"), batch_size=2, pad_id=0)
        assert set(got) == {"mmlu"} and got["mmlu"]["correct"] == 1 and got["mmlu"]["total"] == (2 if world_size == 1
                                                                                                 else 1)
