"""Line order: which line of a dataset a stream reads next, in O(1) memory, and how it reshards.

Dataset d's lines form an ordered *sequence*: epoch e is a deterministic permutation ``P_{d,e}`` (a keyed
Feistel network, :func:`permute`), and epochs of an ``allow_repeat`` dataset follow each other (an infinite
sequence). Stream v of V takes sequence positions ``v, v+V, v+2V, …``, so its progress in a dataset is one
counter ``n``. Resuming with a different V' turns what is left of the sequence (the positions no stream took)
into a new, shorter sequence that the V' streams share the same interleaved way: a :class:`Layer` described by
the V old counters alone. A dataset's order is therefore a short chain of layers, compacted
(:func:`compact_layers`) as soon as the holes they describe are filled. See docs/mixtures.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Up to this many lines a whole epoch's permutation is cached (32 KB); larger datasets, and the many small
# ones of a large mixture, evaluate the permutation at the positions they read (a few µs per refill).
SMALL_DATASET = 1 << 12


def stable_key(*parts: Any) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a good 64-bit hash with numpy's wrapping uint64 arithmetic
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed pseudo-random permutation of ``range(n)`` evaluated at ``positions`` (O(1) memory).

    Feistel network on the smallest even bit width covering n, with cycle walking to stay below n.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 2:
        return positions.astype(np.int64) if n < 2 else (positions ^ np.uint64(key & 1)).astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(stable_key(key, r)) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    out = encrypt(positions)
    todo = np.flatnonzero(out >= np.uint64(n))
    while len(todo):  # cycle walking: expected < 4 rounds since the domain is < 4n
        out[todo] = encrypt(out[todo])
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


@dataclass
class Layer:
    """The positions of the parent sequence that V streams with counters ``n`` did not take, in order."""

    V: int
    n: list[int]
    parent_len: int | None  # None: infinite

    def __post_init__(self) -> None:
        V, n = self.V, np.asarray(self.n, dtype=np.int64)
        self.m, self.M = int(n.min()), int(n.max())
        hi = self.V * self.M if self.parent_len is None else min(self.V * self.M, self.parent_len)
        idx = np.arange(V * self.m, max(hi, V * self.m), dtype=np.int64)
        self.partial = idx[idx // V >= n[idx % V]]  # holes between the slowest and the fastest stream
        self.S = len(self.partial)
        self.length = None if self.parent_len is None else self.parent_len - int(n.sum())

    def map(self, j: np.ndarray) -> np.ndarray:
        j = np.asarray(j, dtype=np.int64)
        out = self.V * self.M + (j - self.S)
        inside = j < self.S
        if inside.any():
            out[inside] = self.partial[j[inside]]
        return out


def build_chain(layers: Sequence[Sequence], root_len: int | None) -> list[Layer]:
    chain: list[Layer] = []
    length = root_len
    for V, n in layers:
        layer = Layer(int(V), [int(x) for x in n], length)
        chain.append(layer)
        length = layer.length
    return chain


def compact_layers(layers: list, root_len: int | None, next_min: int) -> list:
    """Replace layers whose holes are all behind every stream (``next_min``: smallest next top index) by offsets."""
    chain = build_chain(layers, root_len)
    out: list = [None] * len(chain)
    a = np.asarray([next_min], dtype=np.int64)
    for k in range(len(chain) - 1, -1, -1):
        layer = chain[k]
        if int(a[0]) >= layer.S:
            out[k] = [1, [layer.V * layer.M - layer.S]]
        else:
            out[k] = [layer.V, list(layer.n)]
        a = layer.map(a)
    merged: list = []
    for V, n in out:  # bottom-up: fold consecutive offsets (identity layers vanish)
        if V == 1 and merged and merged[-1][0] == 1:
            merged[-1] = [1, [merged[-1][1][0] + n[0]]]
        else:
            merged.append([V, list(n)])
    return [layer for layer in merged if not (layer[0] == 1 and layer[1][0] == 0)]


class LineOrder:
    """Top-layer sequence positions of a dataset → line numbers (and epochs)."""

    def __init__(self, nlines: int, allow_repeat: bool, layers: Sequence, seed: int, task: str):
        self.nlines = nlines
        self.allow_repeat = allow_repeat and nlines > 0
        root_len = None if self.allow_repeat else nlines
        self.chain = build_chain(layers, root_len)
        self.length = self.chain[-1].length if self.chain else root_len  # None: infinite
        self.seed, self.task = seed, task
        self._cache: dict[int, np.ndarray] = {}  # small datasets: whole permutations of recent epochs

    def _permute(self, pos: np.ndarray, epoch: int) -> np.ndarray:
        key = stable_key(self.seed, self.task, epoch)
        if self.nlines > SMALL_DATASET:
            return permute(pos, self.nlines, key)
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = permute(np.arange(self.nlines), self.nlines, key)
        return self._cache[epoch][pos]

    def lines(self, top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(line numbers, epochs, root positions) of top-layer positions (all < length)."""
        g = np.asarray(top, dtype=np.int64)
        for layer in reversed(self.chain):
            g = layer.map(g)
        epochs = g // self.nlines
        pos = g - epochs * self.nlines
        first, last = int(epochs.min(initial=0)), int(epochs.max(initial=0))
        if first == last:  # the usual case: one epoch (np.unique costs more than the permutation here)
            return self._permute(pos, first), epochs, g
        lines = np.empty_like(pos)
        for e in range(first, last + 1):
            sel = epochs == e
            if sel.any():
                lines[sel] = self._permute(pos[sel], e)
        return lines, epochs, g
