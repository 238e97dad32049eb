"""The converter's input formats besides plain jsonl: ``.jsonl.gz``, ``.jsonl.zst`` and Parquet (``fm.data.convert``).

Every format is read as a stream of jsonl bytes and cut into the same whole-line chunks the plain-jsonl reader
gives (``iter_stream_chunks``), so validation, statistics and the output are the same code and the same bytes.

* gzip (ISA-L's inflate from ``isal``, stdlib ``zlib`` where it is missing; concatenated members are read in
  turn) and zstandard (``zstandard``; several frames are read in turn) are decompressed in blocks, never to disk.
  A compressed file cannot be split at a byte offset: it is read whole by one worker.
* Parquet (``pyarrow``): each row becomes one compact JSON object on one line, keys in column order
  (msgspec's form: no spaces, non-ASCII kept as UTF-8, NaN and infinities as ``null``, dates and timestamps as
  ISO 8601 strings). A file can be split between workers by row group. Columns of a type JSON has no form for
  (binary, decimal, durations, ...) are refused before anything is read. A batch whose columns are strings
  needing no escape, integers, booleans or nulls is written with ``pyarrow.compute`` (``batch_jsonl``), which
  releases the GIL; any other goes through msgspec, which escapes faster but holds the GIL.

Where a worker has a core to spare (fewer workers than cores), ``prefetched`` reads a block ahead in a
background thread: isal, zstandard, zlib and pyarrow release the GIL while they work, so reading overlaps with
the scanning of the previous block (docs/benchmarks-convert.md). Otherwise reading runs in the worker's thread.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Iterator

import msgspec

from fm.errors import FmError

PLAIN, GZIP, ZSTD, PARQUET = "jsonl", "gzip", "zstd", "parquet"
# Suffixes searched for in a directory (--path DIR). A single --path FILE is read by its suffix, plain otherwise.
DIR_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
READ_BLOCK = 1 << 20  # compressed bytes read at a time
MAX_OUT = 4 << 20  # decompressed bytes per block handed to the scanner (bounds memory for highly compressible data)
ZSTD_READ_BLOCK = READ_BLOCK // 8
PARQUET_BATCH_ROWS = 4096
READ_THREAD = True  # read in a background thread (``prefetched``); False reads in the worker's thread


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
    """Decompressed blocks of a gzip file (all its members): ISA-L's inflate (``isal``, several times faster than
    zlib's, the same bytes), zlib where ``isal`` is not installed."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is pinned in requirements.txt
        return _members(path, lambda: zlib.decompressobj(31), (zlib.error,), "gzip", READ_BLOCK, MAX_OUT)
    return _members(path, lambda: isal_zlib.decompressobj(31), (isal_zlib.error, zlib.error), "gzip",
                    READ_BLOCK, MAX_OUT)


def zstd_blocks(path: str) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of a zstandard file (all its frames). A zstd object returns all the output of what it
    is given, so it is fed smaller blocks (highly compressible data expands more)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _members(path, dctx.decompressobj, (zstandard.ZstdError,), "zstd", ZSTD_READ_BLOCK, None)


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


def _json_strings(col):
    """JSON string literals (``"..."``, ``null`` for nulls) of an Arrow string array, or None where a value needs
    an escape (``"``, ``\\``, a control character such as a newline): that is left to msgspec, which escapes
    faster than ``pyarrow.compute`` (one ``replace_substring`` pass per character; docs/benchmarks-convert.md).
    The check reads the array's bytes with numpy: the minimum first (nearly free, and a newline ends it)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    large = pa.large_string()
    s = col.cast(large)
    _, offsets, data = s.buffers()
    if data is not None and len(s):
        ends = np.frombuffer(offsets, np.int64)
        a = np.frombuffer(data, np.uint8)[int(ends[s.offset]):int(ends[s.offset + len(s)])]
        if a.size and (a.min() < 0x20 or np.count_nonzero(a == 0x22) or np.count_nonzero(a == 0x5C)):
            return None
    quote = pa.scalar('"', large)
    empty, null = pa.scalar("", large), pa.scalar("null", large)
    return pc.fill_null(pc.binary_join_element_wise(quote, s, quote, empty), null)


def _json_values(col):
    """Each value of Arrow array ``col`` as compact JSON text (a large_string array), as msgspec writes it, for
    strings without escapes, integers, booleans and nulls; None for the other types and values."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pt

    large = pa.large_string()
    t = col.type
    if pt.is_dictionary(t) and _is_text(t.value_type):
        col, t = col.cast(t.value_type), t.value_type
    if pt.is_string(t) or pt.is_large_string(t) or getattr(pt, "is_string_view", bool)(t):
        return _json_strings(col)
    if pt.is_null(t):
        return pa.array(["null"] * len(col), large)
    if pt.is_integer(t) or pt.is_boolean(t):  # "-3", "true": the same text as JSON
        return pc.fill_null(col.cast(large), pa.scalar("null", large))
    return None


def batch_jsonl(batch, enc) -> bytes | memoryview:
    """The rows of a record batch as jsonl: one compact JSON object per row, keys in column order; the same bytes
    as ``enc.encode_lines(batch.to_pylist())``, which it is where a column is not one ``_json_values`` takes.

    The vectorised form (``pyarrow.compute``, which releases the GIL) lets a reading thread overlap with the
    converting one; msgspec's holds the GIL. tests/unit/test_convert_formats.py checks that both give the same
    bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    large = pa.large_string()
    n = batch.num_rows
    parts = []
    for i, name in enumerate(batch.schema.names):
        values = _json_values(batch.column(i)) if n else None
        if values is None:
            return enc.encode_lines(batch.to_pylist())
        parts.append(pa.scalar(("{" if i == 0 else ",") + enc.encode(name).decode() + ":", large))
        parts.append(values)
    if not parts:
        return b"{}\n" * n
    parts.append(pa.scalar("}\n", large))
    lines = pc.binary_join_element_wise(*parts, pa.scalar("", large))  # no nulls: every part is filled
    _, offsets, data = lines.buffers()  # the lines end to end in the data buffer
    offsets = np.frombuffer(offsets, np.int64)
    return memoryview(data).cast("B")[int(offsets[lines.offset]):int(offsets[lines.offset + n])]


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
        size = _compressed_size(meta.row_group(rg))
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], use_threads=False)
        while True:  # batch by batch: the first block is ready after PARQUET_BATCH_ROWS rows
            try:
                batch = next(batches, None)
            except Exception as e:
                raise SourceError(f"row group {rg}: cannot be read ({e})", hint) from None
            if batch is None:
                break
            yield batch_jsonl(batch, enc), 0
        yield b"", size  # the row group's progress


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


_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(make: Callable[[], Iterator[tuple[bytes, int]]], depth: int = 2) -> Iterator[tuple[bytes, int]]:
    """The blocks of ``make()``, produced in a background thread up to ``depth`` blocks ahead.

    Decompressing (isal, zstandard and zlib release the GIL while they run) and reading Parquet (pyarrow's
    decoding and the ``pyarrow.compute`` kernels of ``parquet_blocks`` release it too) then overlap with the
    scanning of the previous block, on another core when one is free. An exception in the thread is raised
    here, in the caller's thread; closing this generator (an error further on, or the first bad line with
    ``--strict``) stops the thread and waits for it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        blocks = None
        try:
            blocks = make()
            for item in blocks:
                if not put(item):
                    return
        except BaseException as e:  # handed to the caller's thread
            put(_Failed(e))
            return
        finally:
            if blocks is not None and hasattr(blocks, "close"):
                blocks.close()
        put(_END)

    thread = threading.Thread(target=run, name="fm-convert-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
