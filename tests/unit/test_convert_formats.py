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
def test_same_output_as_jsonl(tmp_path, fmt, workers):
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


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_truncated_archive_is_an_error_naming_the_file(tmp_path, capsys, fmt):
    src = _write(tmp_path / "x", _records(3000, 7), fmt)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: truncated {'gzip' if fmt.endswith('gz') else 'zstd'} data" in err
    assert "after line " in err and "download it again" in err
    _no_output_left(tmp_path, src.name)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_corrupt_archive_is_an_error_naming_the_file(tmp_path, capsys, fmt):
    src = _write(tmp_path / "x", _records(3000, 7), fmt)
    data = bytearray(src.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    src.write_bytes(bytes(data))
    assert _run(["-p", src, "-l", "zh", "-o", tmp_path / "out", "-j", "2"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: corrupt" in err
    _no_output_left(tmp_path, src.name)


def test_corrupt_parquet_is_an_error_naming_the_file_and_row_group(tmp_path, capsys):
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
