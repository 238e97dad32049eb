"""Random access to an index directory written by ``convert_json2index.py`` (ours or upstream's).

An index directory holds ``data.jsonl`` (one JSON object per line) and the byte offsets of its lines,
as text (``index``) and/or HDF5 (``index.h5``, one int64 dataset named ``index``), plus ``meta.json``.

Two offset layouts exist:

* ours: n+1 offsets starting at 0 — line i is bytes ``[off[i], off[i+1])``;
* upstream FM9G: the n *end* offsets only (no leading 0). Upstream's own reader treated them as
  n+1 offsets and so silently lost line 0. We detect this layout (the first value is not 0: a line is
  at least one byte, so the first end offset is never 0) and read line 0 too.

Opening is O(1) for our output: ``index.h5`` written by h5py is contiguous, so the offsets are a
``np.memmap`` into the HDF5 file (no copy, no parse). A chunked or compressed ``index.h5`` is read
into one numpy array; a text-only ``index`` is parsed by numpy (``np.fromfile(sep="\\n")``) into memory
each time it is opened. We never write a cache next to a user's dataset: rebuilding the directory with
the converter gives the h5 file and the O(1) path.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
META_FILE = "meta.json"
DEFAULT_INDEX_NAME = "index"
# The layout of an index directory. 1: fm's first converter; 2: meta.json names the records' keys (json_keys).
# Upstream's meta.json has no format_version: its layout is version 1's.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

try:  # msgspec decodes faster than json (docs/benchmarks.md); a hard dependency of the converter anyway
    import msgspec

    _decode = msgspec.json.Decoder().decode
except ImportError:  # pragma: no cover
    _decode = json.loads


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); rebuild the index with convert_json2index.py") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version", 1)
    if version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{meta_path}: format_version {version!r} is not supported (this fm reads versions "
                         f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}): convert the data again with this fm "
                         "(fm convert), or read it with the fm that wrote it")
    keys = meta.get("json_keys")
    if keys is not None and not valid_json_keys(keys):
        raise ValueError(f"{meta_path}: json_keys must be a list of one or two different key names, got {keys!r}")
    return meta


def valid_json_keys(keys) -> bool:
    """``[output]`` or ``[input, output]``: one or two different non-empty strings."""
    return (isinstance(keys, list) and len(keys) in (1, 2) and all(isinstance(k, str) and k for k in keys)
            and len(set(keys)) == len(keys))


def index_name(path: str, meta: dict) -> str:
    """The base name of the offsets files: ``index`` unless the converter was run with ``--hdfs_name``.

    Ours records it as ``index_name``; upstream only has ``hdfs_path`` (``/user/.../<name>``), whose base
    name we try; if neither names an existing file we fall back to ``index``.
    """
    candidates = []
    if isinstance(meta.get("index_name"), str):
        candidates.append(meta["index_name"])
    if isinstance(meta.get("hdfs_path"), str) and meta["hdfs_path"].strip("/"):
        candidates.append(os.path.basename(meta["hdfs_path"].rstrip("/")))
    candidates.append(DEFAULT_INDEX_NAME)
    for name in candidates:
        if os.path.isfile(os.path.join(path, name + ".h5")) or os.path.isfile(os.path.join(path, name)):
            return name
    return DEFAULT_INDEX_NAME


def _open_h5_offsets(h5_path: str) -> tuple[np.ndarray, str]:
    try:
        return _read_h5_offsets(h5_path)
    except OSError as e:  # h5py's messages ("truncated file: eof = ...") do not name the file
        raise ValueError(f"{h5_path}: not a readable HDF5 index ({e}); the file is truncated or damaged: rebuild the "
                         "index with convert_json2index.py") from e


def _read_h5_offsets(h5_path: str) -> tuple[np.ndarray, str]:
    fast = _map_contiguous_h5(h5_path)
    if fast is not None:
        return fast
    import h5py

    with h5py.File(h5_path, "r") as f:
        if "index" not in f:
            raise ValueError(f"{h5_path}: no dataset named 'index' (found {sorted(f.keys())}); "
                             "rebuild the index with convert_json2index.py")
        dset = f["index"]
        if dset.ndim != 1 or dset.dtype.kind not in "iu":
            raise ValueError(f"{h5_path}: dataset 'index' must be a 1-D integer array, "
                             f"got shape {dset.shape} dtype {dset.dtype}")
        n = dset.shape[0]
        offset = dset.id.get_offset() if dset.chunks is None else None
        if n == 0:
            return np.zeros(0, dtype=np.int64), "h5"
        if offset is not None:
            # Contiguous: the raw values sit at a fixed byte offset, so map them (O(1) open).
            if offset + n * dset.dtype.itemsize > os.path.getsize(h5_path):
                raise OSError(f"its {n} offsets end past the end of the file")
            return np.memmap(h5_path, dtype=dset.dtype, mode="r", offset=offset, shape=(n,)), "h5-mmap"
        return dset[:].astype(np.int64, copy=False), "h5-read"


def _map_contiguous_h5(h5_path: str) -> tuple[np.ndarray, str] | None:
    """The converter's layout (one contiguous 1-D integer dataset ``index``) through h5py's low-level API, which
    opens in half the time of ``h5py.File`` (a mixture may open thousands); None: read it the general way."""
    import h5py

    fid = h5py.h5f.open(os.fsencode(h5_path), h5py.h5f.ACC_RDONLY)
    try:
        try:
            dset = h5py.h5d.open(fid, b"index")
        except KeyError:
            return None  # the general path names what the file holds
        try:
            shape, dtype = dset.shape, dset.dtype
            if len(shape) != 1 or dtype.kind not in "iu" or \
                    dset.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
                return None
            offset = dset.get_offset()
        finally:
            dset.close()
    finally:
        fid.close()
    n = shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), "h5"
    if offset is None:
        return None
    if offset + n * dtype.itemsize > os.path.getsize(h5_path):
        raise OSError(f"its {n} offsets end past the end of the file")
    return np.memmap(h5_path, dtype=dtype, mode="r", offset=offset, shape=(n,)), "h5-mmap"


def _parse_text_offsets(text_path: str) -> np.ndarray:
    size = os.path.getsize(text_path)
    try:
        offsets = np.fromfile(text_path, dtype=np.int64, sep="\n") if size else np.zeros(0, dtype=np.int64)
    except ValueError as e:  # numpy >= 2.3 raises on unparsable text, older versions stop quietly
        raise ValueError(f"{text_path}: not a list of integers ({e}); "
                         "rebuild the index with convert_json2index.py") from e
    # np.fromfile stops quietly at the first bad token: check that every line was read.
    with open(text_path, "rb") as f:
        nlines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
        f.seek(max(size - 1, 0))
        if size and f.read(1) != b"\n":
            nlines += 1
    if len(offsets) != nlines:
        raise ValueError(f"{text_path}: line {len(offsets) + 1} is not an integer; "
                         "rebuild the index with convert_json2index.py")
    return offsets


class IndexedDataset:
    """``ds[i]`` → raw jsonl line i (bytes, no newline); ``ds.record(i)`` → parsed dict.

    ``ds.offsets`` gives the n+1 line offsets, ``ds.get_many(indices)`` many lines at once. Safe to pass to
    DataLoader workers (fork or spawn): the data file is mapped again in each process, and pickling sends
    only the path.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"index directory not found: {path} "
                                    "(create it with fm convert)")
        self.data_path = os.path.join(self.path, DATA_FILE)
        if not os.path.isfile(self.data_path):
            raise FileNotFoundError(f"{self.data_path} not found: {path} is not an index directory "
                                    "(create it with fm convert)")
        self.meta: dict = read_meta(self.path)
        self.index_name = index_name(self.path, self.meta)
        self._open_offsets()
        self._mm: mmap.mmap | bytes | None = None
        self._mm_pid: int | None = None
        self._full_offsets: np.ndarray | None = None

    def _open_offsets(self) -> None:
        h5_path = os.path.join(self.path, self.index_name + ".h5")
        text_path = os.path.join(self.path, self.index_name)
        if os.path.isfile(h5_path):
            self._off, self.index_source = _open_h5_offsets(h5_path)
            src = h5_path
        elif os.path.isfile(text_path):
            log.info("%s: no %s.h5, parsing the text index into memory", self.path, self.index_name)
            self._off, self.index_source = _parse_text_offsets(text_path), "text"
            src = text_path
        else:
            raise FileNotFoundError(f"{self.path}: neither {self.index_name}.h5 nor {self.index_name} exists; "
                                    "rebuild the index with convert_json2index.py")
        # Upstream wrote end offsets only; ours start with 0 (see the module docstring).
        self.upstream_format = len(self._off) > 0 and int(self._off[0]) != 0
        self._n = len(self._off) if self.upstream_format else max(len(self._off) - 1, 0)
        self.nbytes = int(self._off[-1]) if len(self._off) else 0
        data_size = os.path.getsize(self.data_path)
        if self.nbytes != data_size:
            raise ValueError(f"{src}: last offset {self.nbytes} != size of {self.data_path} ({data_size} bytes); "
                             "the index does not belong to this data.jsonl: rebuild it with convert_json2index.py")

    def __len__(self) -> int:
        return self._n

    def span(self, i: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of line i in data.jsonl, newline included."""
        i = self._check(i)
        if self.upstream_format:
            return (int(self._off[i - 1]) if i else 0), int(self._off[i])
        return int(self._off[i]), int(self._off[i + 1])

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"line {i} out of range for {self.path} ({self._n} lines)")
        return i

    def _data(self) -> mmap.mmap | bytes:
        # One read-only mapping per process (a forked child re-maps: cheap, and never shares a stale one).
        if self._mm is None or self._mm_pid != os.getpid():
            if self.nbytes == 0:
                self._mm = b""
            else:
                with open(self.data_path, "rb") as f:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._mm_pid = os.getpid()
        return self._mm

    @property
    def offsets(self) -> np.ndarray:
        """The n+1 byte offsets of the lines (line i is ``[offsets[i], offsets[i+1])``, newline included).

        A zero-copy view of the memory-mapped index for our format; built once (O(n)) for upstream's.
        """
        if not self.upstream_format:
            return self._off if len(self._off) else np.zeros(1, dtype=np.int64)
        if self._full_offsets is None:
            self._full_offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.asarray(self._off, np.int64)])
        return self._full_offsets

    def get_many(self, indices) -> list[bytes]:
        """Raw lines (bytes, without the newline) for an array of line numbers, vectorised."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return []
        idx = np.where(idx < 0, idx + self._n, idx)
        if idx.min() < 0 or idx.max() >= self._n:
            bad = int(idx[(idx < 0) | (idx >= self._n)][0])
            raise IndexError(f"line {bad} out of range for {self.path} ({self._n} lines)")
        if self.upstream_format:
            ends = np.asarray(self._off[idx], dtype=np.int64)
            starts = np.where(idx > 0, np.asarray(self._off[np.maximum(idx - 1, 0)], dtype=np.int64), 0)
        else:
            starts = np.asarray(self._off[idx], dtype=np.int64)
            ends = np.asarray(self._off[idx + 1], dtype=np.int64)
        mm = self._data()
        # Drop the newline; a last line written without one (possible in upstream data) keeps its last byte.
        ends = ends - (np.frombuffer(mm, dtype=np.uint8)[ends - 1] == 10)
        return [mm[s:e] for s, e in zip(starts.tolist(), ends.tolist())]

    def __getitem__(self, key: int | slice) -> bytes | list[bytes]:
        if isinstance(key, slice):
            return self.get_many(np.arange(*key.indices(self._n)))
        return self.get_many([self._check(key)])[0]

    def record(self, i: int) -> dict[str, Any]:
        line = self[i]
        try:
            rec = _decode(line)
        except Exception as e:
            raise ValueError(f"{self.data_path}: line {self._check(i) + 1} is not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{self.data_path}: line {self._check(i) + 1} is not a JSON object")
        return rec

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self._n):
            yield self[i]

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap) and self._mm_pid == os.getpid():
            self._mm.close()
        self._mm = None

    # Pickle by path: a memmap would otherwise be pickled as a full copy of the offsets.
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.path!r}, lines={self._n}, index={self.index_source})"
