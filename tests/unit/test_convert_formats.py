"""fm convert on compressed jsonl (.jsonl.gz, .jsonl.zst) and Parquet: the same output as the jsonl they hold."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from fm.data.convert import build_parser, main

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")


def _records(n: int, seed: int = 0) -> list[dict]:
    """Rows with the same keys (Parquet has a fixed schema): text, non-ASCII, escapes, a number, a nested struct."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "中文", "数据", "tab\tx", 'quote"q', "back\\slash", "line\nbreak", "🙂", "\x01"]
    return [{"input": "" if i % 3 else f"question {i}",
             "output": " ".join(rng.choice(words, size=int(rng.integers(1, 40)))),
             "id": i, "score": float(i) / 8,
             "source": {"name": f"src{i % 4}", "tags": [i, i + 1]}} for i in range(n)]


def _jsonl(recs: list[dict]) -> bytes:
    """The jsonl a Parquet row is converted to: compact JSON, keys in column order, UTF-8."""
    return msgspec.json.Encoder().encode_lines(recs)


def _write(path: Path, recs: list[dict], fmt: str, row_group_size: int = 64) -> Path:
    path = path.with_name(path.name + "." + fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = _jsonl(recs)
    if fmt == "jsonl":
        path.write_bytes(raw)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(raw, mtime=0))
    elif fmt == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=row_group_size)
    return path


def _run(args) -> int:
    return main([str(a) for a in args] + ["--no-progress", "--no-fsync"])


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file; meta.json without the fields that describe the input files as stored."""
    files = {n: (out / n).read_bytes() for n in sorted(os.listdir(out))}
    meta = json.loads(files["meta.json"])
    meta.pop("source_bytes")
    for e in meta["skipped"]["first"]:
        e.pop("file")
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_same_output_as_jsonl(tmp_path, fmt, workers, read_thread):
    recs = _records(700)
    ref = _write(tmp_path / "ref" / "x", recs, "jsonl")
    src = _write(tmp_path / "src" / "x", recs, fmt)
    assert _run(["-p", ref, "-l", "zh", "-o", tmp_path / "a"]) == 0
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "b", "-j", workers]) == 0
    assert (tmp_path / "b" / "data.jsonl").read_bytes() == _jsonl(recs)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")


@pytest.mark.parametrize("workers", [1, 2])
def test_directory_mixing_formats(tmp_path, workers):
    recs = _records(900, 3)
    parts = [recs[i * 100:(i + 1) * 100] for i in range(9)]
    mixed, plain = tmp_path / "mixed", tmp_path / "plain"
    for i, part in enumerate(parts):  # a.jsonl.gz, b.parquet, ... in sorted order, one format after the other
        _write(mixed / f"{chr(97 + i)}", part, FORMATS[(i + 1) % 4], row_group_size=30)
        _write(plain / f"{chr(97 + i)}", part, "jsonl")
    (mixed / "notes.txt").write_text("not an input\n")
    (mixed / "x.json.gz").write_bytes(gzip.compress(b"not an input\n"))
    assert _run(["-p", plain, "-l", "en", "-o", tmp_path / "a"]) == 0
    assert _run(["-p", mixed, "-l", "en", "-o", tmp_path / "b", "-j", workers]) == 0
    assert (tmp_path / "b" / "data.jsonl").read_bytes() == _jsonl(recs)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["source_files"] == 9


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenized(tmp_path, fmt):
    recs = _records(200, 5)
    src = _write(tmp_path / "in" / "x", recs, fmt)
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "--tokenizer", "demo"]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["nlines"] == 200 and meta["token_count_method"].startswith("tokenizer:")
    ref = _write(tmp_path / "ref" / "x", recs, "jsonl")
    assert _run(["-p", ref, "-l", "zh", "-o", tmp_path / "ref_out", "--tokenizer", "demo"]) == 0
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "ref_out")


def test_parquet_text_column_and_bad_rows(tmp_path, capsys):
    """FineWeb-style: --json-keys text; a null text is a skipped line named by its row (line) number."""
    rows = [{"text": f"doc {i}", "url": f"http://x/{i}", "language_score": 0.5} for i in range(10)]
    rows[4]["text"] = None
    src = tmp_path / "fw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=3)
    assert _run(["-p", src, "-l", "en", "-o", tmp_path / "out", "--json-keys", "text"]) == 0
    lines = (tmp_path / "out" / "data.jsonl").read_bytes().splitlines()
    assert lines[0] == b'{"text":"doc 0","url":"http://x/0","language_score":0.5}' and len(lines) == 9
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["first"] == [{"file": str(src), "line": 5, "reason": "output_not_string"}]
    assert meta["json_keys"] == ["text"]


def _no_output_left(tmp_path: Path, *inputs: str) -> None:
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(inputs)  # the temp dir was removed


@pytest.fixture(params=[True, False], ids=["read-thread", "read-inline"])
def read_thread(request, monkeypatch):
    """Reading compressed and Parquet input in a background thread (one worker on a multi-core machine) or in
    the worker's thread (a worker per core): both give the same errors."""
    from fm.data import _convert_worker

    monkeypatch.setattr(_convert_worker, "read_in_thread", lambda workers: request.param)
    return request.param


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_truncated_archive_is_an_error_naming_the_file(tmp_path, capsys, fmt, read_thread):
    src = _write(tmp_path / "x", _records(3000, 7), fmt)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: truncated {'gzip' if fmt.endswith('gz') else 'zstd'} data" in err
    assert "after line " in err and "download it again" in err
    _no_output_left(tmp_path, src.name)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_corrupt_archive_is_an_error_naming_the_file(tmp_path, capsys, fmt, read_thread):
    src = _write(tmp_path / "x", _records(3000, 7), fmt)
    data = bytearray(src.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    src.write_bytes(bytes(data))
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "-j", "2"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: corrupt" in err
    _no_output_left(tmp_path, src.name)


def test_corrupt_parquet_is_an_error_naming_the_file_and_row_group(tmp_path, capsys, read_thread):
    src = _write(tmp_path / "x", _records(600, 8), "parquet", row_group_size=100)
    md = pq.ParquetFile(src).metadata
    col = md.row_group(3).column(1)  # the "output" column chunk of row group 3
    data = bytearray(src.read_bytes())
    start = col.data_page_offset
    data[start:start + col.total_compressed_size] = os.urandom(col.total_compressed_size)
    src.write_bytes(bytes(data))
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: row group 3: cannot be read" in err
    _no_output_left(tmp_path, src.name)


def test_not_a_parquet_file(tmp_path, capsys):
    src = tmp_path / "x.parquet"
    src.write_bytes(b"PAR1 this is not parquet")
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 1
    assert f"error: {src}: not a readable Parquet file" in capsys.readouterr().err
    _no_output_left(tmp_path, src.name)


def test_missing_parquet_column_is_an_error(tmp_path, capsys):
    src = tmp_path / "fw.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "url": "u"}]), src)
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 1  # default keys: input output
    err = capsys.readouterr().err
    assert f"error: {src}: no column 'output'" in err and "--json-keys text" in err
    _no_output_left(tmp_path, src.name)


def test_non_json_parquet_column_is_an_error(tmp_path, capsys):
    src = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a"], "blob": pa.array([b"\x00\xff"], pa.binary())}), src)
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "--json-keys", "text"]) == 1
    assert f"error: {src}: column 'blob' has type binary, which has no JSON form" in capsys.readouterr().err
    _no_output_left(tmp_path, src.name)


def test_failure_in_one_file_of_a_directory_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "in"
    _write(src / "a", _records(100), "jsonl")
    bad = _write(src / "b", _records(2000), "jsonl.gz")
    bad.write_bytes(bad.read_bytes()[:-100])
    _write(src / "c", _records(100), "parquet")
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "-j", "2"]) == 1
    assert f"error: {bad}: truncated gzip data" in capsys.readouterr().err
    _no_output_left(tmp_path, "in")


def test_help_mentions_the_formats():
    text = build_parser().format_help()
    for word in (".jsonl.gz", ".jsonl.zst", ".parquet", "Parquet"):
        assert word in text


# ------------------------------------------------------------------ the fast readers (isal, thread, vectorised JSON)

_TRICKY = ['a"b', "back\\slash", "nl\nx", "tab\t", "".join(chr(i) for i in range(32)), "\u2028\u2029", "🙂",
           "中文", "", None, '\\"\\n', "\x7f", "\r\n\b\f", "é" * 50]


def test_vectorised_json_is_the_python_path():
    """batch_jsonl (pyarrow.compute for strings without escapes, integers, booleans, nulls; msgspec for the rest)
    writes the bytes msgspec writes."""
    import datetime

    from fm.data import _convert_sources

    enc = msgspec.json.Encoder()
    recs = [{"text": t, "id": i - 3, "ok": [True, False, None][i % 3], "f": i / 3 if i != 5 else float("nan"),
             "none": None, "nest": {"a": [str(i), t]}, "day": datetime.date(2020, 1, i + 1), 'k"ey\n中': t}
            for i, t in enumerate(_TRICKY)]
    batch = pa.RecordBatch.from_pylist(recs)
    text = batch.column(0)
    plain = pa.array(["plain words", "", None, "中文 🙂 é", "\u2028\u2029\x7f", "a/b <c> & 'd'"] * 2)
    n = len(plain)
    vectorised = [  # no value needs an escape: the pyarrow.compute form
        pa.RecordBatch.from_arrays(
            [plain, plain.cast(pa.large_string()), plain.dictionary_encode(), plain.cast(pa.string_view()),
             pa.array([None] * n, pa.int8()), pa.array(range(n), pa.uint64()), pa.array(range(-6, n - 6)),
             pa.array([True, None, False] * (n // 3)), pa.nulls(n)],
            ["t", 'k"ey\n中', "dict", "view", "null_ints", "u64", "i64", "bool", "null"]),
        pa.RecordBatch.from_pylist([{"t": "x"}, {"t": None}, {"t": ""}]),
    ]
    python = [  # a value needs an escape, or a column has no vectorised form: msgspec
        batch, batch.slice(3, 6), batch.slice(0, 0),
        pa.RecordBatch.from_arrays([text.cast(pa.large_string()), text.dictionary_encode()], ["large", "dict"]),
        pa.RecordBatch.from_pylist([{"t": f"{ch}"} for ch in ('"', "\\", "\n", "\x00", "\x1f")]),
        pa.RecordBatch.from_pylist([{"t": "x", "f": 1.5}]),
    ]
    for b in vectorised:
        for part in (b, b.slice(1), b.slice(2, 1)):
            assert all(_convert_sources._json_values(c) is not None for c in part.columns)
            assert bytes(_convert_sources.batch_jsonl(part, enc)) == enc.encode_lines(part.to_pylist())
    for b in python:
        for part in (b, b.slice(1)):
            assert bytes(_convert_sources.batch_jsonl(part, enc)) == enc.encode_lines(part.to_pylist())
    assert _convert_sources._json_values(pa.array(['a"b'])) is None


def test_gzip_members_and_padding_read_with_isal(tmp_path):
    from fm.data._convert_sources import gzip_blocks

    raw = [_jsonl(_records(n, n)) for n in (500, 1, 2000)]
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(b"".join(gzip.compress(r, level, mtime=0) for r, level in zip(raw, (1, 6, 9))) + b"\0" * 100)
    blocks = list(gzip_blocks(str(path)))
    assert b"".join(b for b, _ in blocks) == b"".join(raw)
    assert sum(used for _, used in blocks) == path.stat().st_size


def test_prefetched_passes_errors_and_stops_when_closed():
    import threading

    from fm.data._convert_sources import SourceError, prefetched

    def failing():
        yield b"a", 1
        raise SourceError("broken", "hint")

    got = []
    with pytest.raises(SourceError, match="broken"):
        for item in prefetched(failing):
            got.append(item)
    assert got == [(b"a", 1)]

    closed = []

    def endless():
        try:
            while True:
                yield b"x", 1
        finally:
            closed.append(True)

    gen = prefetched(endless)
    assert next(gen) == (b"x", 1)
    gen.close()
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name == "fm-convert-read"]
