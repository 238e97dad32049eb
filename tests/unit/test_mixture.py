"""Mixture configs: validation (every problem at once), transforms, token shares of the mixer and the loader."""

from __future__ import annotations

import json
import random

import pytest

from fm.data.loader import build_train_loader
from fm.data.mixture import MixtureConfigError, TokenShareMixer, TransformError, load_mixture
from tests.helpers import make_mixture, text, write_index
from tests.helpers import records as short_records


def assert_shares_within_one_sample(picks, weights):
    """picks: (dataset, tokens) in order. At every prefix |t_d − w_d·T| ≤ the longest sample."""
    w = [x / sum(weights) for x in weights]
    longest = max(n for _, n in picks)
    t = [0] * len(w)
    total = 0
    worst = 0.0
    for d, n in picks:
        t[d] += n
        total += n
        worst = max(worst, max(abs(t[i] - w[i] * total) for i in range(len(w))))
    assert worst <= longest, (worst, longest)
    return worst


def test_mixer_token_shares_every_prefix():
    rng = random.Random(0)
    weights = [5.0, 3.0, 1.5, 0.5]
    ranges = [(1, 20), (30, 60), (1, 200), (10, 11)]  # very different sample lengths per dataset
    mixer = TokenShareMixer(weights)
    picks = []
    for _ in range(10_000):
        d = mixer.pick([True] * 4)
        n = rng.randint(*ranges[d])
        mixer.add(d, n)
        picks.append((d, n))
    assert_shares_within_one_sample(picks, weights)


def test_mixer_is_deterministic_and_ties_go_first():
    mixer = TokenShareMixer([1, 1])
    order = []
    for _ in range(4):
        d = mixer.pick([True, True])
        mixer.add(d, 10)
        order.append(d)
    assert order == [0, 1, 0, 1]
    assert TokenShareMixer([1, 1], [5, 0]).pick([True, True]) == 1
    assert TokenShareMixer([1, 1], [5, 0]).pick([True, False]) == 0
    assert TokenShareMixer([1]).pick([False]) == -1


def test_loader_token_shares_over_10k_samples(tmp_path, tokenizer):
    cfg = make_mixture(tmp_path, {
        "a": (short_records("a", 50, 1), {"abs_weight": 6.0}),
        "b": (short_records("b", 30, 2, instr=True), {"abs_weight": 3.0}),
        "c": ([{"output": text(random.Random(i), 12)} for i in range(20)], {"abs_weight": 1.0}),
    })
    ld = build_train_loader(cfg, tokenizer, batch_size=4, max_length=64)
    picks = []
    for b in ld:
        flat = b["task_ids"].flatten()
        cu = b["cu_seqlens"].tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            d = int(flat[s])
            if d >= 0:
                picks.append((d, e - s))
        if len(picks) >= 10_000:
            break
    assert len(picks) >= 10_000
    assert_shares_within_one_sample(picks, [6.0, 3.0, 1.0])


# --------------------------------------------------------------------------------------------- validation

def test_every_problem_listed_at_once(tmp_path):
    write_index(tmp_path / "ok", [{"input": "", "output": "hello"}])
    (tmp_path / "nodata").mkdir()
    tdir = tmp_path / "t"
    tdir.mkdir()
    (tdir / "broken.py").write_text("def transform(data, num_sample, r):\n    return 1 +\n")
    (tdir / "nofn.py").write_text("x = 1\n")
    (tdir / "baddict.py").write_text("def transform(data, num_sample, r):\n    return {'input': '', 'output': 3}\n")
    (tdir / "raises.py").write_text("def transform(data, num_sample, r):\n    raise KeyError('text')\n")
    entries = [
        {"task_name": "t0", "abs_weigth": 1, "path": "ok"},
        {"task_name": "t1", "abs_weight": 0, "path": "ok"},
        {"task_name": "t2", "abs_weight": "1", "path": "missing_dir"},
        {"task_name": "t3", "abs_weight": 1, "path": "nodata"},
        {"task_name": "t1", "abs_weight": 1, "path": "ok"},
        {"task_name": "t5", "abs_weight": 1, "path": "ok", "transforms": "t/none.py"},
        {"task_name": "t6", "abs_weight": 1, "path": "ok", "transforms": "t/broken.py"},
        {"task_name": "t7", "abs_weight": 1, "path": "ok", "transforms": "t/nofn.py"},
        {"task_name": "t8", "abs_weight": 1, "path": "ok", "transforms": "t/baddict.py"},
        {"task_name": "t9", "abs_weight": 1, "path": "ok", "transforms": "t/raises.py", "oversize_rule": "cut"},
    ]
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(entries))
    with pytest.raises(MixtureConfigError) as info:
        load_mixture(str(cfg))
    msg = str(info.value)
    expected = [
        "task 't0'): unknown key 'abs_weigth'; did you mean \"abs_weight\"?",
        "task 't0'): missing required key 'abs_weight'",
        "task 't1'): abs_weight: must be > 0, got 0",
        "task 't2'): abs_weight: must be a number (a JSON number, not a string), got '1'",
        "task 't2'): path not found",
        "task 't3'): " + str(tmp_path / "nodata") + "/data.jsonl not found",
        "task 't3'): " + str(tmp_path / "nodata") + " has no 'index'",
        "entry 4: duplicate task_name 't1'",
        "task 't5'): transform script not found: " + str(tdir / "none.py"),
        "task 't6': transform " + str(tdir / "broken.py") + " failed to import: SyntaxError",
        "task 't7': " + str(tdir / "nofn.py") + " defines no function transform(data, num_sample, r)",
        "task 't8': transform must return a dict with string 'input' and 'output', got {'input': str, 'output': int}"
        " for record {'input': '', 'output': 'hello'}",
        "task 't9'): oversize_rule: 'cut' is not one of drop, head, segment",
    ]
    for part in expected:
        assert part in msg, part
    assert len(info.value.problems) == len(expected)


def test_transform_error_message_runs_at_validation_too(tmp_path):
    write_index(tmp_path / "ok", [{"text": "hello"}])
    (tmp_path / "raises.py").write_text("def transform(data, num_sample, r):\n    return {'output': data['output']}\n")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps([{"task_name": "x", "abs_weight": 1, "path": "ok", "transforms": "raises.py"}]))
    with pytest.raises(MixtureConfigError, match=r"task 'x': transform .*raises.py raised KeyError: 'output' on "
                                                 r"record 0 \{'text': 'hello'\}"):
        load_mixture(str(cfg))


def test_transform_relative_to_config_and_rng_per_line(tmp_path, tokenizer):
    sub = tmp_path / "configs"
    (sub / "transforms").mkdir(parents=True)
    write_index(tmp_path / "data" / "t", [{"text": f"line {i}"} for i in range(20)])
    (sub / "transforms" / "up.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    return {'input': '', 'output': data['text'].upper() + ' ' + str(r.randint(0, 999))}\n")
    cfg = sub / "m.json"
    cfg.write_text(json.dumps([{"task_name": "t", "abs_weight": 1, "path": "../data/t",
                                "transforms": "transforms/up.py", "allow_repeat": False}]))

    def decoded(workers):
        out = {}
        for b in build_train_loader(str(cfg), tokenizer, batch_size=2, max_length=32, num_workers=workers):
            cu, flat = b["cu_seqlens"].tolist(), b["inputs"].flatten().tolist()
            lines = iter(b["indexes"]["t"])
            for s, e in zip(cu[:-1], cu[1:]):
                if b["task_ids"].flatten()[s] >= 0:
                    out[next(lines)] = tokenizer.decode(flat[s + 1:e])
        return out

    one, two = decoded(0), decoded(2)
    assert sorted(one) == list(range(20))
    assert all(one[i].startswith(f"LINE {i} ") for i in range(20))
    assert one == two  # transform RNG depends on (seed, task, line, epoch), not on the stream


def test_identity_without_transforms_and_runtime_transform_error(tmp_path, tokenizer):
    write_index(tmp_path / "d", [{"input": "", "output": "fine"}] * 5 + [{"input": "", "output": "x", "k": 1}] * 3)
    (tmp_path / "late.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    return {'input': '', 'output': None} if 'k' in data else data\n")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps([{"task_name": "late", "abs_weight": 1, "path": "d", "transforms": "late.py",
                                "allow_repeat": False}]))
    with pytest.raises(TransformError, match=r"task 'late': transform must return .*'output': NoneType.*'k': 1"):
        list(build_train_loader(str(cfg), tokenizer, batch_size=2, max_length=32))
    cfg.write_text(json.dumps([{"task_name": "plain", "abs_weight": 1, "path": "d", "allow_repeat": False}]))
    batches = list(build_train_loader(str(cfg), tokenizer, batch_size=2, max_length=32))
    assert sum(len(b["indexes"]["plain"]) for b in batches) == 8


def test_stats_cli(tmp_path, tokenizer_path, capsys):
    from fm.data.stats import main

    cfg = make_mixture(tmp_path, {
        "a": (short_records("a", 40, 1), {"abs_weight": 3.0}),
        "b": (short_records("b", 20, 2, instr=True), {"abs_weight": 1.0, "allow_repeat": False}),
    })
    assert main(["--dataset-config", cfg, "--tokenizer", tokenizer_path, "--batch-size", "2", "--max-length", "32",
                 "--rows", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 40 and out["batches"] == 20 and out["tokens"] > 0
    assert set(out["tasks"]) == {"a", "b"} and abs(out["tasks"]["a"]["weight"] - 0.75) < 1e-9
    assert abs(sum(t["share"] for t in out["tasks"].values()) - 1) < 1e-9
    assert main(["--dataset-config", cfg, "--tokenizer", tokenizer_path, "--rows", "4", "--max-length", "32"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["--dataset-config", str(tmp_path / "none.json"), "--tokenizer", tokenizer_path]) == 1


def test_shipped_configs_and_transforms(tmp_path, repo_root):
    from fm.data.mixture import check_transformed, load_transform, parse_mixture

    for script in sorted((repo_root / "dataset_configs" / "transforms").glob("*.py")):
        out = load_transform(str(script))({"input": "q", "output": "a"}, 0, random.Random(0))
        check_transformed(out, script.name, {})
    write_index(tmp_path / "d", [{"input": "q", "output": "a"}])
    for cfg in sorted((repo_root / "dataset_configs").glob("*.json")):
        entries = json.loads(cfg.read_text())
        for e in entries:  # the data is built by quick_start/demo.sh; keys and transforms are checked here
            e["path"] = str(tmp_path / "d")
        mixture = parse_mixture(entries, str(cfg))
        assert len(mixture.datasets) == len(entries)


def _reference_pick(weights, tokens, active):
    """The rule as first written: a Python loop, largest deficit first, ties to the earlier dataset."""
    total_w = float(sum(weights))
    ws = [w / total_w for w in weights]
    total = sum(tokens)
    best, best_deficit = -1, -float("inf")
    for d, (w, t) in enumerate(zip(ws, tokens)):
        if active[d]:
            deficit = w * total - t
            if deficit > best_deficit:
                best, best_deficit = d, deficit
    return best


@pytest.mark.parametrize("datasets", [3, 40, 1200])
def test_mixer_picks_as_the_reference_rule(datasets):
    """Small mixtures loop, large ones use numpy: both pick exactly what the plain rule picks."""
    rng = random.Random(datasets)
    weights = [1.0 / (i + 1) for i in range(datasets)]
    mixer = TokenShareMixer(weights)
    tokens, active = [0] * datasets, [True] * datasets
    for step in range(3000):
        if step % 97 == 0 and sum(active) > 1:
            d = rng.randrange(datasets)
            active[d] = False
            mixer.close(d)
        want = _reference_pick(weights, tokens, active)
        assert mixer.pick() == want
        n = rng.randint(1, 300)
        mixer.add(want, n)
        tokens[want] += n
    assert mixer.tokens.tolist() == tokens
    for d in range(datasets):
        mixer.close(d)
    assert mixer.pick() == -1
