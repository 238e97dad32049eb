"""convert_json2index / convert_txt2jsonl: round trip, statistics, bad lines, --strict, output safety, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fm.data.convert import BUCKETS, Options, StrictError, convert, main
from fm.data.indexed import IndexedDataset

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _line(rec) -> bytes:
    return json.dumps(rec, ensure_ascii=False).encode() + b"\n"


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "中文", "数据", "tab\tx", 'quote"q', "é", "🙂"]
    recs = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 40))))
        rec = {"input": "" if i % 3 else f"question {i}", "output": text}
        if i % 7 == 0:
            rec["source"] = {"name": "x" * 80, "tags": [1, 2, 3]}
        recs.append(rec)
    return recs


def _write(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def _upstream_estimate(line: bytes, language: str) -> float:
    text = line.decode()  # upstream: on the raw line, newline included
    return 0.7 * len(text) if language == "zh" else 1.5 * len(text.split(" "))


def _run(args) -> int:
    return main([str(a) for a in args] + ["--no-progress", "--no-fsync"])


@pytest.fixture
def corpus(tmp_path):
    """Two files in a tree (sorted order: a.jsonl, sub/b.jsonl) plus files that must be ignored."""
    lines_a = [_line(r) for r in _records(50, 1)]
    lines_b = [_line(r) for r in _records(30, 2)]
    _write(tmp_path / "in" / "a.jsonl", lines_a)
    _write(tmp_path / "in" / "sub" / "b.jsonl", lines_b)
    _write(tmp_path / "in" / "notes.txt", [b"not jsonl\n"])
    return tmp_path / "in", lines_a + lines_b


@pytest.mark.parametrize("language", ["zh", "en"])
def test_round_trip_and_meta(tmp_path, corpus, language):
    src, lines = corpus
    out = tmp_path / "out"
    assert _run(["--path", src, "--language", language, "--output", out]) == 0
    assert sorted(os.listdir(out)) == ["data.jsonl", "index", "index.h5", "meta.json"]
    assert (out / "data.jsonl").read_bytes() == b"".join(lines)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])])
    text = [int(x) for x in (out / "index").read_text().split()]
    assert text == offsets.tolist()
    with h5py.File(out / "index.h5") as f:
        dset = f["index"]
        assert dset.dtype == np.int64 and dset.chunks is None and dset.id.get_offset() is not None
        assert dset[:].tolist() == text

    ds = IndexedDataset(str(out))
    assert len(ds) == len(lines) and ds.index_source == "h5-mmap" and not ds.upstream_format
    assert [ds[i] for i in range(len(ds))] == [x[:-1] for x in lines]
    assert [ds.record(i) for i in range(len(ds))] == [json.loads(x) for x in lines]

    meta = json.loads((out / "meta.json").read_text())
    est = [_upstream_estimate(x, language) for x in lines]
    assert meta["language"] == language
    assert meta["nlines"] == len(lines)
    assert meta["nbytes"] == sum(map(len, lines)) == os.path.getsize(out / "data.jsonl")
    assert meta["avg_token_per_line"] == pytest.approx(sum(est) / len(lines), rel=1e-12)
    assert list(meta["length_distribute"]) == list(BUCKETS)
    assert meta["length_distribute"]["less_4k"] == len(lines)
    assert meta["hdfs_path"] == "index" and meta["index_name"] == "index"
    first = json.loads(lines[0])
    assert meta["data_sample"]["output"] == (first["output"][:50] + "..." if len(first["output"]) > 50
                                             else first["output"])
    assert meta["data_sample"]["source"] == {"name": "x" * 50 + "...", "tags": [1]}  # upstream cut rules
    assert meta["format_version"] == 2 and meta["json_keys"] == ["input", "output"]
    assert meta["token_count_method"] == "estimate"
    assert meta["skipped"] == {"total": 0, "by_reason": {}, "first": []}
    assert meta["source_files"] == 2


def test_length_buckets(tmp_path):
    # en estimate 1.5 x words: 2700 words → 4050 tokens (4k-8k); 11000 words → 16500 (16k-32k).
    lines = [_line({"output": " ".join(["w"] * n)}) for n in (10, 2700, 2700, 11000)]
    _write(tmp_path / "x.jsonl", lines)
    assert _run(["-p", tmp_path / "x.jsonl", "-l", "en", "-o", tmp_path / "out"]) == 0
    dist = json.loads((tmp_path / "out" / "meta.json").read_text())["length_distribute"]
    assert dist == {"less_4k": 1, "4k-8k": 2, "8k-16k": 0, "16k-32k": 1, "32k-64k": 0, "64k-128k": 0,
                    "128k-256k": 0, "more_256k": 0}


def test_chunking_does_not_change_output(tmp_path, corpus):
    """Tiny chunks (lines longer than a chunk, many chunk edges) give the same bytes as the default."""
    src, _ = corpus
    convert(str(src), str(tmp_path / "big"), Options(language="zh", progress=False, fsync=False))
    convert(str(src), str(tmp_path / "tiny"), Options(language="zh", chunk_size=100, progress=False, fsync=False))
    for name in ("data.jsonl", "index", "index.h5", "meta.json"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "tiny" / name).read_bytes(), name


BAD = [
    (b"\n", "empty_line"),
    (b"   \r\n", "empty_line"),
    (b'{"output": "nul \x00 byte"}\n', "nul_byte"),
    (b'{"output": "bad \xff utf8"}\n', "invalid_utf8"),
    (b'{"output": "ok", "other": "\xc3"}\n', "invalid_utf8"),
    (b'{"output": "truncated\n', "invalid_json"),
    (b"plain text\n", "invalid_json"),
    (b'{"output": "a"} {"output": "b"}\n', "invalid_json"),
    (b'["output", "x"]\n', "not_object"),
    (b'"just a string"\n', "not_object"),
    (b'{"input": "only input"}\n', "missing_output"),
    (b'{"output": 5}\n', "output_not_string"),
    (b'{"output": null}\n', "output_not_string"),
    (b'{"output": "x", "input": ["list"]}\n', "input_not_string"),
]


def _mixed_lines():
    """Good lines with every kind of bad line between them (and a good \\r\\n line)."""
    lines, kinds = [], []
    for i, (bad, reason) in enumerate(BAD):
        lines.append(_line({"input": "", "output": f"good {i}"}))
        kinds.append(None)
        lines.append(bad)
        kinds.append(reason)
    lines.append(b'{"output": "crlf line"}\r\n')
    kinds.append(None)
    return lines, kinds


def test_bad_lines_skipped_counted_reported(tmp_path, capsys):
    lines, kinds = _mixed_lines()
    f1 = _write(tmp_path / "in" / "1.jsonl", lines)
    _write(tmp_path / "in" / "2.jsonl", [_line({"output": "second file"}), b"oops\n"])
    assert _run(["-p", tmp_path / "in", "-l", "en", "-o", tmp_path / "out"]) == 0
    good = [x for x, k in zip(lines, kinds) if k is None] + [_line({"output": "second file"})]
    assert (tmp_path / "out" / "data.jsonl").read_bytes() == b"".join(good)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    want = {}
    for k in [*kinds, "invalid_json"]:
        if k:
            want[k] = want.get(k, 0) + 1
    assert meta["skipped"]["by_reason"] == want
    assert meta["skipped"]["total"] == len(BAD) + 1
    first = meta["skipped"]["first"]
    expected = [{"file": str(f1), "line": i + 1, "reason": k} for i, k in enumerate(kinds) if k]
    expected.append({"file": str(tmp_path / "in" / "2.jsonl"), "line": 2, "reason": "invalid_json"})
    assert first == expected[:20]
    err = capsys.readouterr().err
    assert f"skipped {len(BAD) + 1} line(s)" in err
    assert f"{f1}:6: nul_byte" in err
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.record(len(ds) - 2) == {"output": "crlf line"}


def test_first_20_reported_and_all_counted(tmp_path):
    lines = [b"bad\n"] * 25 + [_line({"output": "x"})]
    _write(tmp_path / "x.jsonl", lines)
    assert _run(["-p", tmp_path / "x.jsonl", "-l", "zh", "-o", tmp_path / "out"]) == 0
    skipped = json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"]
    assert skipped["total"] == 25 and skipped["by_reason"] == {"invalid_json": 25}
    assert [e["line"] for e in skipped["first"]] == list(range(1, 21))


@pytest.mark.parametrize("bad,reason", [b for b in BAD if b[1] != "empty_line"])
def test_strict_fails_on_first_bad_line(tmp_path, capsys, bad, reason):
    lines = [_line({"output": "a"}), b"\n", _line({"output": "b"}), bad, b"also bad\n"]
    f = _write(tmp_path / "x.jsonl", lines)
    assert _run(["-p", f, "-l", "zh", "-o", tmp_path / "out", "--strict"]) == 2
    assert f"{f}:4: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p != "x.jsonl"] == []  # temp dir removed


def test_strict_accepts_blank_lines(tmp_path):
    f = _write(tmp_path / "x.jsonl", [_line({"output": "a"}), b"\n", _line({"output": "b"})])
    assert _run(["-p", f, "-l", "zh", "-o", tmp_path / "out", "--strict"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["nlines"] == 2 and meta["skipped"]["by_reason"] == {"empty_line": 1}


def test_last_line_without_newline(tmp_path):
    _write(tmp_path / "in" / "a.jsonl", [b'{"output": "a"}\n', b'{"output": "no newline"}'])
    _write(tmp_path / "in" / "b.jsonl", [b'{"output": "b"}'])
    assert _run(["-p", tmp_path / "in", "-l", "en", "-o", tmp_path / "out"]) == 0
    assert (tmp_path / "out" / "data.jsonl").read_bytes() == \
        b'{"output": "a"}\n{"output": "no newline"}\n{"output": "b"}\n'


def test_empty_input_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _run(["-p", tmp_path / "empty", "-l", "zh", "-o", tmp_path / "out"]) == 1
    assert "no *.jsonl files" in capsys.readouterr().err
    _write(tmp_path / "bad" / "x.jsonl", [b"nope\n", b"\n"])
    assert _run(["-p", tmp_path / "bad", "-l", "zh", "-o", tmp_path / "out"]) == 1
    assert "no valid line" in capsys.readouterr().err
    _write(tmp_path / "zero" / "x.jsonl", [])
    assert _run(["-p", tmp_path / "zero", "-l", "zh", "-o", tmp_path / "out"]) == 1
    assert _run(["-p", tmp_path / "missing", "-l", "zh", "-o", tmp_path / "out"]) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_refuses_overlapping_input_and_output(tmp_path, capsys):
    src = tmp_path / "data"
    _write(src / "x.jsonl", [_line({"output": "a"})])
    assert _run(["-p", src, "-l", "zh", "-o", src]) == 1
    assert _run(["-p", src, "-l", "zh", "-o", src / "index_out"]) == 1  # would be re-read next time
    assert "inside --path" in capsys.readouterr().err
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path]) == 1  # input inside output
    assert _run(["-p", src / "x.jsonl", "-l", "zh", "-o", src]) == 1  # input file inside output
    assert "inside --output" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == ["x.jsonl"]
    assert _run(["-p", src / "x.jsonl", "-l", "zh", "-o", tmp_path / "out"]) == 0


def test_index_outputs_inside_input_tree_are_not_read(tmp_path):
    src = tmp_path / "data"
    _write(src / "x.jsonl", [_line({"output": "a"})])
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 0
    os.rename(tmp_path / "out", src / "old_index")  # e.g. an upstream output stored next to its input
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out2"]) == 0
    assert json.loads((tmp_path / "out2" / "meta.json").read_text())["nlines"] == 1


def test_overwrite_semantics(tmp_path, capsys):
    src = _write(tmp_path / "x.jsonl", [_line({"output": "new"})])
    other = tmp_path / "other"
    _write(other / "precious.txt", [b"keep me\n"])
    assert _run(["-p", src, "-l", "zh", "-o", other]) == 1
    assert _run(["-p", src, "-l", "zh", "-o", other, "--overwrite"]) == 1  # not an index output
    assert "does not hold an index output" in capsys.readouterr().err
    assert (other / "precious.txt").read_bytes() == b"keep me\n"

    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert _run(["-p", src, "-l", "zh", "-o", out]) == 0
    src2 = _write(tmp_path / "y.jsonl", [_line({"output": "newer"}), _line({"output": "2"})])
    assert _run(["-p", src2, "-l", "zh", "-o", out]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "meta.json").read_text())["nlines"] == 1
    assert _run(["-p", src2, "-l", "zh", "-o", out, "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["nlines"] == 2
    assert sorted(os.listdir(tmp_path)) == ["other", "out", "x.jsonl", "y.jsonl"]  # nothing left behind

    (tmp_path / "afile").write_text("x")
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "afile"]) == 1


def test_hdfs_name(tmp_path):
    src = _write(tmp_path / "x.jsonl", [_line({"output": "a"}), _line({"output": "b"})])
    assert _run(["-p", src, "-l", "en", "-o", tmp_path / "out", "--hdfs_name", "myindex"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["data.jsonl", "meta.json", "myindex", "myindex.h5"]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.index_name == "myindex" and ds.record(0) == {"output": "a"}
    assert _run(["-p", src, "-l", "en", "-o", tmp_path / "out2", "--hdfs_name", "a/b"]) == 1


def test_upstream_style_index_of_our_data(tmp_path, corpus):
    """Our data.jsonl with an upstream index (n end offsets, text only): line 0 is read."""
    src, lines = corpus
    out = tmp_path / "out"
    assert _run(["-p", src, "-l", "zh", "-o", out]) == 0
    offsets = (out / "index").read_text().split()
    (out / "index").write_text("\n".join(offsets[1:]) + "\n")
    os.unlink(out / "index.h5")
    ds = IndexedDataset(str(out))
    assert ds.upstream_format and len(ds) == len(lines) and ds[0] == lines[0][:-1]


@pytest.mark.parametrize("workers,piece_size", [(2, 0), (3, 0), (2, 1000), (3, 700)])
def test_workers_byte_identical(tmp_path, workers, piece_size):
    lines, _ = _mixed_lines()
    good = [_line(r) for r in _records(200, 3)]
    _write(tmp_path / "in" / "a.jsonl", good[:90] + lines + good[90:120])
    _write(tmp_path / "in" / "b" / "c.jsonl", lines[:7] + good[120:])
    _write(tmp_path / "in" / "b" / "d.jsonl", [b'{"output": "tail"}'])
    outs = {}
    for w in (1, workers):
        out = tmp_path / f"out{w}"
        convert(str(tmp_path / "in"), str(out), Options(language="en", workers=w, chunk_size=512, piece_size=piece_size,
                                                        progress=False, fsync=False))
        outs[w] = out
    for name in ("data.jsonl", "index", "index.h5", "meta.json"):
        assert (outs[1] / name).read_bytes() == (outs[workers] / name).read_bytes(), name


@pytest.mark.parametrize("piece_size", [0, 1500])
@pytest.mark.parametrize("bad_at", ["nowhere", "first", "last", "both"])
def test_workers_index_matches_line_starts(tmp_path, bad_at, piece_size):
    """Parts format their own text index lines; a part that moved (an earlier one dropped lines) is re-formatted.
    Either way every offset is the start of a line of data.jsonl, for both index files."""
    good = [_line(r) for r in _records(300, 5)]
    bad = [b"not json\n", b"[1]\n"]
    lines = (bad if bad_at in ("first", "both") else []) + good + (bad if bad_at in ("last", "both") else [])
    _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    convert(str(tmp_path / "in.jsonl"), str(out), Options(language="en", workers=3, chunk_size=512,
                                                           piece_size=piece_size, progress=False, fsync=False))
    data = (out / "data.jsonl").read_bytes()
    expected = [0] + [i + 1 for i, b in enumerate(data) if b == 10]
    assert [int(x) for x in (out / "index").read_text().split("\n")[:-1]] == expected
    with h5py.File(out / "index.h5") as f:
        assert f["index"][:].tolist() == expected
    assert data == b"".join(good)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


@pytest.mark.parametrize("failure", ["raises", "dies"])
def test_worker_failure_is_reported_and_cleaned_up(tmp_path, monkeypatch, failure):
    """An error in a worker process reaches the caller; a worker that dies is detected instead of waited for."""
    import fm.data._convert_worker as worker

    real = worker.convert_piece
    me = os.getpid()
    started = tmp_path / "worker-started"

    def failing(*args):
        if os.getpid() == me:  # this process waits until the forked worker has taken the other piece
            _wait_for(started)
            return real(*args)
        started.touch()
        if failure == "dies":
            os._exit(3)
        raise worker.ConvertError("boom in a worker")

    monkeypatch.setattr(worker, "convert_piece", failing)
    _write(tmp_path / "in.jsonl", [_line(r) for r in _records(200, 6)])
    with pytest.raises(worker.ConvertError, match="boom in a worker" if failure == "raises" else "exit code 3"):
        convert(str(tmp_path / "in.jsonl"), str(tmp_path / "out"),
                Options(language="en", workers=2, chunk_size=512, progress=False, fsync=False))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "worker-started"]


def _wait_for(path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_idle_workers_take_the_remaining_pieces(tmp_path, monkeypatch):
    """Pieces go to whichever worker is free: a worker slowed down converts fewer of them, the output is the same."""
    import fm.data._convert_worker as worker

    real = worker.convert_piece
    me = os.getpid()
    log = tmp_path / "who"

    def logged(*args):
        if os.getpid() == me:  # this process is slow (a busy core); the worker has started
            _wait_for(log)
            time.sleep(0.2)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args)

    good = [_line(r) for r in _records(400, 8)]
    src = _write(tmp_path / "in.jsonl", good)
    convert(str(src), str(tmp_path / "one"), Options(language="en", progress=False, fsync=False))
    monkeypatch.setattr(worker, "convert_piece", logged)
    opts = Options(language="en", workers=2, chunk_size=512, piece_size=len(b"".join(good)) // 12 + 1,
                   progress=False, fsync=False)
    convert(str(src), str(tmp_path / "two"), opts)
    who = log.read_text().split()
    assert len(who) == 12
    assert who.count(str(me)) < len(who) // 2, who
    for name in ("data.jsonl", "index", "index.h5", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_more_workers_than_lines_leaves_no_side_files(tmp_path):
    """Workers that find every piece taken (or an empty one) leave nothing behind in the output."""
    src = _write(tmp_path / "in.jsonl", [b'{"output": "only line"}\n'])
    convert(str(src), str(tmp_path / "out"), Options(language="en", workers=4, progress=False, fsync=False))
    assert sorted(os.listdir(tmp_path / "out")) == ["data.jsonl", "index", "index.h5", "meta.json"]
    assert IndexedDataset(str(tmp_path / "out")).record(0) == {"output": "only line"}


def test_strict_with_many_pieces_names_the_first_bad_line(tmp_path, capsys):
    good = [_line(r) for r in _records(400, 9)]
    lines = good[:50] + [b"[1]\n"] + good[50:300] + [b"bad\n"] + good[300:]
    src = _write(tmp_path / "in.jsonl", lines)
    for workers in (1, 2, 3):
        opts = Options(language="en", workers=workers, chunk_size=512, piece_size=2000, strict=True,
                       progress=False, fsync=False)
        with pytest.raises(StrictError, match=f"{src}:51: not_object"):
            convert(str(src), str(tmp_path / f"out{workers}"), opts)
        assert not (tmp_path / f"out{workers}").exists()
    assert Options(language="en", workers=2, piece_size=2000).piece_count(len(b"".join(lines))) > 20


def test_workers_cli_and_strict(tmp_path, capsys):
    good = [_line(r) for r in _records(300, 4)]
    f = _write(tmp_path / "x.jsonl", good[:250] + [b"bad\n"] + good[250:] + [b"[1]\n"])
    assert _run(["-p", f, "-l", "zh", "-o", tmp_path / "o1"]) == 0
    assert _run(["-p", f, "-l", "zh", "-o", tmp_path / "o2", "--workers", "2"]) == 0
    assert (tmp_path / "o1" / "meta.json").read_bytes() == (tmp_path / "o2" / "meta.json").read_bytes()
    assert _run(["-p", f, "-l", "zh", "-o", tmp_path / "o3", "-j", "2", "--strict"]) == 2
    assert f"{f}:251: invalid_json" in capsys.readouterr().err


def test_tokenizer_statistics(tmp_path, tokenizer, tokenizer_path):
    recs = _records(60, 5)
    recs.append({"input": "<用户>hi", "output": "x" * 9000})  # 4500 tokens: the 4k-8k bucket
    src = _write(tmp_path / "x.jsonl", [_line(r) for r in recs])
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "--tokenizer", tokenizer_path]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    counts = [len(tokenizer.encode(r["input"])) + len(tokenizer.encode(r["output"])) for r in recs]
    assert meta["token_count_method"] == f"tokenizer:{os.path.abspath(tokenizer_path)}"
    assert meta["avg_token_per_line"] == pytest.approx(sum(counts) / len(counts), rel=1e-12)
    edges = [4000, 8000, 16000, 32000, 64000, 128000, 256000]
    want = np.bincount(np.searchsorted(edges, counts, side="right"), minlength=8).tolist()
    assert list(meta["length_distribute"].values()) == want


def test_sigkill_leaves_no_complete_output(tmp_path, tokenizer_path):
    """Kill the converter while it writes: no output directory appears; a rerun succeeds."""
    rec = _line({"input": "", "output": "some words to tokenize, again and again. " * 40})
    src = _write(tmp_path / "big.jsonl", [rec] * 6000)  # ~10 MB; with --tokenizer this takes seconds
    out = tmp_path / "out"
    cmd = [PY, "-m", "fm.data.convert", "-p", str(src), "-l", "en", "-o", str(out), "--tokenizer", tokenizer_path,
           "--chunk-mb", "0.05", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    started = False
    while time.time() < deadline and proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps and (tmps[0] / "data.jsonl").exists() and (tmps[0] / "data.jsonl").stat().st_size > 0:
            started = True
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert started, "the converter finished before it could be killed; make the input bigger"
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert leftovers and not (leftovers[0] / "meta.json").exists()
    assert _run(["-p", src, "-l", "en", "-o", out]) == 0
    assert json.loads((out / "meta.json").read_text())["nlines"] == 6000


def test_cli_entry_points_help(repo_root):
    for cmd in ([PY, "-m", "fm.data.convert", "--help"], [PY, "quick_start/convert_json2index.py", "--help"]):
        res = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0
        for flag in ("--path", "--language", "--output", "--hdfs_name", "--tokenizer", "--workers", "--strict",
                     "--overwrite"):
            assert flag in res.stdout


def _txt2jsonl(text: bytes, *args) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "quick_start" / "convert_txt2jsonl.py"), *args], input=text,
                          capture_output=True, timeout=60)


def test_txt2jsonl_lines():
    res = _txt2jsonl("第一行\n\n  \nsecond \"q\"\r\nlast".encode())
    assert res.returncode == 0
    assert res.stdout.decode().splitlines() == [
        '{"input": "", "output": "第一行"}', '{"input": "", "output": "second \\"q\\""}',
        '{"input": "", "output": "last"}']


def test_txt2jsonl_blank_separated_documents():
    res = _txt2jsonl(b"p1 a\np1 b\n\n\np2\n\n", "--doc-sep", "blank")
    assert [json.loads(x) for x in res.stdout.splitlines()] == [
        {"input": "", "output": "p1 a\np1 b"}, {"input": "", "output": "p2"}]


def test_txt2jsonl_invalid_utf8():
    res = _txt2jsonl(b"ok\nbad \xff\n")
    assert res.returncode == 1 and b"line 2" in res.stderr
    res = _txt2jsonl(b"ok\nbad \xff\n", "--errors", "replace")
    assert res.returncode == 0 and json.loads(res.stdout.splitlines()[1])["output"] == "bad \ufffd"


def test_txt2jsonl_files_and_output(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\n")
    (tmp_path / "b.txt").write_bytes(b"two\nbad \xff\n")
    out = tmp_path / "o.jsonl"
    res = _txt2jsonl(b"", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out))
    assert res.returncode == 1 and f"{tmp_path / 'b.txt'} line 2: invalid UTF-8".encode() in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl*"))  # nothing half written
    res = _txt2jsonl(b"", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "-o", str(out), "--errors", "replace")
    assert res.returncode == 0 and [json.loads(x)["output"] for x in out.read_text().splitlines()] == [
        "one", "two", "bad \ufffd"]
    from fm.io import umask

    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()
    for extra in ((), ("-o", str(out))):
        res = _txt2jsonl(b"", str(tmp_path / "missing.txt"), *extra)
        assert res.returncode == 1 and f"error: {tmp_path / 'missing.txt'}: no such file".encode() in res.stderr


def test_txt_to_index_pipeline(tmp_path):
    res = _txt2jsonl(b"one\ntwo\n")
    (tmp_path / "t.jsonl").write_bytes(res.stdout)
    assert _run(["-p", tmp_path / "t.jsonl", "-l", "en", "-o", tmp_path / "out"]) == 0
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds.record(i)["output"] for i in range(len(ds))] == ["one", "two"]


def test_symlink_loop_in_input_tree(tmp_path):
    src = tmp_path / "data"
    _write(src / "sub" / "x.jsonl", [_line({"output": "a"})])
    os.symlink(src, src / "sub" / "loop")
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["nlines"] == 1


def test_count_per_line_paths_agree():
    """The count accumulator is as narrow as the longest line allows (8, 16, 32 bits): counts stay exact at
    every width's edge, with every byte a match (the worst case)."""
    from fm.data._convert_worker import _count_per_line

    rng = np.random.default_rng(0)
    cases = [rng.integers(1, 10, size=50), rng.integers(1, 6000, size=50),  # random lines
             np.array([1, 254]), np.array([255, 3]), np.array([254, 255, 256]),  # 8-bit edge (+1 for newline)
             np.array([65534, 7]), np.array([65535]), np.array([70000, 2])]  # 16-bit edge
    for i, lengths in enumerate(cases):
        ends = np.cumsum(lengths + 1) - 1
        starts = ends - lengths
        mask = rng.random(int(ends[-1]) + 1) < 0.3 if i < 2 else np.ones(int(ends[-1]) + 1, dtype=bool)
        mask[ends] = False  # newline positions never match
        want = [int(mask[s:e].sum()) for s, e in zip(starts, ends)]
        assert _count_per_line(mask, starts, ends).tolist() == want, lengths
