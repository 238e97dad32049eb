"""The corpora people already have: --json-keys / json_keys, Megatron data with and without EOD (built by
megatron-core's own builder), token ids against the vocabulary, format versions, and misplaced formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from fm.data import megatron as megatron_lib
from fm.data.convert import main as convert_main
from fm.data.indexed import IndexedDataset
from fm.data.loader import build_train_loader
from fm.data.mixture import MixtureConfigError, load_mixture
from fm.data.sources import REFILL_MAX, REFILL_MIN_BYTES, refill_lines
from tests.helpers import text, write_index

IGNORE = -100


def _convert(src, out, *extra) -> int:
    return convert_main(["--path", str(src), "--language", "en", "--output", str(out), "--no-progress",
                         "--no-fsync", *map(str, extra)])


def _mix(tmp_path, entries, name="mix.json"):
    cfg = tmp_path / name
    cfg.write_text(json.dumps(entries))
    return str(cfg)


def _samples(batches):
    """(task, line) → (input ids, target ids) of every sample, from the packed batches."""
    out = {}
    for b in batches:
        cu = b["cu_seqlens"].tolist()
        flat_in, flat_tgt = b["inputs"].flatten().tolist(), b["targets"].flatten().tolist()
        task_ids = b["task_ids"].flatten().tolist()
        lines = {t: iter(v) for t, v in b["indexes"].items()}
        for s, e in zip(cu[:-1], cu[1:]):
            if task_ids[s] < 0:
                continue
            task = b["task_names"][task_ids[s]]
            out[(task, next(lines[task]))] = (flat_in[s:e], flat_tgt[s:e])
    return out


# --------------------------------------------------------------------------------------------- json keys

def test_text_key_corpus_converts_and_trains(tmp_path, tokenizer):
    rng = random.Random(0)
    docs = [f"doc{i} " + text(rng, rng.randint(2, 8)) for i in range(20)]
    src = tmp_path / "hf.jsonl"
    src.write_text("".join(json.dumps({"text": d, "meta": {"id": i}}) + "\n" for i, d in enumerate(docs)))
    # Without --json-keys every line is refused, and the error says what to do.
    assert _convert(src, tmp_path / "refused") == 1
    assert not (tmp_path / "refused").exists()
    assert _convert(src, tmp_path / "idx", "--json-keys", "text") == 0
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["json_keys"] == ["text"] and meta["nlines"] == 20 and meta["skipped"]["total"] == 0
    cfg = _mix(tmp_path, [{"task_name": "web", "abs_weight": 1, "path": "idx", "allow_repeat": False}])
    seen = _samples(build_train_loader(cfg, tokenizer, batch_size=2, max_length=64))
    assert sorted(line for _, line in seen) == list(range(20))
    for (_, line), (src_ids, tgt) in seen.items():
        want = tokenizer.encode(docs[line])
        assert src_ids == [tokenizer.bos_id] + want and tgt == want + [tokenizer.eos_id]  # all trained on


def test_two_json_keys_mask_the_prompt(tmp_path, tokenizer):
    recs = [{"prompt": f"question {i}", "response": f"answer {i} " * 2} for i in range(6)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert _convert(src, tmp_path / "idx", "--json-keys", "prompt", "response") == 0
    cfg = _mix(tmp_path, [{"task_name": "sft", "abs_weight": 1, "path": "idx", "allow_repeat": False}])
    for (_, line), (src_ids, tgt) in _samples(build_train_loader(cfg, tokenizer, batch_size=2, max_length=64)).items():
        prompt = tokenizer.encode(recs[line]["prompt"])
        answer = tokenizer.encode(recs[line]["response"])
        assert src_ids == [tokenizer.bos_id] + prompt + answer
        assert tgt == [IGNORE] * len(prompt) + answer + [tokenizer.eos_id]


def test_bad_json_keys_option(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert _convert(tmp_path / "a.jsonl", tmp_path / "o", "--json-keys", "text", "text") == 1
    assert "--json-keys" in capsys.readouterr().err


def test_json_keys_in_the_mixture_for_an_index_without_them(tmp_path, tokenizer):
    """An upstream-style index of {"text"} records: the mixture entry names the key; without it the config
    check names the key it found."""
    write_index(tmp_path / "web", [{"text": f"line {i} " + "word " * i} for i in range(5)])
    bad = _mix(tmp_path, [{"task_name": "web", "abs_weight": 1, "path": "web"}], "bad.json")
    with pytest.raises(MixtureConfigError, match=r"no 'output' key .*\"json_keys\": \[\"text\"\]"):
        load_mixture(bad)
    good = _mix(tmp_path, [{"task_name": "web", "abs_weight": 1, "path": "web", "json_keys": ["text"],
                            "allow_repeat": False}])
    seen = _samples(build_train_loader(good, tokenizer, batch_size=2, max_length=64))
    assert seen[("web", 3)][0] == [tokenizer.bos_id] + tokenizer.encode("line 3 " + "word " * 3)


@pytest.mark.parametrize("entry, message", [
    ({"json_keys": []}, "json_keys: give one key"),
    ({"json_keys": ["a", "a"]}, "json_keys: give one key"),
    ({"json_keys": ["text"], "transforms": "t.py"}, "a transform reads the record's keys itself"),
])
def test_json_keys_entry_problems(tmp_path, entry, message):
    write_index(tmp_path / "d", [{"text": "x"}])
    (tmp_path / "t.py").write_text("def transform(data, num_sample, r):\n    return {'input': '', 'output': 'x'}\n")
    cfg = _mix(tmp_path, [{"task_name": "d", "abs_weight": 1, "path": "d", **entry}])
    with pytest.raises(MixtureConfigError, match=message):
        load_mixture(cfg)


# --------------------------------------------------------------------------------------------- megatron

def _megatron(prefix, docs, dtype=np.int32):
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


def test_megatron_documents_end_in_exactly_one_eos(tmp_path, tokenizer):
    """The same documents stored as megatron's preprocess_data writes them without and with --append-eod (and
    with a leading BOS) give the same samples: one BOS, the text, one EOS label."""
    rng = np.random.default_rng(0)
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    docs = [rng.integers(10, 7000, size=int(rng.integers(1, 12))).tolist() for _ in range(25)]
    _megatron(tmp_path / "plain" / "c", docs)
    _megatron(tmp_path / "eod" / "c", [d + [eos] for d in docs])
    _megatron(tmp_path / "bos" / "c", [[bos] + d + [eos] for d in docs])
    results = []
    for name in ("plain", "eod", "bos"):
        cfg = _mix(tmp_path, [{"task_name": "m", "abs_weight": 1, "path": f"{name}/c", "format": "megatron",
                               "allow_repeat": False}], f"{name}.json")
        seen = _samples(build_train_loader(cfg, tokenizer, batch_size=2, max_length=16))
        assert sorted(line for _, line in seen) == list(range(25))
        for (_, line), (src, tgt) in seen.items():
            assert src == [bos] + docs[line] and tgt == docs[line] + [eos], name
            assert tgt.count(eos) == 1
        results.append(seen)
    assert results[0] == results[1] == results[2]


def test_megatron_ids_beyond_the_vocabulary_are_refused_on_open(tmp_path, tokenizer):
    _megatron(tmp_path / "m" / "c", [[5, 6, 7], [8, 70000, 9]])
    cfg = _mix(tmp_path, [{"task_name": "m", "abs_weight": 1, "path": "m/c", "format": "megatron"}])
    with pytest.raises(ValueError, match=r"c\.bin \(task 'm'\): largest token id 70000.*\[0, 8000\)"):
        build_train_loader(cfg, tokenizer, batch_size=1, max_length=16, vocab_size=8000)
    # Within the model's (larger) vocabulary the same data is fine.
    build_train_loader(cfg, tokenizer, batch_size=1, max_length=16, vocab_size=80000)


def test_megatron_ids_beyond_the_scan_are_checked_per_document(tmp_path, tokenizer, monkeypatch):
    _megatron(tmp_path / "m" / "c", [[5, 6, 7]] * 4 + [[8, 9000, 9]])
    cfg = _mix(tmp_path, [{"task_name": "m", "abs_weight": 1, "path": "m/c", "format": "megatron",
                           "allow_repeat": False}])
    monkeypatch.setattr(megatron_lib, "SCAN_BYTES", 8)  # a "huge" file: only its first two ids are scanned
    loader = build_train_loader(cfg, tokenizer, batch_size=1, max_length=16, vocab_size=8000)
    with pytest.raises(ValueError, match=r"c\.bin: document 4 holds token id 9000, outside the model's vocabulary"):
        list(loader)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tokenizer):
    write_index(tmp_path / "d", [{"output": "x"}])
    cfg = _mix(tmp_path, [{"task_name": "d", "abs_weight": 1, "path": "d"}])
    with pytest.raises(ValueError, match=f"has {tokenizer.vocab_size} pieces but the model's vocab_size is 100"):
        build_train_loader(cfg, tokenizer, batch_size=1, max_length=16, vocab_size=100)


def test_formats_listed_wrong_say_which_format_to_set(tmp_path):
    _megatron(tmp_path / "tok" / "c", [[1, 2]])
    write_index(tmp_path / "idx", [{"output": "x"}])
    cfg = _mix(tmp_path, [{"task_name": "a", "abs_weight": 1, "path": "tok/c"},
                          {"task_name": "b", "abs_weight": 1, "path": "tok/c.bin"},
                          {"task_name": "c", "abs_weight": 1, "path": "idx", "format": "megatron"}])
    with pytest.raises(MixtureConfigError) as info:
        load_mixture(cfg)
    problems = info.value.problems
    assert len(problems) == 3
    assert all('add "format": "megatron"' in p for p in problems[:2]) and "path not found" not in str(info.value)
    assert 'remove "format": "megatron"' in problems[2]


# --------------------------------------------------------------------------------------------- versions

def test_unknown_index_format_version_is_refused(tmp_path):
    write_index(tmp_path / "d", [{"output": "x"}])
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match=r"meta\.json: format_version 99 is not supported .*reads versions 1, 2"):
        IndexedDataset(str(tmp_path / "d"))
    cfg = _mix(tmp_path, [{"task_name": "d", "abs_weight": 1, "path": "d"}])
    with pytest.raises(MixtureConfigError, match="format_version 99"):
        load_mixture(cfg)
    for version in (1, 2):  # what fm wrote before and writes now; upstream writes none
        (tmp_path / "d" / "meta.json").write_text(json.dumps({"format_version": version}))
        assert len(IndexedDataset(str(tmp_path / "d"))) == 1


def test_unknown_megatron_index_version_is_refused(tmp_path):
    _megatron(tmp_path / "m" / "c", [[1, 2]])
    idx = tmp_path / "m" / "c.idx"
    raw = bytearray(idx.read_bytes())
    raw[9:17] = (2).to_bytes(8, "little")
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.idx: index format version 2 is not supported"):
        megatron_lib.MegatronDataset(str(tmp_path / "m" / "c"))


# --------------------------------------------------------------------------------------------- cost per dataset

def test_refill_scales_with_weight(tmp_path):
    write_index(tmp_path / "d", [{"output": "word " * 10}] * 5000)
    ds = IndexedDataset(str(tmp_path / "d"))
    heavy, light = refill_lines(ds, 0.5), refill_lines(ds, 0.0005)
    assert heavy == REFILL_MAX and light == REFILL_MIN_BYTES * len(ds) // ds.nbytes < heavy // 4


def test_preflight_refuses_megatron_ids_beyond_the_model(tmp_path):
    """Before torchrun starts: the ids of a megatron dataset against the model config's vocab_size."""
    from fm.train.preflight import preflight
    from tests.helpers import make_launch_run

    cfg = make_launch_run(tmp_path)
    data = json.loads(cfg.read_text())
    _megatron(tmp_path / "tok" / "c", [[5, 6], [7, 8500]])
    Path(data["dataset_config"]).write_text(json.dumps([{"task_name": "m", "abs_weight": 1, "format": "megatron",
                                                         "path": str(tmp_path / "tok" / "c")}]))
    problems = preflight(str(cfg), []).problems
    assert any("c.bin (task 'm'): largest token id 8500" in p and "[0, 8000)" in p for p in problems), problems
