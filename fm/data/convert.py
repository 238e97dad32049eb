"""jsonl → index directory converter (``quick_start/convert_json2index.py``, ``python -m fm.data.convert``).

Output directory (see docs/data-preparation.md):

* ``data.jsonl`` — byte copy of the valid input lines, each ending in ``\\n``;
* ``index`` — text, n+1 byte offsets starting at 0 (upstream wrote n, losing line 0 on read);
* ``index.h5`` — the same offsets as an int64 HDF5 dataset ``index`` (contiguous, so readers memory-map it);
* ``meta.json`` — upstream's fields plus ``format_version``, ``json_keys`` (the records' text keys, ``--json-keys``),
  ``token_count_method`` and the skipped-line report.

Speed comes from working on large byte chunks (1 MB, buffers reused): newline positions and statistics
from numpy, one msgspec ``decode_lines`` call validating every line of the chunk into a typed struct, and
the chunk written back in one call when all its lines are valid. Only a chunk that holds a bad line is
re-scanned line by line to name the reason. With ``--workers N`` the input is cut at line starts into pieces
(about 16 per worker) that the workers take one at a time, in order, as they become free; each piece is
written straight into data.jsonl at a reserved position (the parent closes the gaps left by dropped lines),
so the output is byte-identical to one worker.

Compressed jsonl (``.jsonl.gz``, ``.jsonl.zst``) and Parquet are read as streams of jsonl bytes
(``fm.data._convert_sources``) and go through the same scanning, so they give the same output bytes. Their
output size is not known in advance: with one worker everything is one piece written in order; with several,
each compressed file is one piece and a Parquet file is cut at row groups, and such a piece (other than the
first) writes to its own spill file, copied into data.jsonl by the parent (``assemble``).

The output is built in a temporary directory next to the target and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fm.data._convert_sources import DIR_SUFFIXES, PARQUET, PLAIN, file_kind, parquet_row_groups
from fm.data._convert_worker import (  # noqa: F401 - re-exported: the converter's public names
    BUCKET_EDGES,
    BUCKETS,
    DATA_FILE,
    ESTIMATE_FACTORS,
    EXIT_ERROR,
    EXIT_STRICT,
    FORMAT_VERSION,
    MAX_REPORTED,
    META_FILE,
    REASONS,
    ConvertError,
    Options,
    PartResult,
    PieceQueue,
    RecordFormat,
    Segment,
    StrictError,
    TokenCounter,
    classify,
    convert_pieces,
    format_offsets,
    scan_chunk,
    worker_entry,
)
from fm.errors import FmError

log = logging.getLogger("fm.data.convert")

def split_segments(files: Sequence[str], sizes: Sequence[int], parts: int) -> list[list[Segment]]:
    """Cut the concatenated inputs into ``parts`` pieces (byte ranges) of about equal size, at line boundaries."""
    total = sum(sizes)
    cuts: list[tuple[int, int]] = []  # (file_idx, byte position after a newline)
    starts = np.cumsum([0, *sizes])
    for k in range(1, parts):
        target = total * k // parts
        fi = int(np.searchsorted(starts, target, side="right")) - 1
        fi = min(fi, len(files) - 1)
        pos = _next_line_start(files[fi], target - int(starts[fi]), sizes[fi])
        cuts.append((fi, pos))
    bounds = [(0, 0), *cuts, (len(files) - 1, sizes[-1])]
    result: list[list[Segment]] = []
    for (f0, p0), (f1, p1) in zip(bounds[:-1], bounds[1:]):
        segs = []
        for fi in range(f0, f1 + 1):
            a = p0 if fi == f0 else 0
            b = p1 if fi == f1 else sizes[fi]
            if b > a:
                segs.append(Segment(fi, a, b))
        result.append(segs)
    return result


def plan_pieces(files: Sequence[str], sizes: Sequence[int], row_groups: dict[int, list[int]],
                opts: Options) -> list[list[Segment]]:
    """Pieces when some input is compressed or Parquet: with one worker, one piece of whole files; else runs of
    plain files are cut as ``split_segments`` does, each compressed file is one piece (it cannot be split at a
    byte offset) and a Parquet file is cut into pieces of whole row groups (``row_groups[i]``: their
    compressed sizes), all of about the plain pieces' size."""
    ends = [len(row_groups[i]) if i in row_groups else sizes[i] for i in range(len(files))]
    if opts.workers <= 1:
        return [[Segment(i, 0, e) for i, e in enumerate(ends) if e > 0]]
    total = sum(sizes)
    target = max(1, total // opts.piece_count(total))
    pieces: list[list[Segment]] = []
    i = 0
    while i < len(files):
        kind = file_kind(files[i])
        if kind == PLAIN:
            j = i
            while j < len(files) and file_kind(files[j]) == PLAIN:
                j += 1
            run = sum(sizes[i:j])
            if run:
                for segs in split_segments(files[i:j], sizes[i:j], max(1, round(run / target))):
                    pieces.append([Segment(s.file_idx + i, s.start, s.end) for s in segs])
            i = j
            continue
        if kind == PARQUET:
            first, acc = 0, 0
            for r, size in enumerate(row_groups[i]):
                acc += size
                if acc >= target or r == len(row_groups[i]) - 1:
                    pieces.append([Segment(i, first, r + 1)])
                    first, acc = r + 1, 0
        elif sizes[i]:
            pieces.append([Segment(i, 0, sizes[i])])
        i += 1
    return pieces or [[]]


def _next_line_start(path: str, pos: int, size: int) -> int:
    if pos <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(pos - 1)
        while True:
            block = f.read(1 << 16)
            if not block:
                return size
            i = block.find(b"\n")
            if i >= 0:
                return pos + i
            pos += len(block)


# ----------------------------------------------------------------------------------------------- inputs/outputs

def _is_index_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isfile(os.path.join(path, DATA_FILE))


def find_inputs(path: str) -> list[str]:
    """``path`` itself if a file, else every ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` and ``*.parquet`` below it
    (recursive, sorted by relative path).

    Directories that are index outputs (meta.json + data.jsonl) or interrupted temp outputs are skipped,
    so converting a tree twice never reads a previous result back in.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConvertError(f"--path {path}: no such file or directory")
    found = []
    seen = {os.path.realpath(path)}
    for root, dirs, names in os.walk(path, followlinks=True):
        keep = []
        for d in dirs:
            full = os.path.join(root, d)
            if (d.startswith(".") and ".tmp-" in d) or _is_index_dir(full):
                log.warning("skipping %s: it is an index output, not input", full)
                continue
            if os.path.realpath(full) in seen:  # a symlink loop, or a directory linked twice
                log.warning("skipping %s: already searched (symlink)", full)
                continue
            seen.add(os.path.realpath(full))
            keep.append(d)
        dirs[:] = keep
        found += [os.path.join(root, n) for n in names if n.endswith(DIR_SUFFIXES)]
    found.sort(key=lambda p: os.path.relpath(p, path).split(os.sep))
    if not found:
        raise ConvertError(f"--path {path}: no *.jsonl files found, nor *.jsonl.gz, *.jsonl.zst or *.parquet "
                           "(searched recursively)")
    return found


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_paths(path: str, output: str, index_name: str, overwrite: bool) -> None:
    src = os.path.realpath(path)
    out = os.path.realpath(output)
    if _inside(src, out):
        raise ConvertError(f"--path {path} is inside --output {output}: writing the output would replace the "
                           "input; choose an output directory outside the input")
    if os.path.isdir(src) and _inside(out, src):
        raise ConvertError(f"--output {output} is inside --path {path}: its data.jsonl would be read back as input "
                           "by the next conversion of that directory; choose an output directory outside it")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConvertError(f"--output {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise ConvertError(f"--output {output} exists and is not empty; pass --overwrite to replace a previous "
                               "index output, or choose another directory")
        has_index = any(os.path.isfile(os.path.join(output, n)) for n in (index_name, index_name + ".h5",
                                                                            "index", "index.h5"))
        if not (os.path.isfile(os.path.join(output, META_FILE)) and has_index):
            raise ConvertError(f"--output {output} is not empty and does not hold an index output (meta.json + "
                               "index); --overwrite only replaces a previous index output: remove it yourself")


def cut_sample(obj: Any, limit: int = 50) -> Any:
    """Upstream's ``data_sample``: strings cut to ``limit`` characters (+ "..."), lists to one element."""
    if isinstance(obj, dict):
        return {k: cut_sample(v, limit) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cut_sample(v, limit) for v in obj[:1]]
    if isinstance(obj, str) and len(obj) > limit:
        return obj[:limit] + "..."
    return obj


def assemble(path: str, positions: Sequence[int], sizes: Sequence[int], spills: Sequence[str | None]) -> int:
    """Put the pieces in order at the start of data.jsonl; returns the final size. Pieces written into data.jsonl
    (at ``positions``) move down first, in order, then up, from the last (neither overwrites a piece not yet
    moved); then the spill files of the pieces written apart (``spills[k]``) are copied into the gaps left."""
    if not any(spills):
        return compact(path, positions, sizes)
    finals = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    with open(path, "r+b") as f:
        fd = f.fileno()
        inside = [k for k in range(len(sizes)) if not spills[k]]
        for k in inside:
            if finals[k] < positions[k]:
                _move(fd, fd, positions[k], finals[k], sizes[k], up=False)
        for k in reversed(inside):
            if finals[k] > positions[k]:
                _move(fd, fd, positions[k], finals[k], sizes[k], up=True)
        for k, spill in enumerate(spills):
            if spill:
                src = os.open(spill, os.O_RDONLY)
                try:
                    _move(src, fd, 0, finals[k], sizes[k], up=False)
                finally:
                    os.close(src)
                os.unlink(spill)
        f.truncate(finals[-1])
    return finals[-1]


def _move(src: int, dst: int, a: int, b: int, size: int, up: bool) -> None:
    """Copy ``size`` bytes from ``src`` at ``a`` to ``dst`` at ``b``, in blocks; from the end when ``up`` (the
    ranges may overlap within one file)."""
    step = 1 << 24
    if src != dst:
        try:
            done = 0
            while done < size:
                n = os.copy_file_range(src, dst, size - done, a + done, b + done)
                if n <= 0:
                    break
                done += n
            if done == size:
                return
        except (AttributeError, OSError):
            pass
    starts = range(0, size, step)
    for off in (reversed(starts) if up else starts):
        n = min(step, size - off)
        block = os.pread(src, n, a + off)
        if len(block) != n:
            raise ConvertError(f"internal error: short read moving a piece ({len(block)} of {n} bytes)")
        os.pwrite(dst, block, b + off)


def compact(path: str, positions: Sequence[int], sizes: Sequence[int]) -> int:
    """Close the gaps left between pieces that dropped lines; returns the final size."""
    end = 0
    with open(path, "r+b") as f:
        for pos, size in zip(positions, sizes):
            if pos != end:  # move the piece down; reading ahead of writing is safe since end < pos
                for a in range(0, size, 1 << 24):
                    n = min(1 << 24, size - a)
                    block = os.pread(f.fileno(), n, pos + a)
                    os.pwrite(f.fileno(), block, end + a)
            end += size
        f.truncate(end)
    return end


def write_offsets(tmp: str, index_name: str, results: Sequence[PartResult], nlines: int,
                  moved: Sequence[bool]) -> None:
    """Write the text index and index.h5 (n+1 offsets from 0) from the pieces' line lengths, then remove the
    workers' side files (see ``PartResult``).

    The text lines of a piece that stayed where it started writing (``moved[k]`` false) were formatted by its
    worker and are copied as they are; a piece that moved is re-formatted here from its lengths.
    """
    import h5py

    block = 1 << 20
    sides = {r.side: None for r in results if r.side}
    fds = {}
    try:
        for side in sides:
            fds[side] = (os.open(side + ".len", os.O_RDONLY), os.open(side + ".txt", os.O_RDONLY))
        with open(os.path.join(tmp, index_name), "wb") as txt, \
                h5py.File(os.path.join(tmp, index_name + ".h5"), "w") as h5:
            dset = h5.create_dataset("index", shape=(nlines + 1,), dtype="<i8")  # default layout: contiguous
            pending, npending, written = [np.zeros(1, np.int64)], 1, 0  # offsets go to HDF5 in blocks

            def flush() -> None:
                nonlocal pending, npending, written
                if npending:
                    dset[written:written + npending] = np.concatenate(pending)
                pending, npending, written = [], 0, written + npending

            txt.write(b"0\n")
            base, pos = 0, 1
            for res, piece_moved in zip(results, moved):
                if not res.nlines:
                    continue
                len_fd, txt_fd = fds[res.side]
                if not piece_moved:
                    for a in range(res.txt_at, res.txt_end, block):
                        txt.write(os.pread(txt_fd, min(block, res.txt_end - a), a))
                for a in range(0, res.nlines, block):
                    n = min(block, res.nlines - a)
                    lens = np.frombuffer(os.pread(len_fd, 8 * n, res.len_at + 8 * a), dtype="<i8")
                    if len(lens) != n:
                        raise ConvertError(f"internal error: {res.side}.len is shorter than its pieces")
                    offs = np.cumsum(lens) + base
                    pending.append(offs)
                    npending += n
                    if npending >= block:
                        flush()
                    if piece_moved:
                        txt.write(format_offsets(offs))
                    base, pos = int(offs[-1]), pos + n
            flush()
            if pos != nlines + 1 or written != nlines + 1:
                raise ConvertError(f"internal error: wrote {pos} offsets for {nlines} lines")
    finally:
        for pair in fds.values():
            for fd in pair:
                os.close(fd)
        for side in sides:
            for ext in (".len", ".txt"):
                os.unlink(side + ext)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- main flow

@dataclass
class _Report:
    skipped: dict[str, int]
    first: list[dict]


def _missing_final_newline(path: str, size: int) -> bool:
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def part_positions(files: Sequence[str], sizes: Sequence[int], segments: list[list[Segment]],
                   spills: Sequence[str | None] = ()) -> list[int]:
    """Where each piece starts writing in data.jsonl: the most its predecessors can write.

    A piece writes at most its input bytes plus one newline per file whose last line lacks one; when no
    line is dropped the pieces tile data.jsonl exactly and need no copying afterwards. A piece with a spill
    file (``spills[k]``) writes there from 0 and takes no room; a compressed or Parquet piece written into
    data.jsonl is never followed by another one there (see ``_spills``).
    """
    no_nl = [file_kind(f) == PLAIN and _missing_final_newline(f, n) for f, n in zip(files, sizes)]
    positions, pos = [], 0
    for k, segs in enumerate(segments):
        if spills and spills[k]:
            positions.append(0)
            continue
        positions.append(pos)
        pos += sum(s.end - s.start + (no_nl[s.file_idx] and s.end == sizes[s.file_idx]) for s in segs
                   if file_kind(files[s.file_idx]) == PLAIN)
    return positions


def _spills(files: Sequence[str], pieces: list[list[Segment]], tmp: str) -> list[str | None]:
    """A spill file for each piece whose output size is unknown (compressed or Parquet input) if another piece
    follows it in data.jsonl; the first piece always writes into data.jsonl (it starts at 0)."""
    unknown = [any(file_kind(files[s.file_idx]) != PLAIN for s in segs) for segs in pieces]
    spills: list[str | None] = [None] * len(pieces)
    if len(pieces) > 1 and (not unknown[0] or not all(unknown)):
        spills = [os.path.join(tmp, f".spill-{k}") if u else None for k, u in enumerate(unknown)]
    elif len(pieces) > 1:  # all unknown: the first piece writes into data.jsonl, the others apart
        spills = [None] + [os.path.join(tmp, f".spill-{k}") for k in range(1, len(pieces))]
    return spills


def _run_parts(files: list[str], sizes: list[int], tmp: str, opts: Options,
               row_groups: dict[int, list[int]] | None = None,
               ) -> tuple[list[PartResult], list[list[Segment]], list[int], list[str | None]]:
    row_groups = row_groups or {}
    if all(file_kind(f) == PLAIN for f in files):
        pieces = split_segments(files, sizes, opts.piece_count(sum(sizes)))
        spills: list[str | None] = [None] * len(pieces)
    else:
        pieces = plan_pieces(files, sizes, row_groups, opts)
        spills = _spills(files, pieces, tmp)
    positions = part_positions(files, sizes, pieces, spills)
    data_path = os.path.join(tmp, DATA_FILE)
    open(data_path, "wb").close()
    side = os.path.join(tmp, ".worker-")  # + worker number: each worker's line lengths and text index lines
    show = opts.progress if opts.progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        total = sum(sum(row_groups[i]) if i in row_groups else n for i, n in enumerate(sizes))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr)
    try:
        if opts.workers <= 1:
            done = convert_pieces(files, pieces, positions, data_path, side + "0", opts, PieceQueue(len(pieces)),
                                  bar.update if bar is not None else None, spills=spills)
        else:
            done = _run_workers(files, pieces, data_path, positions, side, opts, bar, spills)
    finally:
        if bar is not None:
            bar.close()
    if len(done) < len(pieces) and not any(r.strict_error for r in done.values()):
        raise ConvertError(f"internal error: {len(pieces) - len(done)} of {len(pieces)} pieces were not converted")
    # Pieces left after a --strict error were never started: they hold no line and no report.
    return [done.get(k) or PartResult() for k in range(len(pieces))], pieces, positions, spills


def _run_workers(files, pieces, data_path, positions, side, opts, bar, spills) -> dict[int, PartResult]:
    """``opts.workers - 1`` forked worker processes and this one (one fork fewer, and this process would
    otherwise only wait) convert the pieces a shared ``PieceQueue`` hands out."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    queue = PieceQueue(len(pieces), ctx)
    shown = 0

    def show(n: int = 0) -> None:  # this process's bytes (n) plus what the workers reported
        nonlocal shown
        if bar is not None:
            with counter.get_lock():
                counter.value += n
                done = counter.value
            bar.update(done - shown)
            shown = done

    procs = []
    try:
        for w in range(1, opts.workers):
            recv, send = ctx.Pipe(duplex=False)
            job = (files, pieces, positions, data_path, f"{side}{w}", opts, queue, os.getpid(), spills)
            proc = ctx.Process(target=worker_entry, args=(send, counter, job), daemon=True)
            proc.start()
            send.close()
            procs.append((proc, recv))
        try:
            results = convert_pieces(files, pieces, positions, data_path, side + "0", opts, queue, show,
                                     spills=spills)
        except BaseException:
            queue.stop()
            raise
        for proc, recv in procs:
            while not recv.poll(0.2):  # also true when the worker exits: its end of the pipe closes
                show()
            try:
                ok, value = recv.recv()
            except EOFError:
                proc.join()
                raise ConvertError(f"convert worker (pid {proc.pid}) died with exit code {proc.exitcode} "
                                   "before finishing its pieces; nothing was written to --output") from None
            if not ok:
                raise value
            results.update(value)
        show()
        return results
    finally:
        for proc, recv in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
            recv.close()


def _locate(files, segments_per_part, results) -> Callable[[int, int, int], tuple[str, int]]:
    """Map (piece, segment, line in segment) to (file, 1-based line number in that file)."""
    first_line: dict[tuple[int, int], int] = {}
    lines_before = [0] * len(files)
    for p, (segs, res) in enumerate(zip(segments_per_part, results)):
        for s, seg in enumerate(segs):
            first_line[(p, s)] = lines_before[seg.file_idx]
            if s < len(res.seg_lines):
                lines_before[seg.file_idx] += res.seg_lines[s]

    def locate(p: int, s: int, line: int) -> tuple[str, int]:
        return files[segments_per_part[p][s].file_idx], first_line[(p, s)] + line + 1

    return locate


def convert(path: str, output: str, opts: Options) -> dict:
    """Convert ``path`` (a jsonl file or a directory of them) into the index directory ``output``."""
    if opts.language not in ESTIMATE_FACTORS:
        raise ConvertError(f"--language {opts.language!r}: choose one of {', '.join(ESTIMATE_FACTORS)}")
    name = opts.index_name
    if not name or os.sep in name or name in (DATA_FILE, META_FILE) or name.startswith("."):
        raise ConvertError(f"--hdfs_name {name!r}: must be a plain file name other than data.jsonl/meta.json")
    if opts.tokenizer:
        from fm.tokenizer import resolve_tokenizer

        try:
            opts.tokenizer = resolve_tokenizer(opts.tokenizer)
        except FileNotFoundError as e:
            raise ConvertError(f"--tokenizer {opts.tokenizer}: {e}") from None
    fmt = RecordFormat(opts.json_keys)  # a bad --json-keys fails before anything is read
    check_paths(path, output, name, opts.overwrite)
    files = find_inputs(path)
    sizes = [os.path.getsize(f) for f in files]
    row_groups = {}  # Parquet inputs: their schema is checked, and their row groups planned, before any is read
    for i, f in enumerate(files):
        if file_kind(f) == PARQUET:
            try:
                row_groups[i] = parquet_row_groups(f, fmt.input_key, fmt.output_key)
            except FmError as e:
                raise ConvertError(str(e)) from None
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, os.path.basename(output))
    # mkdir (not mkdtemp) so the result gets the usual umask permissions, not 0700.
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(tmp)
        meta = _convert_into(files, sizes, tmp, opts, row_groups)
        _install(tmp, output, opts.fsync)
    except OSError as e:  # a full disk, a lost mount, a permission: one line naming the path and the cause
        shutil.rmtree(tmp, ignore_errors=True)
        where = e.filename or tmp
        raise ConvertError(f"converting {path} into {output}: {where}: {e.strerror or e}; nothing was written to "
                           "--output and the partial files were removed") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _remove_stale(parent: str, name: str) -> None:
    """Remove what killed conversions into ``name`` left: temp dirs whose pid is gone, and the moved-aside old
    output of an install that finished (one that did not is left for the user: it may be the only copy)."""
    for n in os.listdir(parent):
        full = os.path.join(parent, n)
        tmp = re.fullmatch(rf"\.{re.escape(name)}\.tmp-(\d+)-[0-9a-f]+", n)
        old = n.startswith(f".{name}.old-")
        if tmp and int(tmp.group(1)) != os.getpid() and _pid_alive(int(tmp.group(1))):
            log.warning("%s: a running conversion (pid %s) is writing it; leaving it alone", full, tmp.group(1))
        elif tmp or (old and os.path.isdir(os.path.join(parent, name))):
            shutil.rmtree(full, ignore_errors=True)
            log.warning("removed %s, left by an interrupted conversion", full)
        elif old:
            log.warning("%s holds the previous %s of an interrupted conversion, and %s is missing: move it back or "
                        "delete it", full, name, os.path.join(parent, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _convert_into(files: list[str], sizes: list[int], tmp: str, opts: Options,
                  row_groups: dict[int, list[int]] | None = None) -> dict:
    t0 = time.perf_counter()
    results, segments, positions, spills = _run_parts(files, sizes, tmp, opts, row_groups)
    locate = _locate(files, segments, results)
    for p, res in enumerate(results):
        if res.strict_error is not None:
            s, line, reason = res.strict_error
            f, ln = locate(p, s, line)
            raise StrictError(f"{f}:{ln}: {reason} (--strict: fix or remove the line, or run without --strict "
                              "to skip bad lines)")
    report = _merge_report(results, locate)
    nlines = sum(r.nlines for r in results)
    _print_report(report)
    if nlines == 0:
        fmt = RecordFormat(opts.json_keys)
        hint = ""
        if "missing_output" in report.skipped:
            hint = (f"; {report.skipped['missing_output']} line(s) have no {fmt.output_key!r} key: if the text is "
                    "under another key (e.g. {\"text\": ...}), name it with --json-keys text "
                    "(or --json-keys INPUT OUTPUT)")
        raise ConvertError(f"no valid line in {len(files)} input file(s) ({sum(report.skipped.values())} skipped); "
                           f"every line must be a JSON object with a string {fmt.output_key!r}{hint}")
    data_path = os.path.join(tmp, DATA_FILE)
    nbytes = [r.nbytes for r in results]
    assemble(data_path, positions, nbytes, spills)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).tolist()
    write_offsets(tmp, opts.index_name, results, nlines, [s != p for s, p in zip(starts, positions)])
    counter = TokenCounter(opts.language, None) if not opts.tokenizer else None
    factor = counter.factor if counter else 1.0
    buckets = np.sum([r.buckets for r in results], axis=0).tolist()
    sample = next(r.sample for r in results if r.sample is not None)
    meta = {
        "language": opts.language,
        "nlines": nlines,
        "nbytes": sum(r.nbytes for r in results),
        "length_distribute": dict(zip(BUCKETS, map(int, buckets))),
        "avg_token_per_line": factor * sum(r.count_sum for r in results) / nlines,
        "hdfs_path": opts.index_name,
        "data_sample": cut_sample(json.loads(sample)),
        "format_version": FORMAT_VERSION,
        "json_keys": list(opts.json_keys),
        "index_name": opts.index_name,
        "token_count_method": f"tokenizer:{os.path.abspath(opts.tokenizer)}" if opts.tokenizer else "estimate",
        "skipped": {"total": sum(report.skipped.values()), "by_reason": report.skipped, "first": report.first},
        "source_files": len(files),
        "source_bytes": sum(sizes),
    }
    if meta["nbytes"] != os.path.getsize(data_path):
        raise ConvertError(f"internal error: {data_path} has {os.path.getsize(data_path)} bytes, "
                           f"expected {meta['nbytes']}")
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
    dt = time.perf_counter() - t0
    log.info("%d lines, %.1f MB in %.2f s (%.0f MB/s)", nlines, meta["nbytes"] / 1e6, dt,
             sum(sizes) / 1e6 / max(dt, 1e-9))
    return meta


def _merge_report(results: list[PartResult], locate) -> _Report:
    skipped: dict[str, int] = {}
    first: list[dict] = []
    for p, res in enumerate(results):
        for reason, n in res.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        for s, line, reason in res.first_bad:
            if len(first) < MAX_REPORTED:
                f, ln = locate(p, s, line)
                first.append({"file": f, "line": ln, "reason": reason})
    return _Report({r: skipped[r] for r in REASONS if r in skipped}, first)


def _print_report(report: _Report) -> None:
    if not report.skipped:
        return
    total = sum(report.skipped.values())
    lines = [f"skipped {total} line(s): " + ", ".join(f"{r}={n}" for r, n in report.skipped.items())]
    lines += [f"  {e['file']}:{e['line']}: {e['reason']}" for e in report.first]
    if total > len(report.first):
        lines.append(f"  ... ({total - len(report.first)} more; the first {MAX_REPORTED} are in meta.json)")
    print("\n".join(lines), file=sys.stderr)


def _install(tmp: str, output: str, fsync: bool) -> None:
    """Rename the finished temp dir into place; an old output is moved aside first and removed after."""
    if fsync:
        for n in os.listdir(tmp):
            _fsync_path(os.path.join(tmp, n))
        _fsync_path(tmp)
    old = None
    if os.path.isdir(output):
        if os.listdir(output):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
            os.rename(output, os.path.join(old, "x"))
        else:
            os.rmdir(output)
    os.rename(tmp, output)
    if fsync:
        _fsync_path(os.path.dirname(output))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fm convert",
        description="Convert jsonl files ({\"input\": ..., \"output\": ...} per line, or {\"text\": ...} with "
                    "--json-keys text) into an index directory. Also read, streamed (never unpacked to disk): "
                    "gzip (.jsonl.gz) and zstandard (.jsonl.zst) jsonl, and Parquet (.parquet, e.g. FineWeb: each "
                    "row becomes one JSON line, --json-keys names the text column). Output: "
                    "data.jsonl (the valid lines), index (text offsets), index.h5 (the same offsets, memory-mappable) "
                    "and meta.json (statistics and the skipped-line report). Bad lines are skipped, counted and "
                    "reported (file:line and reason). The output is written to a temporary directory and renamed "
                    "into place only when complete.",
        epilog="example: fm convert --path data/ --language zh --output data_index/ --tokenizer tokenizer.model\n"
               "(python quick_start/convert_json2index.py takes the same options)\n"
               "exit codes: 0 ok, 1 error (bad arguments, refused output, no valid line), 2 --strict found a bad line",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", "-p", required=True,
                   help="an input file (.jsonl; .gz/.zst: compressed jsonl; .parquet), or a directory searched "
                        "recursively for *.jsonl, *.jsonl.gz, *.jsonl.zst and *.parquet (read in sorted order)")
    p.add_argument("--language", "-l", required=True, choices=sorted(ESTIMATE_FACTORS),
                   help="language of the text, for token estimates without --tokenizer "
                        "(zh: 0.7 x characters, en: 1.5 x words, code: 0.3 x characters)")
    p.add_argument("--output", "-o", required=True,
                   help="output index directory (must not be the input directory, nor inside it, nor contain it)")
    p.add_argument("--hdfs_name", "-hdfs", default="index", metavar="NAME",
                   help="file name of the offsets index (NAME and NAME.h5; default: index); kept for upstream "
                        "compatibility, nothing is uploaded")
    p.add_argument("--json-keys", nargs="+", default=["input", "output"], metavar="KEY",
                   help="the keys of each record's text: one key (e.g. --json-keys text, Megatron's name for the "
                        "option) is trained on whole; two keys INPUT OUTPUT are a prompt (masked: no loss, may be "
                        "missing) and its answer (trained on). Default: input output. Other keys are kept in "
                        "data.jsonl for transforms; the keys are recorded in meta.json for the loader. For Parquet "
                        "the keys are column names (the other columns become the other keys)")
    p.add_argument("--tokenizer", metavar="TOKENIZER",
                   help="SentencePiece .model, tokenizer.json or HF tokenizer directory (or 'demo', the shipped one): "
                        "count tokens exactly (input + output tokens per line) instead of estimating them")
    p.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                   help="worker processes (0: one per CPU core; default 1); the output is identical for any N")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit code 2) at the first bad line instead of skipping it; blank lines are still "
                        "only skipped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory, only if it holds a previous index output "
                        "(meta.json + index)")
    p.add_argument("--chunk-mb", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown when stderr is a TTY)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not fsync the output before renaming it into place (faster, not crash-safe on power loss)")
    return p


def exit_on_sigterm() -> None:
    """SIGTERM (e.g. from slurm) becomes SystemExit in this process, so the temp directory is removed. The worker
    processes are forked with this handler; the parent terminates them (SIGTERM) when the conversion fails, and a
    SystemExit raised wherever a worker then was (a finaliser, multiprocessing's teardown) printed "Exception
    ignored ... Traceback". A forked worker leaves at once instead: its partial files are the parent's to remove."""
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    opts = Options(language=args.language, index_name=args.hdfs_name, tokenizer=args.tokenizer, workers=workers,
                   strict=args.strict, overwrite=args.overwrite, chunk_size=int(args.chunk_mb * (1 << 20)),
                   progress=False if args.no_progress else None, fsync=not args.no_fsync,
                   json_keys=tuple(args.json_keys))
    exit_on_sigterm()
    try:
        meta = convert(args.path, args.output, opts)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    skipped = meta["skipped"]["total"]
    print(f"wrote {args.output}: {meta['nlines']} lines, {meta['nbytes']} bytes, "
          f"avg {meta['avg_token_per_line']:.1f} tokens/line ({meta['token_count_method']})"
          + (f", {skipped} line(s) skipped" if skipped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
