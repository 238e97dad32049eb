"""The converter's input formats besides plain jsonl: ``.jsonl.gz``, ``.jsonl.zst`` and Parquet (``fm.data.convert``).

Every format is read as a stream of jsonl bytes and cut into the same whole-line chunks the plain-jsonl reader
gives (``iter_stream_chunks``), so validation, statistics and the output are the same code and the same bytes.

* gzip (stdlib ``zlib``; concatenated members are read in turn) and zstandard (``zstandard``; several frames are
  read in turn) are decompressed in blocks, never to disk. A compressed file cannot be split at a byte offset:
  it is read whole by one worker.
* Parquet (``pyarrow``): each row becomes one compact JSON object on one line, keys in column order
  (``msgspec``: no spaces, non-ASCII kept as UTF-8, NaN and infinities as ``null``, dates and timestamps as
  ISO 8601 strings). A file can be split between workers by row group. Columns of a type JSON has no form for
  (binary, decimal, durations, ...) are refused before anything is read.

Reading runs in the worker's thread, block by block. A background thread was measured and gave nothing on the
2-core development VM (docs/benchmarks-convert.md): zstandard's decompressor and Parquet's rows-to-JSON step
hold the GIL, and zlib's released GIL is mostly taken by the scanning, which holds it too.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import msgspec

from fm.errors import FmError

PLAIN, GZIP, ZSTD, PARQUET = "jsonl", "gzip", "zstd", "parquet"
# Suffixes searched for in a directory (--path DIR). A single --path FILE is read by its suffix, plain otherwise.
DIR_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
READ_BLOCK = 1 << 20  # compressed bytes read at a time
MAX_OUT = 4 << 20  # decompressed bytes per block handed to the scanner (bounds memory for highly compressible data)
PARQUET_BATCH_ROWS = 4096


class SourceError(FmError):
    """A damaged input; ``convert_piece`` adds the file and line before it becomes a ``ConvertError``."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint
        self.lines_before = 0  # complete lines read before the damage (set by iter_stream_chunks)


def file_kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        return GZIP
    if name.endswith((".zst", ".zstd")):
        return ZSTD
    if name.endswith(".parquet"):
        return PARQUET
    return PLAIN


# ----------------------------------------------------------------------------------------------- compressed

def _members(path: str, new: Callable, errors: tuple, what: str, block: int,
             max_out: int | None) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of a file of concatenated gzip members or zstd frames (zero padding after one is
    allowed), and the compressed bytes consumed with each."""
    hint = (f"the file is damaged or was not fully downloaded: download it again (check it with "
            f"{'gzip' if what == 'gzip' else 'zstd'} -t {path})")
    d = new()
    started = False
    with open(path, "rb") as f:
        while chunk := f.read(block):
            used, data = len(chunk), chunk
            while data:
                if d.eof:  # the next member or frame, or zero padding
                    if not data.strip(b"\x00"):
                        break
                    d = new()
                started = True
                try:
                    out = d.decompress(data, max_out) if max_out else d.decompress(data)
                except errors as e:
                    raise SourceError(f"corrupt {what} data ({e})", hint) from None
                data = d.unused_data if d.eof else (d.unconsumed_tail if max_out else b"")
                if out:
                    yield out, used
                    used = 0
            if used:
                yield b"", used
    if started and not d.eof:
        raise SourceError(f"truncated {what} data (the file ends in the middle of the compressed stream)", hint)


def gzip_blocks(path: str) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of a gzip file (all its members)."""
    return _members(path, lambda: zlib.decompressobj(31), (zlib.error,), "gzip", READ_BLOCK, MAX_OUT)


def zstd_blocks(path: str) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of a zstandard file (all its frames). A zstd object returns all the output of what it
    is given, so it is fed smaller blocks (highly compressible data expands more)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _members(path, dctx.decompressobj, (zstandard.ZstdError,), "zstd", READ_BLOCK // 8, None)


# ----------------------------------------------------------------------------------------------- parquet

def _json_type(t) -> bool:
    """Whether Arrow type ``t`` has a JSON form (see the module docstring)."""
    import pyarrow.types as pt

    if pt.is_dictionary(t):
        return _json_type(t.value_type)
    if pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t) or getattr(pt, "is_list_view", bool)(t):
        return _json_type(t.value_type)
    if pt.is_struct(t):
        return all(_json_type(t.field(i).type) for i in range(t.num_fields))
    return (pt.is_null(t) or pt.is_boolean(t) or pt.is_integer(t) or pt.is_floating(t) or pt.is_string(t)
            or pt.is_large_string(t) or getattr(pt, "is_string_view", bool)(t) or pt.is_date(t)
            or pt.is_timestamp(t))


def _is_text(t) -> bool:
    import pyarrow.types as pt

    if pt.is_dictionary(t):
        return _is_text(t.value_type)
    return pt.is_string(t) or pt.is_large_string(t) or getattr(pt, "is_string_view", bool)(t) or pt.is_null(t)


def parquet_row_groups(path: str, input_key: str | None, output_key: str) -> list[int]:
    """Check a Parquet file's schema against ``--json-keys``; returns the compressed size of each row group."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        meta = pf.metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise FmError(f"{path}: not a readable Parquet file ({e}); the file is damaged or was not fully "
                      "downloaded: download it again") from None
    names = schema.names
    for key, role in ((output_key, "text"), (input_key, "input")):
        if key is None:
            continue
        if key not in names:
            if role == "input":
                continue  # the input (prompt) is optional, as in jsonl records
            raise FmError(f"{path}: no column {key!r} (the columns are: {', '.join(names)}); name the text column "
                          "with --json-keys, e.g. --json-keys text")
        if not _is_text(schema.field(key).type):
            raise FmError(f"{path}: column {key!r} has type {schema.field(key).type}, not string; name a string "
                          "column with --json-keys")
    for field in schema:
        if not _json_type(field.type):
            raise FmError(f"{path}: column {field.name!r} has type {field.type}, which has no JSON form; write the "
                          "file without it (or cast it to string) before converting")
    return [_compressed_size(meta.row_group(i)) for i in range(meta.num_row_groups)]


def _compressed_size(rg) -> int:
    return sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))


def parquet_blocks(path: str, first: int, last: int) -> Iterator[tuple[bytes, int]]:
    """jsonl bytes of row groups ``first..last-1`` (one compact JSON object per row) and their compressed sizes."""
    import pyarrow.parquet as pq

    enc = msgspec.json.Encoder()
    hint = "the file is damaged or was not fully downloaded: download it again"
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise SourceError(f"not a readable Parquet file ({e})", hint) from None
    for rg in range(first, last):
        try:
            batches = list(pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], use_threads=False))
        except Exception as e:
            raise SourceError(f"row group {rg}: cannot be read ({e})", hint) from None
        size = _compressed_size(meta.row_group(rg))
        for i, batch in enumerate(batches):
            yield enc.encode_lines(batch.to_pylist()), size if i == len(batches) - 1 else 0
        if not batches:
            yield b"", size


# ----------------------------------------------------------------------------------------------- plumbing

def iter_stream_chunks(blocks: Iterator[tuple[bytes, int]], scratch) -> Iterator[tuple[int, int]]:
    """Fill ``scratch.buf`` with whole lines from a stream of ``(bytes, progress)`` blocks; yields how many bytes
    it holds and the progress consumed since the last yield. A last line without ``\\n`` gets one. The partial line
    at the end of a chunk is moved to the front of the buffer for the next one."""
    have = progress = 0
    try:
        for block, used in blocks:
            progress += used
            mv = memoryview(block)
            pos = 0
            while pos < len(mv):
                room = len(scratch.buf) - 1 - have
                take = min(room, len(mv) - pos)
                scratch.buf[have:have + take] = mv[pos:pos + take]
                have += take
                pos += take
                if have < len(scratch.buf) - 1:
                    continue
                cut = scratch.buf.rfind(b"\n", 0, have) + 1
                if cut == 0:  # a line longer than the chunk: a larger buffer, keeping what it holds
                    kept = bytes(scratch.buf[:have])
                    scratch.grow(2 * (len(scratch.buf) - 1))
                    scratch.buf[:have] = kept
                    continue
                yield cut, progress
                progress = 0
                scratch.buf[: have - cut] = scratch.buf[cut:have]
                have -= cut
    except SourceError as e:
        e.lines_before = scratch.buf.count(b"\n", 0, have)
        raise
    if have:
        if scratch.buf[have - 1] != 10:
            scratch.buf[have] = 10
            have += 1
        yield have, progress
    elif progress:
        yield 0, progress
