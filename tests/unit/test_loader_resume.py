"""Loader state: exact continuation, resharding (ranks and workers), exhaustion, small state, config changes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch

from fm.data.loader import build_train_loader, compact_layers, merge_states, permute
from tests.helpers import make_mixture, text, write_index
from tests.helpers import records as short_records


@pytest.fixture()
def mix(tmp_path):
    """Two non-repeating short-line datasets (no line needs splitting) and one repeating one."""
    return make_mixture(tmp_path, {
        "a": (short_records("a", 60, 1), {"abs_weight": 2.0, "allow_repeat": False}),
        "b": (short_records("b", 40, 2, instr=True), {"abs_weight": 1.0, "allow_repeat": False}),
    })


def loader(cfg, tok, **kw):
    opts = dict(batch_size=2, max_length=32, seed=3)
    opts.update(kw)
    return build_train_loader(cfg, tok, **opts)


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in ("inputs", "targets", "task_ids", "position_ids", "cu_seqlens", "lengths"):
            assert torch.equal(x[key], y[key]), key
        assert x["indexes"] == y["indexes"] and x["num_tokens"] == y["num_tokens"]


def roundtrip(state):
    return json.loads(json.dumps(state))


def lines_used(batches, tasks=("a", "b")) -> Counter:
    c = Counter()
    for b in batches:
        for task in tasks:
            c.update((task, i) for i in b["indexes"].get(task, []))
    return c


# --------------------------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_exact_continuation(mix, tokenizer, workers):
    ref_loader = loader(mix, tokenizer, num_workers=workers)
    ref = list(ref_loader)
    assert ref_loader.stop_reason and "used up" in ref_loader.stop_reason
    k = 5
    first = loader(mix, tokenizer, num_workers=workers)
    it = iter(first)
    head = take(it, k)
    state = roundtrip(merge_states([first.state_dict()]))  # workers have prefetched beyond batch k by now
    rest_uninterrupted = list(it)
    assert_same(head + rest_uninterrupted, ref)
    resumed = loader(mix, tokenizer, num_workers=workers)
    resumed.load_state_dict(state)
    assert_same(list(resumed), ref[k:])
    assert resumed.stop_reason == ref_loader.stop_reason
    assert resumed.stats() == ref_loader.stats()  # statistics continue across the resume


def test_exact_continuation_two_ranks_repeating(tmp_path, tokenizer):
    cfg = make_mixture(tmp_path, {
        "a": (short_records("a", 30, 1), {"abs_weight": 3.0}),
        "b": (short_records("b", 20, 2, instr=True), {"abs_weight": 1.0}),
    })
    refs = [take(iter(loader(cfg, tokenizer, rank=r, world_size=2)), 20) for r in range(2)]
    firsts = [loader(cfg, tokenizer, rank=r, world_size=2) for r in range(2)]
    for r, ld in enumerate(firsts):
        take(iter(ld), 7 + r)  # ranks may stop at different batches (e.g. a crash)
    state = roundtrip(merge_states([ld.state_dict() for ld in firsts]))
    for r in range(2):
        resumed = loader(cfg, tokenizer, rank=r, world_size=2)
        resumed.load_state_dict(state)
        assert_same(take(iter(resumed), 20 - 7 - r), refs[r][7 + r:])


def test_zero_and_one_worker_are_the_same_stream(mix, tokenizer):
    ref = list(loader(mix, tokenizer, num_workers=0))
    first = loader(mix, tokenizer, num_workers=0)
    take(iter(first), 4)
    resumed = loader(mix, tokenizer, num_workers=1)
    resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
    assert_same(list(resumed), ref[4:])


def test_reiterating_continues_from_consumed(mix, tokenizer):
    ref = list(loader(mix, tokenizer, num_workers=2))
    ld = loader(mix, tokenizer, num_workers=2)
    head = take(iter(ld), 3)
    assert_same(head + list(ld), ref)  # a new iter() resumes after the last batch handed out


# --------------------------------------------------------------------------------------------- reshard

def run_phases(cfg, tok, phases):
    """phases: list of (world_size, workers, batches per rank or None = to the end). Returns all batches."""
    batches, state = [], None
    for world, workers, n in phases:
        loaders = [loader(cfg, tok, rank=r, world_size=world, num_workers=workers) for r in range(world)]
        for ld in loaders:
            if state is not None:
                ld.load_state_dict(state)
            batches += list(ld) if n is None else take(iter(ld), n)
        state = roundtrip(merge_states([ld.state_dict() for ld in loaders]))
    return batches, state


@pytest.mark.parametrize("phases", [
    [(2, 0, 4), (1, 0, None)],  # 2 ranks → 1
    [(1, 0, 5), (3, 0, None)],  # 1 rank → 3
    [(1, 2, 4), (1, 3, 3), (2, 1, None)],  # workers 2 → 3, then 2 ranks × 1 worker
])
def test_reshard_trains_every_line_once(mix, tokenizer, phases):
    batches, state = run_phases(mix, tokenizer, phases)
    used = lines_used(batches)
    expected = Counter([("a", i) for i in range(60)] + [("b", i) for i in range(40)])
    assert used == expected
    lines = {t["task"]: t["stats"]["lines"] for t in state["datasets"]}
    assert lines == {"a": 60, "b": 40}  # statistics survive resharding


def test_layers_describe_exactly_the_remaining_positions():
    from fm.data.order import build_chain

    rng = np.random.default_rng(0)
    for root_len in (None, 97):
        taken: set[int] = set()
        layers: list = []
        for V in (3, 5, 2, 4, 3):
            chain = build_chain(layers, root_len)
            length = chain[-1].length if chain else root_len
            counters = [int(x) for x in rng.integers(0, 7, size=V)]
            if length is not None:  # a stream cannot take more than its share
                counters = [min(c, max(0, -(-(length - v) // V))) for v, c in enumerate(counters)]
            for v, c in enumerate(counters):
                g = _to_root(layers, root_len, np.arange(c, dtype=np.int64) * V + v).tolist()
                assert not taken & set(g) and len(set(g)) == len(g)
                taken |= set(g)
            layers = compact_layers(layers + [[V, counters]], root_len, 0)
        # The final layer lists the untaken root positions in increasing order.
        limit = root_len if root_len is not None else 10**6
        expected = [p for p in range(limit) if p not in taken][:60]
        g = _to_root(layers, root_len, np.arange(len(expected), dtype=np.int64))
        assert g.tolist() == expected
        assert len(layers) <= 5


def _to_root(layers, root_len, top):
    from fm.data.order import build_chain

    g = top
    for layer in reversed(build_chain(layers, root_len)):
        g = layer.map(g)
    return g


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 10, 1000, 4097):
        p = permute(np.arange(n), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    assert permute(np.arange(50), 50, 1).tolist() != permute(np.arange(50), 50, 2).tolist()


def test_repeating_dataset_new_epoch_is_a_fresh_permutation(tmp_path, tokenizer):
    cfg = make_mixture(tmp_path, {"r": (short_records("r", 25, 1), {})})
    ld = loader(cfg, tokenizer, batch_size=1, max_length=64)
    seq = [i for b in take(iter(ld), 40) for i in b["indexes"]["r"]][:75]
    epochs = [seq[0:25], seq[25:50], seq[50:75]]
    assert all(sorted(e) == list(range(25)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


# --------------------------------------------------------------------------------------------- end, size, changes

def test_exhaustion_stops_cleanly(mix, tokenizer):
    ld = loader(mix, tokenizer, num_workers=2)
    it = iter(ld)
    batches = list(it)
    with pytest.raises(StopIteration):
        next(it)
    assert ld.stop_reason == "every dataset is used up: 'a' (60 lines, allow_repeat: false), " \
                             "'b' (40 lines, allow_repeat: false)"
    assert lines_used(batches) == Counter([("a", i) for i in range(60)] + [("b", i) for i in range(40)])
    # Resuming a finished loader yields nothing and says why.
    again = loader(mix, tokenizer, num_workers=2)
    again.load_state_dict(merge_states([ld.state_dict()]))
    assert list(again) == [] and again.stop_reason == ld.stop_reason


def test_state_is_small_for_100_datasets_after_a_million_lines(tmp_path, tokenizer):
    cfg = make_mixture(tmp_path, {f"task{i:03d}": ([{"output": "x"}] * 3, {}) for i in range(100)})
    world, workers = 4, 2
    loaders = [loader(cfg, tokenizer, rank=r, world_size=world, num_workers=workers) for r in range(world)]
    rng = random.Random(0)
    for ld in loaders:  # advance every counter synthetically: 10,000 lines per dataset, 1M lines in all
        for snap in ld._streams:
            snap.batches = 125_000
            snap.line[:] = [1250 + rng.randint(-40, 40) for _ in range(100)]
            snap.mixer_tokens[:] = 3_000_000_000 // 800
            snap.stats[:] = [1_250_000, 1250, 1250, 3, 0, 5, 7]
    state = merge_states([ld.state_dict() for ld in loaders])
    assert len(json.dumps(state)) < 64 * 1024
    resharded = loader(cfg, tokenizer, rank=0, world_size=3, num_workers=1)
    resharded.load_state_dict(roundtrip(state))
    assert len(json.dumps(resharded.state_dict())) < 64 * 1024


def test_weight_change_and_dataset_add_remove(tmp_path, tokenizer, caplog):
    datasets = {
        "a": (short_records("a", 60, 1), {"abs_weight": 2.0, "allow_repeat": False}),
        "b": (short_records("b", 40, 2, instr=True), {"abs_weight": 1.0, "allow_repeat": False}),
    }
    cfg1 = make_mixture(tmp_path, datasets, "one.json")
    first = loader(cfg1, tokenizer, num_workers=2)
    phase1 = take(iter(first), 6)
    state = roundtrip(merge_states([first.state_dict()]))
    datasets2 = {"a": (None, {"abs_weight": 5.0, "allow_repeat": False}),
                 "c": (short_records("c", 10, 3), {"abs_weight": 1.0, "allow_repeat": False})}
    cfg2 = make_mixture(tmp_path, datasets2, "two.json")
    second = loader(cfg2, tokenizer, num_workers=2)
    with caplog.at_level(logging.INFO, logger="fm.data.loader"):
        second.load_state_dict(state)
    log_text = caplog.text
    assert "mixture changed" in log_text and "'c' is new" in log_text and "'b' was removed" in log_text
    phase2 = list(second)
    used_a = lines_used(phase1 + phase2, ("a",))
    assert used_a == Counter(("a", i) for i in range(60))  # no line of a continuing dataset repeated or lost
    assert lines_used(phase2, ("c",)) == Counter(("c", i) for i in range(10))
    assert all("b" not in b["task_names"] for b in phase2)
    # Same streams, weights changed: also fine with a different worker count.
    third = loader(cfg2, tokenizer, num_workers=3)
    third.load_state_dict(state)
    assert lines_used(phase1 + list(third), ("a",)) == Counter(("a", i) for i in range(60))


def test_megatron_format_entry(tmp_path, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 7000, size=int(rng.integers(1, 12))).astype(np.int32) for _ in range(30)]
    prefix = str(tmp_path / "tok" / "corpus")
    os.makedirs(os.path.dirname(prefix))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    cfg = tmp_path / "mix.json"
    cfg.write_text(json.dumps([{"task_name": "m", "abs_weight": 1, "path": "tok/corpus", "format": "megatron",
                                "allow_repeat": False}]))
    seen = {}
    for b in loader(str(cfg), tokenizer, max_length=16):
        cu = b["cu_seqlens"].tolist()
        flat_in, flat_tgt = b["inputs"].flatten().tolist(), b["targets"].flatten().tolist()
        lines = iter(b["indexes"]["m"])
        for s, e in zip(cu[:-1], cu[1:]):
            if b["task_ids"].flatten()[s] < 0:
                continue
            line = next(lines)
            assert flat_in[s] == tokenizer.bos_id
            seen[line] = (flat_in[s + 1:e], flat_tgt[s:e])
    assert sorted(seen) == list(range(30))
    for i, (src, tgt) in seen.items():
        assert src == docs[i].tolist() and tgt == docs[i].tolist() + [tokenizer.eos_id]


@pytest.fixture()
def long_mix(tmp_path):
    """Lines longer than max_length (segmented / truncated) mixed with short ones."""
    rng = random.Random(5)
    return make_mixture(tmp_path, {
        "a": ([{"output": f"a{i} " + text(rng, rng.randint(2, 40))} for i in range(30)], {"allow_repeat": False}),
        "b": ([{"input": f"b{i} " + text(rng, 3), "output": text(rng, rng.randint(2, 30))} for i in range(20)],
              {"allow_repeat": False, "abs_weight": 0.5}),
    })


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_continuation_with_segmented_lines(long_mix, tokenizer, workers):
    ref = list(loader(long_mix, tokenizer, num_workers=workers, max_length=24))
    for k in (1, 4):
        first = loader(long_mix, tokenizer, num_workers=workers, max_length=24)
        take(iter(first), k)
        resumed = loader(long_mix, tokenizer, num_workers=workers, max_length=24)
        resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
        assert_same(list(resumed), ref[k:])


def test_reshard_puts_partly_used_lines_back(long_mix, tokenizer):
    ld = loader(long_mix, tokenizer, max_length=24)
    phase1, it = [], iter(ld)
    for batch in it:  # stop at the first batch that ends inside a segmented line
        phase1.append(batch)
        state = roundtrip(merge_states([ld.state_dict()]))
        partial = state["streams"]["0"]["chunk"]  # chunks already taken of the current line
        if any(partial):
            break
    assert sum(1 for p in partial if p > 0) == 1 and len(phase1) < 20
    phase2 = []
    for r in range(2):
        other = loader(long_mix, tokenizer, max_length=24, rank=r, world_size=2)
        other.load_state_dict(state)
        phase2 += list(other)
    used1, used2 = set(lines_used(phase1)), set(lines_used(phase2))
    everything = {("a", i) for i in range(30)} | {("b", i) for i in range(20)}
    assert used1 | used2 == everything  # nothing lost
    # Only a line that was cut at the save point appears in both phases (trained again from its start).
    assert len(used1 & used2) == sum(1 for p in partial if p > 0)


def test_upstream_index_without_leading_zero(tmp_path, tokenizer):
    records = short_records("u", 12, 4)
    write_index(tmp_path / "u", records)
    offsets = (tmp_path / "u" / "index").read_text().split()
    (tmp_path / "u" / "index").write_text("\n".join(offsets[1:]) + "\n")  # upstream: n end offsets
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps([{"task_name": "u", "abs_weight": 1, "path": "u", "allow_repeat": False}]))
    seen = {}
    for b in loader(str(cfg), tokenizer, max_length=64):
        cu, flat = b["cu_seqlens"].tolist(), b["inputs"].flatten().tolist()
        lines = iter(b["indexes"]["u"])
        for s, e in zip(cu[:-1], cu[1:]):
            if b["task_ids"].flatten()[s] >= 0:
                seen[next(lines)] = tokenizer.decode(flat[s + 1:e])
    assert seen == {i: r["output"] for i, r in enumerate(records)}  # line 0 included


# --------------------------------------------------------------------------------------------- state versions

V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "loader_state_v1.json")


def test_version_1_state_resumes_exactly(tmp_path, tokenizer):
    """A state saved by fm before the state became dataclasses (version 1, positional lists) continues with the
    batches that fm produced next (recorded in the fixture), on both ranks."""
    fixture = json.loads(open(V1_FIXTURE).read())
    assert fixture["state"]["version"] == 1
    cfg = make_mixture(tmp_path, {
        "a": (short_records("a", 60, 1), {"abs_weight": 2.0, "allow_repeat": False}),
        "b": (short_records("b", 40, 2, instr=True), {"abs_weight": 1.0, "allow_repeat": True}),
    })
    for rank in range(2):
        ld = loader(cfg, tokenizer, rank=rank, world_size=2)
        ld.load_state_dict(fixture["state"])
        got = take(iter(ld), len(fixture["next_batches"][rank]))
        for b, want in zip(got, fixture["next_batches"][rank], strict=True):
            assert b["inputs"].tolist() == want["inputs"] and b["targets"].tolist() == want["targets"]
            assert b["indexes"] == want["indexes"]
        state = ld.state_dict()
        assert state["version"] == 2 and set(state["streams"][str(rank)]) == {"batches", "line", "chunk",
                                                                              "mixer_tokens", "finished"}


def test_state_round_trips_and_refuses_unknown_versions(mix, tokenizer):
    from fm.data.state import LoaderState

    ld = loader(mix, tokenizer, num_workers=2)
    take(iter(ld), 3)
    state = roundtrip(merge_states([ld.state_dict()]))
    assert LoaderState.from_dict(state).to_dict() == state
    assert state["total_streams"] == 2 and [d["task"] for d in state["datasets"]] == ["a", "b"]
    with pytest.raises(ValueError, match="state version 7 is not supported .*load_dataloader_ckpt: false"):
        loader(mix, tokenizer).load_state_dict(dict(state, version=7))
    broken = roundtrip(state)
    broken["streams"]["0"]["line"] = [1]
    with pytest.raises(ValueError, match="'line' has 1 entries for 2 datasets"):
        loader(mix, tokenizer, num_workers=2).load_state_dict(broken)
    with pytest.raises(ValueError, match="not a data loader state"):
        loader(mix, tokenizer).load_state_dict({"kind": "something else"})


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def hf_tokenizer(tmp_path_factory, request):
    """A Hugging Face tokenizer (tests.support.hf_fixtures): without BOS, with a ChatML template; or Llama-3 style,
    whose post-processor adds a BOS to text (the packer adds it to plain samples, never to conversations) and whose
    template writes its own BOS and the date."""
    from fm.tokenizer import load_tokenizer
    from tests.support.hf_fixtures import build_hf_tokenizer

    return load_tokenizer(build_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok", style=request.param))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_continuation_with_an_hf_tokenizer(tmp_path, hf_tokenizer, workers):
    """No BOS, segmented and truncated lines, and SFT conversations rendered with the tokenizer's template."""
    rng = random.Random(6)
    chats = [{"messages": [{"role": "user", "content": f"q{i} " + text(rng, 3)},
                           {"role": "assistant", "content": text(rng, rng.randint(1, 12))}]} for i in range(25)]
    cfg = make_mixture(tmp_path, {
        "a": ([{"output": f"a{i} " + text(rng, rng.randint(2, 40))} for i in range(30)], {"allow_repeat": False}),
        "b": ([{"input": f"b{i} " + text(rng, 3), "output": text(rng, rng.randint(2, 30))} for i in range(20)],
              {"allow_repeat": False, "abs_weight": 0.5}),
        "c": (chats, {"allow_repeat": False, "messages_key": "messages"}),
    })
    ml = 192 if hf_tokenizer.add_bos else 96  # Llama-3's template writes a long system header
    ref = list(loader(cfg, hf_tokenizer, num_workers=workers, max_length=ml))
    if hf_tokenizer.add_bos:  # a BOS starts each sample (but a segment's later chunks), never two of them
        firsts = 0
        for b in ref:
            flat, cu = b["inputs"].reshape(-1).tolist(), b["cu_seqlens"].tolist()
            for a, e in zip(cu[:-1], cu[1:]):
                bos = [i for i in range(a, e) if flat[i] == hf_tokenizer.bos_id]
                assert bos in ([], [a])
                firsts += bool(bos)
        assert firsts >= 30 + 20 + 25
    assert set(lines_used(ref, ("a", "b", "c"))) == {(t, i) for t, n in (("a", 30), ("b", 20), ("c", 25))
                                                     for i in range(n)}
    for k in (1, 5):
        first = loader(cfg, hf_tokenizer, num_workers=workers, max_length=ml)
        take(iter(first), k)
        resumed = loader(cfg, hf_tokenizer, num_workers=workers, max_length=ml)
        resumed.load_state_dict(roundtrip(merge_states([first.state_dict()])))
        assert_same(list(resumed), ref[k:])


WORKERS_AFTER_A_PROCESS_GROUP = """
import itertools, sys
import torch.distributed as dist
from fm.data.loader import build_train_loader
from fm.tokenizer import load_tokenizer

loader = build_train_loader(sys.argv[1], load_tokenizer("demo"), batch_size=2, max_length=32, seed=3, num_workers=2)
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
cycle = {"pg": dist.distributed_c10d._get_default_group()}
cycle["self"] = cycle
dist.destroy_process_group()
del cycle  # garbage now, which only the cycle collector frees: in whichever process it runs next
print(len(list(itertools.islice(iter(loader), 20))))
"""

COLLECTING_TRANSFORM = """
import gc


def transform(data, num_sample, r):
    gc.collect()  # a full collection inside the worker, as allocation-heavy transforms trigger sooner or later
    return {"input": data.get("input", ""), "output": data["output"]}
"""


def test_workers_fork_cleanly_after_a_process_group_became_garbage(tmp_path):
    # A destroyed gloo process group left in a reference cycle (as an engine and its sharded model leave it) used to
    # be collected inside each forked worker, where its destructor waits for the parent's gloo threads: the worker
    # hung and the run with it. The loader collects and freezes the parent's garbage before it forks.
    import subprocess
    import sys

    (tmp_path / "collect.py").write_text(COLLECTING_TRANSFORM)
    mix = make_mixture(tmp_path, {"a": (short_records("a", 60, 1), {"transforms": str(tmp_path / "collect.py")})})
    script = tmp_path / "fork_after_pg.py"
    script.write_text(WORKERS_AFTER_A_PROCESS_GROUP)
    try:
        out = subprocess.run([sys.executable, str(script), mix, str(tmp_path / "store")], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader's workers hung after a process group became garbage")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "20"
