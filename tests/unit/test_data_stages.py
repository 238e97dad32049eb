"""Data stages in one run (``data.stages``, MiniCPM's decay-phase mixture): the loader switches at the batch of the
stage's first step, datasets of both stages continue exactly, token shares follow each stage's weights, the state
resumes before/at/after the boundary (and reshards), and the config and preflight report every problem at once."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from fm.data.loader import build_train_loader, merge_states
from fm.errors import ConfigError
from fm.train.config import load_config
from tests.helpers import make_mixture
from tests.helpers import records as short_records

BOUNDARY = 5  # start_iter of stage 1
GA = 2  # grad_accum: the switch comes after BOUNDARY × GA batches


@pytest.fixture()
def stages(tmp_path):
    """Stage 0: a (2) + b (1); stage 1: a (1) + c (3). a continues, b leaves, c is new. All repeat."""
    s0 = make_mixture(tmp_path, {
        "a": (short_records("a", 80, 1), {"abs_weight": 2.0}),
        "b": (short_records("b", 40, 2, instr=True), {"abs_weight": 1.0}),
    }, "stage0.json")
    s1 = make_mixture(tmp_path, {
        "a": (None, {"abs_weight": 1.0}),
        "c": (short_records("c", 50, 3), {"abs_weight": 3.0}),
    }, "stage1.json")
    only_a = make_mixture(tmp_path, {"a": (None, {})}, "only_a.json")
    return s0, s1, only_a


def loader(cfg, tok, stages=(), **kw):
    opts = dict(batch_size=2, max_length=32, seed=3, grad_accum=GA)
    opts.update(kw)
    return build_train_loader(cfg, tok, stages=stages, **opts)


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        for key in ("inputs", "targets", "task_ids", "position_ids", "cu_seqlens", "lengths"):
            assert torch.equal(x[key], y[key]), (i, key)
        assert x["indexes"] == y["indexes"] and x["num_tokens"] == y["num_tokens"], i


def roundtrip(state):
    return json.loads(json.dumps(state))


def lines_of(batches, task):
    return [i for b in batches for i in b["indexes"].get(task, [])]


def picks(batches):
    """(dataset index, tokens) of every sample, in order (the loader's task ids are over every stage's datasets)."""
    out = []
    for b in batches:
        flat, cu = b["task_ids"].flatten(), b["cu_seqlens"].tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            if int(flat[s]) >= 0:
                out.append((int(flat[s]), e - s))
    return out


def assert_shares_within_one_sample(samples, weights):
    """At every prefix of ``samples`` each dataset's tokens are within the longest sample of its weight's share."""
    total = sum(weights.values())
    longest = max(n for _, n in samples)
    t, T = Counter(), 0
    for d, n in samples:
        assert weights.get(d, 0) > 0, f"dataset {d} is not in this stage"
        t[d] += n
        T += n
        for k, w in weights.items():
            assert abs(t[k] - w / total * T) <= longest + 1e-9, (k, t[k], w / total * T)


# --------------------------------------------------------------------------------------------- the switch

@pytest.mark.parametrize("workers", [0, 2])
def test_switch_at_the_boundary_batch_with_exact_continuation(stages, tokenizer, workers, tmp_path):
    s0, s1, only_a = stages
    ld = loader(s0, tokenizer, [(BOUNDARY, s1)], num_workers=workers)
    assert ld.task_names == ["a", "b", "c"]
    got = take(iter(ld), 60)
    B = BOUNDARY * GA
    # up to the boundary: exactly the stage-0 loader's batches
    assert_same(got[:B], take(iter(loader(s0, tokenizer, num_workers=workers)), B))
    assert all("c" not in b["indexes"] for b in got[:B])
    assert all("b" not in b["indexes"] for b in got[B:]) and "c" in got[B]["indexes"]
    assert ld.stage == 1 and ld.batches_taken == 60
    # Stream by stream (the DataLoader's workers take turns, also across the switch): a is read on, line after
    # line, as a loader of a alone reads it (no line repeated or skipped); c starts at its beginning.
    c_alone = make_mixture(tmp_path, {"c": (None, {})}, "c.json")
    L = max(1, workers)
    for task, alone in (("a", only_a), ("c", c_alone)):
        ref = take(iter(loader(alone, tokenizer, num_workers=workers)), 200)
        for s in range(L):
            used = lines_of(got[s::L], task)
            assert used and used == lines_of(ref[s::L], task)[:len(used)], (task, s)


def test_token_shares_follow_each_stage(stages, tokenizer):
    s0, s1, _ = stages
    ld = loader(s0, tokenizer, [(BOUNDARY, s1)], grad_accum=20, batch_size=4, max_length=64)
    got = take(iter(ld), 200)
    B = BOUNDARY * 20
    assert_shares_within_one_sample(picks(got[:B]), {0: 2.0, 1: 1.0})  # a:b = 2:1
    assert_shares_within_one_sample(picks(got[B:]), {0: 1.0, 2: 3.0})  # a:c = 1:3, counted from the switch
    stats = ld.stats()
    assert stats["b"]["weight"] == 0 and stats["c"]["weight"] == 0.75 and stats["a"]["weight"] == 0.25


def test_three_stages_and_a_dataset_that_comes_back(stages, tokenizer, tmp_path):
    """b leaves at stage 1 and comes back at stage 2: it continues where it stopped."""
    s0, s1, _ = stages
    s2 = make_mixture(tmp_path, {"b": (None, {"abs_weight": 1.0})}, "stage2.json")
    ld = loader(s0, tokenizer, [(2, s1), (4, s2)], grad_accum=3)
    got = take(iter(ld), 30)
    assert all(set(b["indexes"]) <= {"a", "b"} for b in got[:6])
    assert all(set(b["indexes"]) <= {"a", "c"} for b in got[6:12])
    assert all(set(b["indexes"]) == {"b"} for b in got[12:])
    plain_b = make_mixture(tmp_path, {"b": (None, {})}, "b.json")
    b_lines = lines_of(got, "b")
    assert b_lines == lines_of(take(iter(loader(plain_b, tokenizer)), 100), "b")[:len(b_lines)]


# --------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("at", [BOUNDARY * GA - 3, BOUNDARY * GA - 1, BOUNDARY * GA, BOUNDARY * GA + 3])
def test_resume_before_at_and_after_the_boundary_is_exact(stages, tokenizer, workers, at):
    s0, s1, _ = stages
    ref = take(iter(loader(s0, tokenizer, [(BOUNDARY, s1)], num_workers=workers)), 30)
    first = loader(s0, tokenizer, [(BOUNDARY, s1)], num_workers=workers)
    take(iter(first), at)
    state = roundtrip(merge_states([first.state_dict()]))
    assert state["stage"] == (1 if at >= BOUNDARY * GA else 0) and state["taken"] == {"0": at}
    resumed = loader(s0, tokenizer, [(BOUNDARY, s1)], num_workers=workers)
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 30 - at), ref[at:])


def test_a_stage_added_at_a_resume_keeps_the_current_stages_token_shares(stages, tokenizer, caplog):
    # a run without stages, resumed with a later stage added (a dataset c new to the union, weight 0 until then):
    # stage 0's token-share counters go on, so the batches are those of a run that had the stage from the start
    s0, s1, _ = stages
    ref = take(iter(loader(s0, tokenizer, [(BOUNDARY, s1)])), 20)
    first = loader(s0, tokenizer)
    take(iter(first), 4)
    state = roundtrip(merge_states([first.state_dict()]))
    resumed = loader(s0, tokenizer, [(BOUNDARY, s1)])
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(state)
    assert "token-share counters restart" not in caplog.text
    assert [int(x) for x in resumed._streams[0].mixer_tokens[:2]] == [int(x) for x in state["streams"]["0"]
                                                                      ["mixer_tokens"][:2]]
    assert_same(take(iter(resumed), 16), ref[4:])


def test_resume_two_ranks_exact_and_resharded_to_one(stages, tokenizer, tmp_path):
    """Two ranks, resumed on two ranks: exact. Resumed on one rank (or another worker count): every line of the
    non-repeating datasets once, and the switch at the same step."""
    s0 = make_mixture(tmp_path, {
        "a": (None, {"abs_weight": 2.0, "allow_repeat": False}),
        "b": (None, {"abs_weight": 1.0, "allow_repeat": False}),
    }, "once0.json")
    s1 = make_mixture(tmp_path, {
        "a": (None, {"abs_weight": 1.0, "allow_repeat": False}),
        "c": (None, {"abs_weight": 3.0, "allow_repeat": False}),
    }, "once1.json")
    st = [(BOUNDARY, s1)]
    refs = [list(loader(s0, tokenizer, st, rank=r, world_size=2)) for r in range(2)]
    B = BOUNDARY * GA
    for k in (B - 4, B + 2):
        firsts = [loader(s0, tokenizer, st, rank=r, world_size=2) for r in range(2)]
        heads = [take(iter(ld), k) for ld in firsts]
        state = roundtrip(merge_states([ld.state_dict() for ld in firsts]))
        for r in range(2):  # same world: exact
            resumed = loader(s0, tokenizer, st, rank=r, world_size=2)
            resumed.load_state_dict(state)
            assert_same(heads[r] + list(resumed), refs[r])
        for workers in (0, 2):  # one rank: every line once, b only before the switch
            one = loader(s0, tokenizer, st, num_workers=workers)
            one.load_state_dict(state)
            assert one.batches_taken == k
            rest = list(one)
            before = max(0, B - k)
            assert all("b" not in b["indexes"] for b in rest[before:])
            assert all("c" not in b["indexes"] for b in rest[:before])
            used = Counter((t, i) for b in heads[0] + heads[1] + rest for t, ix in b["indexes"].items() for i in ix)
            assert max(used.values()) == 1  # no line twice
            assert {i for t, i in used if t == "a"} == set(range(80))  # a and c are used up; b only in stage 0
            assert {i for t, i in used if t == "c"} == set(range(50))


def test_set_step_moves_to_the_stage_of_the_trainers_iteration(stages, tokenizer, caplog):
    """A state saved without stages (or data.load_data false) and a trainer at iteration 7: stage 1, 7 × GA batches."""
    s0, s1, _ = stages
    plain = loader(s0, tokenizer)
    take(iter(plain), 14)
    state = roundtrip(merge_states([plain.state_dict()]))
    state.pop("stage"), state.pop("taken"), state.pop("grad_accum")  # as fm before data stages wrote it
    ld = loader(s0, tokenizer, [(BOUNDARY, s1)])
    ld.load_state_dict(state)
    assert ld.stage == 0 and ld.batches_taken == 0
    ld.set_step(7)
    assert ld.stage == 1 and ld.batches_taken == 14
    got = take(iter(ld), 3)
    assert all("b" not in b["indexes"] for b in got) and any("c" in b["indexes"] for b in got)
    fresh = loader(s0, tokenizer, [(BOUNDARY, s1)])
    fresh.set_step(0)
    assert fresh.stage == 0 and fresh.batches_taken == 0


def test_one_task_name_for_two_datasets_is_refused(stages, tokenizer, tmp_path):
    s0, _, _ = stages
    other = make_mixture(tmp_path / "elsewhere", {"a": (short_records("x", 5, 9), {})}, "s1.json")
    with pytest.raises(ValueError, match="task 'a' is .*elsewhere/a.* in stage 1 but .* in stage 0"):
        loader(s0, tokenizer, [(3, other)])


def test_a_dataset_read_differently_in_two_stages_is_refused(stages, tokenizer, tmp_path):
    # a dataset of both stages must be read the same way in both (a line cut into rows at the switch would go on
    # under another rule: IndexError in the stream); weights and allow_repeat may change
    s0, _, _ = stages
    ok = make_mixture(tmp_path, {"a": (None, {"abs_weight": 5.0, "allow_repeat": False, "dataset_name": "A",
                                              "nlines": 80})}, "reweighted.json")
    assert loader(s0, tokenizer, [(3, ok)]).task_names == ["a", "b"]
    other = make_mixture(tmp_path, {"a": (None, {"oversize_rule": "drop", "json_keys": ["output"]}),
                                    "b": (None, {})}, "reread.json")
    with pytest.raises(ValueError) as e:
        loader(s0, tokenizer, [(3, other)])
    msg = str(e.value)
    assert f"task 'a' ({tmp_path / 'a'}) is read differently in stage 1 than in stage 0: " in msg
    assert "oversize_rule 'drop' vs None; json_keys ['output'] vs None;" in msg and "abs_weight, allow_repeat" in msg
    assert "task 'b'" not in msg


# --------------------------------------------------------------------------------------------- config

def test_config_stage_keys_fm_and_upstream_form(tmp_path):
    cfg = load_config(None, {"data": {"mixture": "m.json", "stages": [{"start_iter": 90, "mixture": "d.json"}]},
                             "run": {"train_iters": 100}})
    assert cfg.stage_starts() == [0, 90] and cfg.stage_mixtures() == ["m.json", "d.json"]
    up = load_config(None, {"dataset_config": "m.json", "train_iters": "100", "lr_scheduler": "WarmupStableDrop",
                            "drop_iters": "0.2", "data_stages": [{"start_iter": "decay", "dataset_config": "d.json"}]})
    assert up.stage_starts() == [0, 80] and up.data.stages[0].mixture == "d.json"
    exp = load_config(None, {"train_iters": 100, "lr_scheduler": "warmupstableexp", "drop_begin": 60,
                             "data_stages": '[{"start_iter": "decay", "dataset_config": "d.json"}]'})
    assert exp.stage_starts() == [0, 60]
    cli = load_config(None, cli=[("data.stages", '[{"start_iter": 5, "mixture": "x.json"}]')])
    assert cli.stage_starts() == [0, 5]
    # the checkpoint's form reads back
    path = tmp_path / "c.json"
    path.write_text(up.dumps())
    assert load_config(path).data.stages == up.data.stages


def test_config_stage_problems_all_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data": {"mixture": "m.json", "stages": [
            {"start_iter": 0, "mixture": "a.json"}, {"start_iter": 60, "mixture": ""},
            {"start_iter": 40, "mixture": "b.json"}, {"start_iter": 100, "mixture": "c.json"},
            {"start_iter": "decay", "mixture": "d.json"}]}, "run": {"train_iters": 100},
            "schedule": {"name": "cosine"}})
    text = str(e.value)
    for part in ("5 problems",
                 "data.stages[0].start_iter (stage 1): 0 must be > 0 (data.mixture is the stage from iteration 0)",
                 "data.stages[1].mixture (stage 2): is empty",
                 "data.stages[2].start_iter (stage 3): 40 is not after the stage before it (iteration 60)",
                 "data.stages[3].start_iter (stage 4): 100 must be < run.train_iters 100",
                 'data.stages[4].start_iter (stage 5): "decay" needs a schedule with a decay start'):
        assert part in text, (part, text)
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data": {"stages": [{"start_iter": "soon", "mixtur": "x"}, 3]}})
    text = str(e.value)
    for part in ("data.stages[0].start_iter: must be int or one of decay, got 'soon'",
                 "unknown key 'data.stages[0].mixtur'; did you mean \"mixture\"?",
                 "data.stages[0]: missing required key 'mixture'", "data.stages[1]: must be a JSON object"):
        assert part in text, (part, text)


def test_preflight_checks_every_stage_and_dry_run_lists_them(tmp_path):
    from fm.train.preflight import preflight
    from tests.helpers import make_launch_run

    cfg = make_launch_run(tmp_path)
    data = json.loads(cfg.read_text())
    mixdir = tmp_path / "data"
    (mixdir / "decay.json").write_text(json.dumps([{"task_name": "b", "abs_weight": 3, "path": "b"},
                                                   {"task_name": "a", "abs_weight": 1, "path": "a"}]))
    data.update(train_iters=20, lr_scheduler="warmupstabledrop", drop_iters=5,
                data_stages=[{"start_iter": 8, "dataset_config": str(mixdir / "mix.json")},
                             {"start_iter": "decay", "dataset_config": str(mixdir / "decay.json")}])
    cfg.write_text(json.dumps(data))
    report = preflight(str(cfg), [])
    assert report.problems == []
    assert report.facts["data stage 2"].startswith(f"from iteration 15 (the decay): {mixdir / 'decay.json'}: 2 "
                                                   "dataset(s), token shares b 75%, a 25%")
    assert report.facts["data stage 1"].startswith("from iteration 8: ")
    assert report.facts["data"].startswith("from iteration 0: ")
    # every stage's problems at once, each naming its stage
    (mixdir / "bad.json").write_text(json.dumps([{"task_name": "a", "abs_weight": 0, "path": "a"}]))
    (mixdir / "clash.json").write_text(json.dumps([{"task_name": "a", "abs_weight": 1, "path": "b"}]))
    data.update(data_stages=[{"start_iter": 8, "dataset_config": str(mixdir / "bad.json")},
                             {"start_iter": 9, "dataset_config": str(mixdir / "nope.json")},
                             {"start_iter": "decay", "dataset_config": str(mixdir / "clash.json")}])
    cfg.write_text(json.dumps(data))
    problems = preflight(str(cfg), []).problems
    assert any(p.startswith(f"data.stages[0].mixture (stage 1) {mixdir / 'bad.json'}: entry 0 (task 'a'): "
                            "abs_weight: must be > 0") for p in problems), problems
    assert any(p.startswith("data.stages[1].mixture (stage 2): dataset config not found") for p in problems), problems
    assert len(problems) == 2, problems  # the clash is checked once every stage's mixture reads
    data.update(data_stages=[{"start_iter": "decay", "dataset_config": str(mixdir / "clash.json")}])
    cfg.write_text(json.dumps(data))
    problems = preflight(str(cfg), []).problems
    assert problems == [f"data.stages: task 'a' is {mixdir / 'b'} (jsonl) in data.stages[0] (stage 1) but "
                        f"{mixdir / 'a'} (jsonl) in data.mixture (stage 0): a task name is one dataset in every stage "
                        "(rename one of them)"], problems
    (mixdir / "reread.json").write_text(json.dumps([{"task_name": "a", "abs_weight": 1, "path": "a",
                                                     "oversize_rule": "head"}]))
    data.update(data_stages=[{"start_iter": "decay", "dataset_config": str(mixdir / "reread.json")}])
    cfg.write_text(json.dumps(data))
    problems = preflight(str(cfg), []).problems
    assert len(problems) == 1 and problems[0].startswith(
        f"data.stages: task 'a' ({mixdir / 'a'}) is read differently in data.stages[0] (stage 1) than in data.mixture "
        "(stage 0): oversize_rule 'head' vs None;"), problems


def test_step_line_and_tensorboard_name_the_stage(tmp_path):
    from fm.train.metrics import MetricsWriter, format_step_line

    row = {"iter": 3, "train_iters": 9, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 10.0,
           "step_time": 0.1, "skipped_steps": 0, "tokens": 8}
    assert "stage" not in format_step_line(row)
    assert "| stage 1 |" in format_step_line(dict(row, stage=1))
    writer = MetricsWriter(enabled=True, tensorboard_dir=tmp_path / "tb", jsonl_path=None)
    writer.log_step(dict(row, stage=1))
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("Data/stage")] == [(3, 1.0)]
