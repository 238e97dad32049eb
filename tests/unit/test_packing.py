"""Tokenize + pack: sample construction (upstream semantics) and the invariants of packed batches."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fm.data.loader import build_train_loader
from fm.data.packing import (
    IGNORE_INDEX,
    INPUT_TOO_LONG,
    OVERSIZE_DROPPED,
    SEGMENTED,
    TRUNCATED,
    PackedBatchBuilder,
    sample_pieces,
)
from tests.helpers import make_mixture, text, write_index
from tests.helpers import records as short_records

BOS, EOS = 1, 2


def build_samples(input_ids, output_ids, bos_id, eos_id, max_length, rule=None):
    """sample_pieces' samples written out as ``(src, tgt)`` lists (``tgt[t]`` is the label of position t), the
    reference the tests state upstream's semantics in."""
    samples, event = sample_pieces(input_ids, output_ids, bos_id, eos_id, max_length, rule)
    out = []
    for pieces, n, n_masked, last_label in samples:
        src = [int(t) for piece in pieces for t in piece]
        assert len(src) == n and 0 <= n_masked <= n
        tgt = [IGNORE_INDEX] * n if n_masked == n else [IGNORE_INDEX] * n_masked + src[n_masked + 1:] + [last_label]
        out.append((src, tgt))
    return out, event


def test_build_samples_upstream_semantics():
    (src, tgt), = build_samples([10, 11], [20, 21, 22], BOS, EOS, 16)[0]
    assert src == [BOS, 10, 11, 20, 21, 22]
    assert tgt == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 22, EOS]  # label of position t = src[t+1]
    assert build_samples([], [5], BOS, EOS, 16) == ([([BOS, 5], [5, EOS])], None)


def test_build_samples_overflow_rules():
    assert build_samples(list(range(10, 24)), [5], BOS, EOS, 16) == ([], INPUT_TOO_LONG)  # 14 ≥ 16 − 2
    assert build_samples(list(range(10, 23)), [5], BOS, EOS, 16)[1] is None  # 13 < 14 fits with its answer
    # instruction data: head truncation
    samples, event = build_samples([7, 8], list(range(30, 50)), BOS, EOS, 8)
    assert event == TRUNCATED and samples == [([BOS, 7, 8, 30, 31, 32, 33, 34], [-100, -100, 30, 31, 32, 33, 34, 35])]
    # plain text: max_length chunks that continue
    out = list(range(30, 47))  # 17 tokens → src of 18 → chunks 8, 8, 2
    samples, event = build_samples([], out, BOS, EOS, 8)
    assert event == SEGMENTED and [len(s) for s, _ in samples] == [8, 8, 2]
    assert sum((s for s, _ in samples), []) == [BOS] + out
    assert sum((t for _, t in samples), []) == out + [EOS]
    # oversize_rule overrides
    assert build_samples([], out, BOS, EOS, 8, "drop") == ([], OVERSIZE_DROPPED)
    assert build_samples([], out, BOS, EOS, 8, "head")[0] == [([BOS] + out[:7], out[:8])]
    assert [len(s) for s, _ in build_samples([7], out, BOS, EOS, 8, "segment")[0]] == [8, 8, 3]


def test_builder_rows_and_cu_seqlens():
    b = PackedBatchBuilder(2, 8, pad_id=3, task_names=["x", "y"])
    # (pieces, n, n_masked, last_label): targets [5, 6, 2], [-100, 8, 9, 2], [4, 4, 2], [2] * 6
    assert b.add_pieces(([1], [5, 6]), 3, 0, 2, 0, 10)
    assert b.add_pieces(([1], [7], [8, 9]), 4, 1, 2, 1, 4)
    assert b.add_pieces(([1, 4, 4],), 3, 0, 2, 0, 11)  # does not fit row 0 (7 + 3 > 8): starts row 1
    assert not b.add_pieces(([1] * 6,), 6, 0, 2, 0, 12)  # no room left in the batch
    out = b.finish()
    assert out["inputs"].tolist() == [[1, 5, 6, 1, 7, 8, 9, 3], [1, 4, 4, 3, 3, 3, 3, 3]]
    assert out["targets"].tolist() == [[5, 6, 2, -100, 8, 9, 2, -100], [4, 4, 2] + [-100] * 5]
    assert out["task_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1, -1, -1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert out["cu_seqlens"].tolist() == [0, 3, 7, 8, 11, 16] and out["cu_seqlens"].dtype == torch.int32
    assert out["max_seqlen"] == 5 and out["lengths"].tolist() == [7, 3] and out["num_tokens"] == 10
    assert out["indexes"] == {"x": [10, 11], "y": [4]}


def check_batch(b, batch_size, max_length, pad_id, eos_id):
    B, L = batch_size, max_length
    for key in ("inputs", "targets", "task_ids", "position_ids"):
        assert b[key].shape == (B, L) and b[key].dtype == torch.long
    cu = b["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == B * L and all(x < y for x, y in zip(cu, cu[1:]))
    assert set(range(0, B * L, L)) <= set(cu)  # no segment crosses a row
    pos = b["position_ids"].flatten().tolist()
    starts = set(cu[:-1])
    for t in range(B * L):  # positions restart exactly at segment starts
        assert (pos[t] == 0) == (t in starts) and (t in starts or pos[t] == pos[t - 1] + 1)
    assert b["max_seqlen"] == max(y - x for x, y in zip(cu, cu[1:]))
    tid = b["task_ids"]
    assert b["lengths"].tolist() == (tid >= 0).sum(1).tolist() and b["num_tokens"] == int((tid >= 0).sum())
    pad = tid < 0
    assert (b["inputs"][pad] == pad_id).all() and (b["targets"][pad] == IGNORE_INDEX).all()
    for r in range(B):  # padding only at the end of a row
        n = int(b["lengths"][r])
        assert (tid[r, :n] >= 0).all() and (tid[r, n:] < 0).all()
    flat_in, flat_tgt, flat_tid = b["inputs"].flatten(), b["targets"].flatten(), tid.flatten()
    for s, e in zip(cu[:-1], cu[1:]):
        if flat_tid[s] < 0:
            continue
        assert (flat_tid[s:e] == flat_tid[s]).all()  # one sample = one task
        labels, nxt = flat_tgt[s:e - 1], flat_in[s + 1:e]
        known = labels != IGNORE_INDEX
        assert (labels[known] == nxt[known]).all()  # shifted: label of t is token t+1
        if not known.all():  # instruction: −100 only on a prefix (the input)
            first = int((known).nonzero()[0]) if known.any() else len(labels)
            assert not known[:first].any() and known[first:].all()
    return cu


@pytest.mark.parametrize("compact", [True, False])
def test_loader_batches_keep_invariants(tmp_path, tokenizer, compact):
    rng = random.Random(0)
    long_plain = [{"output": text(rng, rng.randint(20, 60))} for _ in range(15)]
    cfg = make_mixture(tmp_path, {
        "plain": (short_records("p", 30, 1), {"do_compact": compact}),
        "instr": (short_records("i", 30, 2, instr=True), {"abs_weight": 2.0, "do_compact": compact}),
        "long": (long_plain, {"abs_weight": 0.5, "do_compact": compact}),
    })
    n = 0
    for b in build_train_loader(cfg, tokenizer, batch_size=3, max_length=24):
        cu = check_batch(b, 3, 24, tokenizer.pad_id, tokenizer.eos_id)
        if not compact:  # one sample per row: every row has at most 2 segments (sample, padding)
            assert len(cu) - 1 <= 2 * 3
        n += 1
        if n == 40:
            break
    assert n == 40


def test_plain_samples_end_with_eos(tmp_path, tokenizer):
    cfg = make_mixture(tmp_path, {"p": (short_records("p", 20, 1), {"allow_repeat": False})})
    for b in build_train_loader(cfg, tokenizer, batch_size=2, max_length=64):
        cu, tgt, tid = b["cu_seqlens"].tolist(), b["targets"].flatten(), b["task_ids"].flatten()
        for s, e in zip(cu[:-1], cu[1:]):
            if tid[s] >= 0:
                assert int(b["inputs"].flatten()[s]) == tokenizer.bos_id and int(tgt[e - 1]) == tokenizer.eos_id


def test_input_too_long_dropped_and_counted(tmp_path, tokenizer):
    rng = random.Random(0)
    records = [{"input": text(rng, rng.choice([2, 40])), "output": "yes"} for _ in range(30)]
    write_index(tmp_path / "q", records)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps([{"task_name": "q", "abs_weight": 1, "path": "q", "allow_repeat": False}]))
    L = 24
    too_long = {i for i, r in enumerate(records) if len(tokenizer.encode(r["input"])) >= L - 2}
    assert 0 < len(too_long) < 30
    ld = build_train_loader(str(cfg), tokenizer, batch_size=2, max_length=L)
    used = [i for b in ld for i in b["indexes"]["q"]]
    assert sorted(used) == sorted(set(range(30)) - too_long)
    stats = ld.stats()["q"]
    assert stats["input_too_long"] == len(too_long) and stats["lines"] == 30 and stats["samples"] == len(used)


def test_segment_and_head_counted_in_stats(tmp_path, tokenizer):
    rng = random.Random(0)
    cfg = make_mixture(tmp_path, {
        "seg": ([{"output": text(rng, 30)} for _ in range(4)], {"allow_repeat": False}),
        "head": ([{"input": "q", "output": text(rng, 30)} for _ in range(4)], {"allow_repeat": False}),
        "drop": ([{"output": text(rng, 30)} for _ in range(4)], {"allow_repeat": False, "oversize_rule": "drop"}),
    })
    ld = build_train_loader(cfg, tokenizer, batch_size=2, max_length=16)
    batches = list(ld)
    s = ld.stats()
    assert s["seg"]["segmented"] == 4 and s["seg"]["samples"] > 4
    assert s["head"]["truncated"] == 4 and s["head"]["samples"] == 4
    assert s["drop"]["oversize_dropped"] == 4 and s["drop"]["samples"] == 0
    assert all("drop" not in b["indexes"] for b in batches)


def test_segment_chunks_keep_labels_across_boundaries():
    inp, out = [7, 8, 9], list(range(30, 50))
    full_src = [BOS] + inp + out
    full_tgt = [IGNORE_INDEX] * 3 + out + [EOS]
    for L in (6, 7, 8):
        samples, event = build_samples(inp, out, BOS, EOS, L, "segment")
        assert event == SEGMENTED
        assert [s for s, _ in samples] == [full_src[a:a + L] for a in range(0, len(full_src), L)]
        assert [t for _, t in samples] == [full_tgt[a:a + L] for a in range(0, len(full_tgt), L)]
        (src, tgt), = build_samples(inp, out, BOS, EOS, L, "head")[0]
        assert (src, tgt) == (full_src[:L], full_tgt[:L])


def test_repeating_dataset_with_no_usable_line_fails_clearly(tmp_path, tokenizer):
    rng = random.Random(0)
    cfg = make_mixture(tmp_path, {"q": ([{"input": text(rng, 40), "output": "x"} for _ in range(5)], {})})
    with pytest.raises(ValueError, match=r"task 'q': .* lines in a row dropped \(input_too_long, max_length 16\)"):
        next(iter(build_train_loader(cfg, tokenizer, batch_size=1, max_length=16)))


@pytest.mark.parametrize("rule", ["segment", "head"])
def test_loader_tokens_match_the_tokenizer_record_by_record(tmp_path, tokenizer, rule):
    """Every sample of every batch holds exactly build_samples(encode(input), encode(output)) of its line: the
    loader's array pieces (int32 ids, BOS, padding) give the same tokens and labels as the list reference."""
    rng = random.Random(3)
    records = short_records("i", 25, 4, instr=True) + [
        {"input": text(rng, 3), "output": text(rng, rng.randint(20, 40))} for _ in range(10)]
    cfg = make_mixture(tmp_path, {"t": (records, {"allow_repeat": False, "oversize_rule": rule})})
    L = 24
    expected = {}
    for line, rec in enumerate(records):
        samples, _ = build_samples(tokenizer.encode(rec["input"]), tokenizer.encode(rec["output"]),
                                   tokenizer.bos_id, tokenizer.eos_id, L, rule)
        expected[line] = samples
    seen = 0
    for b in build_train_loader(cfg, tokenizer, batch_size=2, max_length=L):
        cu, tid = b["cu_seqlens"].tolist(), b["task_ids"].flatten()
        flat_in, flat_tgt = b["inputs"].flatten().tolist(), b["targets"].flatten().tolist()
        got = [(flat_in[s:e], flat_tgt[s:e]) for s, e in zip(cu[:-1], cu[1:]) if tid[s] >= 0]
        want = [sample for line in b["indexes"]["t"] for sample in expected[line]]
        if rule == "segment":  # a segmented line can continue into the next batch: compare the chunks present
            want = [w for w in want if w in got]
        assert got == want
        seen += len(got)
    assert seen == sum(len(s) for s in expected.values())
