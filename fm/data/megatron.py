"""Read a Megatron-Core tokenized dataset (``PREFIX.bin`` + ``PREFIX.idx``) without importing megatron.

``.idx`` layout (little endian), as written by ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``:

    b"MMIDIDX\\x00\\x00"   9-byte magic
    u64 version (1)
    u8  dtype code        (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    u64 sequence count S
    u64 document count D  (D = number of documents + 1: document_indices starts with 0)
    i32[S] sequence lengths (tokens)
    i64[S] sequence pointers (byte offsets into .bin)
    i64[D] document indices (sequence index where each document starts/ends)
    [i8[S] sequence modes, multimodal datasets only]

``ds[i]`` is document i: the tokens of sequences ``document_indices[i] .. document_indices[i+1]``, which the
builder writes back to back, so one memmap slice covers it.
"""

from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
VERSION = 1
# A .bin up to this size is scanned whole for out-of-vocabulary ids when opened (about a second); of a larger
# one only the first SCAN_BYTES are, and every document is checked when it is read.
SCAN_BYTES = 2 << 30


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class MegatronDataset:
    """``len(ds)`` documents; ``ds[i]`` → numpy array of token ids of document i (a read-only memmap view)."""

    def __init__(self, prefix: str):
        self.prefix = _strip_suffix(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} not found (MegatronDataset takes the common prefix of the "
                                        ".bin/.idx pair, e.g. data/my_text_document)")
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{self.idx_path}: not a Megatron-Core index (bad magic {header[:9]!r})")
        version, code, self.num_sequences, doc_count = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: index format version {version} is not supported (this fm reads "
                             f"version {VERSION}, what megatron-core writes)")
        if code not in DTYPES:
            raise ValueError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        s, d = self.num_sequences, doc_count
        need = _HEADER_SIZE + 4 * s + 8 * s + 8 * d
        idx_size = os.path.getsize(self.idx_path)
        if idx_size < need:
            raise ValueError(f"{self.idx_path}: truncated ({idx_size} bytes, header says at least {need})")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(idx, dtype="<i4", count=s, offset=_HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(idx, dtype="<i8", count=s, offset=_HEADER_SIZE + 4 * s)
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=d, offset=_HEADER_SIZE + 12 * s)
        self.sequence_modes = (np.frombuffer(idx, dtype=np.int8, count=s, offset=need)
                               if idx_size >= need + s and s else None)
        bin_size = os.path.getsize(self.bin_path)
        self._bin = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size
                     else np.zeros(0, dtype=self.dtype))
        if s and int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize > bin_size:
            raise ValueError(f"{self.bin_path}: shorter than {self.idx_path} says; the pair does not match")

    def __len__(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def sequence(self, j: int) -> np.ndarray:
        """Sequence j (the unit megatron's own ``IndexedDataset[j]`` returns)."""
        start = int(self.sequence_pointers[j]) // self.dtype.itemsize
        return self._bin[start:start + int(self.sequence_lengths[j])]

    def document_span(self, i: int) -> tuple[int, int]:
        """Sequence index range ``[a, b)`` of document i."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {self.prefix} ({n} documents)")
        return int(self.document_indices[i]), int(self.document_indices[i + 1])

    def __getitem__(self, i: int) -> np.ndarray:
        a, b = self.document_span(int(i))
        if a == b:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[a]) // self.dtype.itemsize
        length = int(self.sequence_lengths[a:b].sum())
        return self._bin[start:start + length]

    def document_length(self, i: int) -> int:
        a, b = self.document_span(i)
        return int(self.sequence_lengths[a:b].sum())

    def check_ids(self, vocab_size: int, where: str = "", scan_bytes: int | None = None) -> None:
        """Raise ValueError naming the file and the largest id if a token id is outside ``[0, vocab_size)``.

        Scans the first ``scan_bytes`` of the .bin (all of it when smaller); ids a dtype cannot hold beyond the
        vocabulary need no scan.
        """
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        if info is not None and info.min >= 0 and info.max < vocab_size:
            return
        step = max(1, (64 << 20) // self.dtype.itemsize)
        scan_bytes = SCAN_BYTES if scan_bytes is None else scan_bytes
        n = min(len(self._bin), max(0, scan_bytes) // self.dtype.itemsize)
        top, low = -1, 0
        for a in range(0, n, step):
            chunk = self._bin[a:min(n, a + step)]
            top, low = max(top, int(chunk.max())), min(low, int(chunk.min()))
        if top >= vocab_size or low < 0:
            scanned = "" if n == len(self._bin) else f" (in its first {n * self.dtype.itemsize} bytes)"
            raise ValueError(f"{self.bin_path}{' (' + where + ')' if where else ''}: largest token id {top}"
                             f"{f', smallest {low}' if low < 0 else ''}{scanned}, but the model's vocabulary is "
                             f"[0, {vocab_size}): the data was tokenized with another tokenizer; tokenize it again "
                             "with the model's tokenizer")

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"MegatronDataset({self.prefix!r}, documents={len(self)}, sequences={self.num_sequences})"
