"""The converter's per-chunk work: validate jsonl lines, count tokens, write valid bytes (``fm.data.convert``).

A piece (a share of the input that one worker takes at a time: newline-aligned byte ranges) is read in large chunks
into reused buffers. Newline positions and statistics come from numpy; one msgspec ``decode_lines`` call
validates every line of a chunk into a typed struct; a chunk whose lines are all valid is written back in
one call. Only a chunk that holds a bad line is re-scanned line by line to name the reason.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import msgspec
import numpy as np

from fm.data import _convert_sources as _sources
from fm.data._convert_sources import (
    GZIP,
    PARQUET,
    PLAIN,
    SourceError,
    file_kind,
    gzip_blocks,
    iter_stream_chunks,
    parquet_blocks,
    prefetched,
    zstd_blocks,
)
from fm.data.indexed import DATA_FILE, FORMAT_VERSION, META_FILE  # noqa: F401 - the converter's names too
from fm.errors import FmError

BUCKETS = ("less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k")
# Upstream's bucket edges are decimal thousands (4000, not 4096); kept so statistics stay comparable.
BUCKET_EDGES = np.array([4000, 8000, 16000, 32000, 64000, 128000, 256000], dtype=np.float64)
# Tokens per unit when no tokenizer is given. zh: per character, en: per space-separated word (upstream);
# code: per character (≈3.3 characters per token for BPE/SentencePiece vocabularies on source code).
ESTIMATE_FACTORS = {"zh": 0.7, "en": 1.5, "code": 0.3}
# Order matters: a line is reported with the first reason that applies.
REASONS = ("empty_line", "nul_byte", "invalid_utf8", "invalid_json", "not_object", "missing_output",
           "output_not_string", "input_not_string")
# Blank lines hold no data, so they are counted and reported but never fail --strict.
NON_FATAL = frozenset({"empty_line"})
MAX_REPORTED = 20
EXIT_ERROR = 1
EXIT_STRICT = 2
# A chunk, its masks and its decoded strings stay in the CPU caches (docs/benchmarks.md measures the sizes).
DEFAULT_CHUNK = 1 << 20
TOKENIZER_CHUNK = 4 << 20  # token ids of a chunk are held at once: keep it smaller
# With several workers the input is cut into pieces handed out one at a time (PieceQueue).
PIECES_PER_WORKER = 16
PIECE_MIN, PIECE_MAX = 1 << 20, 64 << 20
MAX_PIECES = 4096  # each piece is one cut found by reading the input, and one result sent back to the parent


class ConvertError(FmError):
    exit_code = EXIT_ERROR


class StrictError(ConvertError):
    exit_code = EXIT_STRICT


DEFAULT_JSON_KEYS = ("input", "output")
_decode_any = msgspec.json.Decoder().decode
_get_output = attrgetter("output")


class RecordFormat:
    """Which keys of a record hold its text (``--json-keys``): ``(output,)`` or ``(input, output)``.

    The output is trained on; the input, when there is one, is the prompt (masked from the loss, optional in
    every record). Records decode into a typed struct whose fields are renamed to those keys.
    """

    def __init__(self, keys: Sequence[str] = DEFAULT_JSON_KEYS):
        keys = tuple(keys)
        if len(keys) not in (1, 2) or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise ConvertError(f"--json-keys {' '.join(map(str, keys))}: give one key (the text trained on) or two "
                               "different keys (the input, masked, then the output, trained on)")
        self.keys = keys
        self.input_key, self.output_key = (None, keys[0]) if len(keys) == 1 else keys
        fields: list[tuple] = [("output", str)]
        rename = {"output": self.output_key}
        if self.input_key is not None:
            fields.append(("input", str | None, None))
            rename["input"] = self.input_key
        # Structs that hold only strings have no cycles, so they need not be tracked by the GC (faster).
        struct = msgspec.defstruct("Record", fields, rename=rename, gc=False)
        decoder = msgspec.json.Decoder(struct)
        self.decode, self.decode_lines = decoder.decode, decoder.decode_lines

    def __reduce__(self):  # workers rebuild the struct (a class made at run time does not pickle)
        return RecordFormat, (self.keys,)

    def classify(self, line: bytes) -> str | None:
        """The reason ``line`` (without its newline) is bad, or None if it is a valid record."""
        if not line.strip():
            return "empty_line"
        if b"\x00" in line:
            return "nul_byte"
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
        try:
            obj = _decode_any(line)
        except (msgspec.DecodeError, ValueError):
            return "invalid_json"
        if not isinstance(obj, dict):
            return "not_object"
        if self.output_key not in obj:
            return "missing_output"
        if not isinstance(obj[self.output_key], str):
            return "output_not_string"
        if self.input_key is not None and obj.get(self.input_key) is not None \
                and not isinstance(obj[self.input_key], str):
            return "input_not_string"
        try:
            self.decode(line)
        except (msgspec.DecodeError, ValueError):  # pragma: no cover - the checks above should cover it
            return "invalid_json"
        return None


DEFAULT_FORMAT = RecordFormat()


# ----------------------------------------------------------------------------------------------- options

@dataclass
class Options:
    language: str
    index_name: str = "index"
    tokenizer: str | None = None
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    chunk_size: int = 0  # 0: DEFAULT_CHUNK, or TOKENIZER_CHUNK with a tokenizer
    piece_size: int = 0  # 0: automatic (see piece_count); bytes per piece handed to a worker
    progress: bool | None = None  # None: when stderr is a TTY
    fsync: bool = True
    json_keys: tuple[str, ...] = DEFAULT_JSON_KEYS  # (output,) or (input, output): see RecordFormat

    def resolved_chunk(self) -> int:
        return self.chunk_size or (TOKENIZER_CHUNK if self.tokenizer else DEFAULT_CHUNK)

    def piece_count(self, total: int) -> int:
        """How many pieces the input is cut into: one for one worker; else about PIECES_PER_WORKER per worker
        (pieces of PIECE_MIN..PIECE_MAX bytes, at most MAX_PIECES), so the last piece is short and no worker
        waits long for another at the end."""
        if self.workers <= 1:
            return 1
        size = self.piece_size or min(max(total // (self.workers * PIECES_PER_WORKER), PIECE_MIN), PIECE_MAX)
        return min(MAX_PIECES, max(self.workers, -(-total // size)))


# ----------------------------------------------------------------------------------------------- counting

class Scratch:
    """Buffers reused from chunk to chunk: fresh arrays cost page faults that dominate on small VMs."""

    def __init__(self, size: int):
        self.buf = bytearray(size + 1)  # +1: room for the newline added to a file's unterminated last line
        self.mask = np.empty(size + 1, dtype=bool)

    def grow(self, size: int) -> None:
        if size + 1 > len(self.buf):
            self.__init__(size)

    def equal(self, a: np.ndarray, value: int) -> np.ndarray:
        return np.equal(a, value, out=self.mask[: len(a)])


def _count_per_line(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Number of True values of ``mask`` in each ``[starts[i], ends[i])`` (every range non-empty, ``ends[-1]``
    the end of ``mask``'s last line)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    # reduceat over the bytes with the narrowest accumulator that holds the longest line's count: no casting at
    # all for lines under 256 bytes, and 16 bits (half the memory traffic of 32) for lines under 64 KB, the usual case.
    longest = int((ends - starts).max()) + 1
    acc = next(t for t in (np.uint8, np.uint16, np.int32, np.int64) if longest <= np.iinfo(t).max)
    return np.add.reduceat(mask.view(np.uint8), starts, dtype=acc).astype(np.int64)


class TokenCounter:
    """Per-line integer counts; ``factor * count`` is the token figure of the line.

    Without a tokenizer the estimate is upstream's, computed like upstream on the raw jsonl line
    (``\\n`` included): en ``1.5 * len(line.split(" "))``, zh ``0.7 * len(line)`` in characters; code
    ``0.3 * len(line)``. With a tokenizer: tokens of ``input`` + tokens of ``output`` (no BOS/EOS).
    Counts stay integers so totals do not depend on how lines were split between workers or chunks.
    """

    def __init__(self, language: str, tokenizer_path: str | None, threads: int = -1):
        self.language = language
        self.threads = threads  # SentencePiece threads per list encode (-1: all cores; HF tokenizers: its own)
        self.tokenizer_path = os.path.abspath(tokenizer_path) if tokenizer_path else None
        if self.tokenizer_path:
            from fm.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
            self.factor = 1.0
            self.method = f"tokenizer:{self.tokenizer_path}"
        else:
            self._tok = None
            self.factor = ESTIMATE_FACTORS[language]
            self.method = "estimate"

    def counts(self, a: np.ndarray, starts: np.ndarray, ends: np.ndarray, ascii_only: bool,
               recs: list, scratch: Scratch) -> np.ndarray:
        """``a``: the chunk's bytes; line i is ``a[starts[i]:ends[i]]`` and ``a[ends[i]]`` is its newline."""
        if self._tok is not None:
            return self._token_counts(recs)
        if self.language == "en":
            return _count_per_line(scratch.equal(a, 32), starts, ends) + 1
        chars = ends - starts + 1
        if not ascii_only:  # UTF-8 continuation bytes do not start a character
            chars -= _count_per_line(scratch.equal(a & 0xC0, 0x80), starts, ends)
        return chars

    def _encode_lengths(self, texts: list[str]) -> np.ndarray:
        # one batch call; int32 arrays avoid building a Python int per token (SentencePiece: self.threads threads)
        ids = self._tok.encode_batch_arrays(texts, threads=self.threads)
        return np.fromiter(map(len, ids), np.int64, len(texts))

    def _token_counts(self, recs: list) -> np.ndarray:
        counts = self._encode_lengths(list(map(_get_output, recs)))
        if not recs or not hasattr(recs[0], "input"):  # --json-keys with one key: no input
            return counts
        nonempty = [i for i, r in enumerate(recs) if r.input]
        if nonempty:
            counts[np.asarray(nonempty)] += self._encode_lengths([recs[i].input for i in nonempty])
        return counts


# ----------------------------------------------------------------------------------------------- scanning

def classify(line: bytes, fmt: RecordFormat = DEFAULT_FORMAT) -> str | None:
    """The reason ``line`` (without its newline) is bad, or None if it is a valid record of ``fmt``."""
    return fmt.classify(line)


def _utf8_ok(view: memoryview, ascii_only: bool) -> bool:
    if ascii_only:
        return True
    try:
        codecs.utf_8_decode(view, "strict", True)
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class ChunkResult:
    good: bytes | memoryview  # the valid lines, each ending in \n
    lengths: np.ndarray  # int64 byte length of each valid line (newline included)
    counts: np.ndarray  # int64 token counts (see TokenCounter) of each valid line
    first_line: bytes | None  # first valid line, for data_sample
    bad: list[tuple[int, str]]  # (line index within the chunk, reason)
    nlines: int  # all lines in the chunk, good or bad


def _line_bounds(a: np.ndarray, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    ends = np.flatnonzero(scratch.equal(a, 10))
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    return starts, ends


def _decode_all(view: memoryview, a: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                fmt: RecordFormat) -> list | None:
    """Records of every line, or None if some line is bad (then the caller looks line by line).

    ``decode_lines`` alone would accept two objects on one line, or one object over two lines. But if every
    line starts with ``{`` and ends with ``}``, no value can cross a line break (inside a JSON value a ``}``
    is never followed by ``{`` without a comma), so ``n`` values for ``n`` lines means one per line.
    """
    n = len(ends)
    if n and np.all(a[starts] == 123) and np.all(a[ends - 1] == 125):
        try:
            recs = fmt.decode_lines(view)
        except (msgspec.DecodeError, ValueError):
            return None
        return recs if len(recs) == n else None
    try:  # lines with surrounding whitespace (e.g. \r\n endings): decode one by one
        lines = bytes(view).split(b"\n")
        lines.pop()
        return list(map(fmt.decode, lines))
    except (msgspec.DecodeError, ValueError):
        return None


def scan_chunk(buf: bytes | bytearray, cut: int, counter: TokenCounter, scratch: Scratch,
               fmt: RecordFormat = DEFAULT_FORMAT) -> ChunkResult:
    """Validate the lines of ``buf[:cut]`` (complete lines, each ending in \\n)."""
    view = memoryview(buf)[:cut]
    a = np.frombuffer(buf, np.uint8, count=cut)
    starts, ends = _line_bounds(a, scratch)
    n = len(ends)
    ascii_only = not np.greater_equal(a, 0x80, out=scratch.mask[:cut]).any()
    recs = None
    if buf.find(b"\x00", 0, cut) < 0 and _utf8_ok(view, ascii_only):
        recs = _decode_all(view, a, starts, ends, fmt)
    if recs is not None:  # fast path: every line is valid, write the chunk as it is
        counts = counter.counts(a, starts, ends, ascii_only, recs, scratch)
        first = bytes(view[: int(ends[0]) + 1]) if n else None
        return ChunkResult(view, ends - starts + 1, counts, first, [], n)
    lines = bytes(view).split(b"\n")
    lines.pop()
    good, bad = [], []
    for i, line in enumerate(lines):
        reason = fmt.classify(line)
        if reason is None:
            good.append(line)
        else:
            bad.append((i, reason))
    if not good:
        return ChunkResult(b"", np.zeros(0, np.int64), np.zeros(0, np.int64), None, bad, n)
    kept = b"\n".join(good) + b"\n"
    ka = np.frombuffer(kept, np.uint8)
    kstarts, kends = _line_bounds(ka, scratch)
    recs = list(map(fmt.decode, good))
    counts = counter.counts(ka, kstarts, kends, kept.isascii(), recs, scratch)
    return ChunkResult(kept, kends - kstarts + 1, counts, good[0] + b"\n", bad, n)


def iter_chunks(path: str, start: int, end: int, scratch: Scratch) -> Iterator[int]:
    """Fill ``scratch.buf`` with whole lines of ``path[start:end]``; yields how many bytes it holds.

    ``end`` is a line start or the end of the file; a last line without ``\\n`` gets one. Each read starts
    at the next line start (``preadv``), so nothing is carried over or copied between chunks.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            size = len(scratch.buf) - 1
            want = min(size, end - pos)
            got = os.preadv(fd, [memoryview(scratch.buf)[:want]], pos)
            if got < want:
                raise ConvertError(f"{path}: file shrank while reading (at byte {pos}); is something writing it?")
            if pos + want >= end:
                if scratch.buf[want - 1] != 10:
                    scratch.buf[want] = 10
                    want += 1
                yield want
                return
            cut = scratch.buf.rfind(b"\n", 0, want) + 1
            if cut == 0:  # a line longer than the chunk
                scratch.grow(2 * size)
                continue
            yield cut
            pos += cut
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- pieces

@dataclass
class Segment:
    """A byte range of a plain jsonl file; a whole compressed file (0, its size); row groups of a Parquet file."""
    file_idx: int
    start: int
    end: int


def read_in_thread(workers: int) -> bool:
    """Whether compressed and Parquet input is read in a background thread (``prefetched``): only when this
    process may use more cores than there are workers; with a worker on every core the thread has no core to run
    on and only adds its hand-over cost (≈ 10 % measured, docs/benchmarks-convert.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return _sources.READ_THREAD and workers < cores


def iter_segment(path: str, seg: Segment, scratch: Scratch, thread: bool = False) -> Iterator[tuple[int, int]]:
    """Whole lines of ``seg`` in ``scratch.buf``: yields how many bytes it holds and the input bytes consumed.
    ``thread``: decompress (or read Parquet) in a background thread, a block ahead."""
    kind = file_kind(path)
    if kind == PLAIN:
        for cut in iter_chunks(path, seg.start, seg.end, scratch):
            yield cut, cut
        return
    if kind == PARQUET:
        make = lambda: parquet_blocks(path, seg.start, seg.end)  # noqa: E731
    else:
        make = lambda: (gzip_blocks if kind == GZIP else zstd_blocks)(path)  # noqa: E731
    blocks = prefetched(make) if thread else make()
    try:
        yield from iter_stream_chunks(blocks, scratch)
    finally:
        if hasattr(blocks, "close"):
            blocks.close()  # stops the reading thread


class _Writeback:
    """Starts the kernel's write-back of what was written so far, without waiting for it (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the final ``fdatasync`` finds most of the file already on
    disk: the disk writes while the worker computes instead of after it. A no-op where the call is missing."""

    STEP = 8 << 20
    _WRITE = 2  # SYNC_FILE_RANGE_WRITE
    _fn = None
    _looked_up = False

    def __init__(self, fd: int, start: int):
        self.fd, self.done, self.pos = fd, start, start
        if not _Writeback._looked_up:
            _Writeback._looked_up = True
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                _Writeback._fn = fn
            except (AttributeError, OSError):
                pass

    def wrote(self, n: int) -> None:
        self.pos += n
        if self.pos - self.done >= self.STEP:
            self.finish()

    def finish(self) -> None:
        """Start the write-back of what is left."""
        if self._fn is not None and self.pos > self.done:
            self._fn(self.fd, self.done, self.pos - self.done, self._WRITE)  # advisory: errors are ignored
            self.done = self.pos


@dataclass
class PartResult:
    """What one piece produced. Its line lengths (raw int64) are ``side + ".len"`` from byte ``len_at`` on
    (``nlines`` of them) and its text index lines ``side + ".txt"`` bytes ``txt_at:txt_end``: each worker
    appends the pieces it converts to its own two side files."""
    nlines: int = 0
    nbytes: int = 0
    count_sum: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    skipped: dict[str, int] = field(default_factory=dict)
    first_bad: list[tuple[int, int, str]] = field(default_factory=list)  # (segment, line in segment, reason)
    seg_lines: list[int] = field(default_factory=list)
    sample: bytes | None = None
    strict_error: tuple[int, int, str] | None = None
    side: str = ""
    len_at: int = 0
    txt_at: int = 0
    txt_end: int = 0


def format_offsets(values: np.ndarray) -> bytes:
    """Offsets as the text index writes them: one decimal number per line."""
    return ("%d\n" * len(values) % tuple(values.tolist())).encode()  # one format call instead of a str() per value


def _bucket_counts(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(BUCKET_EDGES, tokens, side="right"), minlength=len(BUCKETS))


class PieceQueue:
    """Hands out the pieces of the input, in order, one at a time to whichever worker asks first.

    The parent and its forked workers share one counter, so a worker slowed down (a busy core, a slow disk
    stretch) converts fewer pieces instead of making everyone wait for its fixed share. With one worker it is
    a plain counter.
    """

    def __init__(self, n: int, ctx=None):
        self.n = n
        self._next = ctx.Value("q", 0) if ctx is not None else None
        self._local = 0

    def take(self) -> int | None:
        if self._next is None:
            k, self._local = self._local, self._local + 1
            return k if k < self.n else None
        with self._next.get_lock():
            k = self._next.value
            if k >= self.n:
                return None
            self._next.value = k + 1
            return k

    def stop(self) -> None:
        """Hand out no more pieces (after a --strict error or a failure: what is left is not needed)."""
        if self._next is None:
            self._local = self.n
            return
        with self._next.get_lock():
            self._next.value = self.n


def convert_pieces(files: Sequence[str], pieces: Sequence[Sequence[Segment]], positions: Sequence[int],
                   data_path: str, side: str, opts: Options, queue: PieceQueue,
                   progress: Callable[[int], None] | None = None,
                   parent_pid: int | None = None, spills: Sequence[str | None] = ()) -> dict[int, PartResult]:
    """Convert the pieces ``queue`` hands out until none is left; returns their results by piece number.

    Piece ``k`` (its segments, in order) goes into ``data_path`` (which must exist) from byte ``positions[k]``
    on; its raw int64 line lengths are appended to ``side + ".len"`` and its text index lines (the end offset
    of each line, assuming the piece stays at ``positions[k]``) to ``side + ".txt"``. Formatting them here
    runs in parallel; the parent only re-formats a piece that moved because an earlier one dropped lines.
    A piece whose output size is not known in advance (compressed or Parquet input, with several workers) has a
    spill file ``spills[k]`` instead: it is written there from byte 0 and copied into data.jsonl by the parent.
    """
    # One SentencePiece thread per worker when there are several: more would only compete for the same cores.
    counter = TokenCounter(opts.language, opts.tokenizer, threads=1 if opts.workers > 1 else -1)
    scratch = Scratch(opts.resolved_chunk())
    fmt = RecordFormat(opts.json_keys)
    results: dict[int, PartResult] = {}
    with open(data_path, "r+b") as out, open(side + ".len", "wb") as lens, open(side + ".txt", "wb") as txt:
        while (k := queue.take()) is not None:
            res = results[k] = PartResult(side=side, len_at=lens.tell(), txt_at=txt.tell())
            spill = spills[k] if spills else None
            if spill:
                with open(spill, "w+b") as own:  # a temp file: data.jsonl, where it is copied, is synced
                    convert_piece(files, pieces[k], own, 0, lens, txt, res, opts, counter, scratch, progress,
                                  parent_pid, fmt)
            else:
                convert_piece(files, pieces[k], out, positions[k], lens, txt, res, opts, counter, scratch,
                              progress, parent_pid, fmt)
            res.txt_end = txt.tell()
            if res.strict_error is not None:  # later pieces cannot hold the first bad line: stop everyone
                queue.stop()
                break
        if opts.fsync:  # flush here, in parallel with the other workers, not serially in the parent
            out.flush()
            os.fdatasync(out.fileno())
    if not results:  # the others took every piece: no result names these files, so nobody else removes them
        os.unlink(side + ".len")
        os.unlink(side + ".txt")
    return results


def convert_piece(files: Sequence[str], segments: Sequence[Segment], out, data_pos: int, lens, txt,
                  res: PartResult, opts: Options, counter: TokenCounter, scratch: Scratch,
                  progress: Callable[[int], None] | None = None, parent_pid: int | None = None,
                  fmt: RecordFormat = DEFAULT_FORMAT) -> None:
    """Convert one piece into the open files (see ``convert_pieces``), filling in ``res``."""
    buckets = np.zeros(len(BUCKETS), dtype=np.int64)
    out.seek(data_pos)
    writeback = _Writeback(out.fileno(), data_pos) if opts.fsync else None
    thread = read_in_thread(opts.workers)
    for si, seg in enumerate(segments):
        seg_line = 0
        try:
            for cut, used in iter_segment(files[seg.file_idx], seg, scratch, thread):
                if parent_pid is not None and os.getppid() != parent_pid:
                    raise SystemExit("convert worker: parent process died")
                if cut:
                    seg_line = _convert_chunk(cut, seg_line, si, out, writeback, lens, txt, data_pos, res, opts,
                                              counter, scratch, fmt, buckets)
                    if res.strict_error is not None:
                        res.seg_lines.append(seg_line)
                        return
                if progress is not None:
                    progress(used)
        except SourceError as e:
            path = files[seg.file_idx]
            where = "" if file_kind(path) == PARQUET else f", after line {seg_line + e.lines_before}"
            raise ConvertError(f"{path}: {e.message}{where}; {e.hint}; nothing was written to --output") from None
        res.seg_lines.append(seg_line)
    out.flush()
    if writeback is not None:
        writeback.finish()
    res.buckets = buckets.tolist()


def _convert_chunk(cut, seg_line, si, out, writeback, lens, txt, data_pos, res, opts, counter, scratch, fmt,
                   buckets) -> int:
    """Scan and write the ``cut`` bytes of ``scratch.buf``; returns the segment's line count after them (on a
    --strict error: including the chunk, with ``res.strict_error`` set)."""
    chunk = scan_chunk(scratch.buf, cut, counter, scratch, fmt)
    for i, reason in chunk.bad:
        res.skipped[reason] = res.skipped.get(reason, 0) + 1
        if len(res.first_bad) < MAX_REPORTED:
            res.first_bad.append((si, seg_line + i, reason))
        if opts.strict and reason not in NON_FATAL and res.strict_error is None:
            res.strict_error = (si, seg_line + i, reason)
    seg_line += chunk.nlines
    if res.strict_error is not None:
        return seg_line
    if chunk.good:
        out.write(chunk.good)
        if writeback is not None:
            out.flush()
            writeback.wrote(len(chunk.good))
        lens.write(chunk.lengths.astype("<i8", copy=False).tobytes())
        txt.write(format_offsets(np.cumsum(chunk.lengths) + (data_pos + res.nbytes)))
        if res.sample is None:
            res.sample = chunk.first_line
        res.nlines += len(chunk.lengths)
        res.nbytes += len(chunk.good)
        res.count_sum += int(chunk.counts.sum())
        buckets += _bucket_counts(chunk.counts * counter.factor)
    return seg_line


_WORKER_PROGRESS = None


def _worker_progress(n: int) -> None:
    with _WORKER_PROGRESS.get_lock():
        _WORKER_PROGRESS.value += n


def worker_entry(conn, progress_value, args: tuple) -> None:
    """A worker process: convert pieces until none is left, send ``(True, {piece: PartResult})`` or
    ``(False, error)`` back on ``conn``."""
    global _WORKER_PROGRESS
    _WORKER_PROGRESS = progress_value
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    files, pieces, positions, data_path, side, opts, queue, parent_pid, spills = args
    try:
        result = (True, convert_pieces(files, pieces, positions, data_path, side, opts, queue,
                                       _worker_progress, parent_pid, spills))
    except BaseException as e:  # noqa: B036 - everything goes back to the parent, which raises it
        queue.stop()  # the run fails: the other workers need not go on
        result = (False, e)
    try:
        conn.send(result)
    except Exception as e:  # an exception that does not pickle: send its text
        conn.send((False, ConvertError(f"convert worker: {result[1]!r} ({e})")))
