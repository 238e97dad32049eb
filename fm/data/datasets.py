"""One way to open a dataset of either format, and the keys of its records.

``format: jsonl`` is an index directory (:class:`~fm.data.indexed.IndexedDataset`: ours, or upstream FM9G's);
``format: megatron`` a Megatron-Core ``.bin/.idx`` pair (:class:`~fm.data.megatron.MegatronDataset`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from fm.data.indexed import IndexedDataset
from fm.data.megatron import MegatronDataset

Dataset = IndexedDataset | MegatronDataset
DEFAULT_JSON_KEYS = ("input", "output")

_shared: dict[tuple[str, str], Dataset] | None = None


@contextlib.contextmanager
def shared_opens() -> Iterator[None]:
    """Within this block :func:`open_dataset` opens each dataset once: validating a mixture and counting its
    lines then cost one open per dataset (opening an HDF5 index is not free, and a mixture may list thousands;
    docs/benchmarks-loader.md)."""
    global _shared
    outer = _shared
    if outer is None:
        _shared = {}
    try:
        yield
    finally:
        if outer is None:
            _shared = None


def open_dataset(path: str, fmt: str = "jsonl") -> Dataset:
    """The dataset at ``path`` in ``fmt`` (``jsonl``: an index directory, ``megatron``: a ``.bin/.idx`` prefix)."""
    if _shared is not None and (path, fmt) in _shared:
        return _shared[(path, fmt)]
    if fmt == "megatron":
        ds: Dataset = MegatronDataset(path)
    elif fmt == "jsonl":
        ds = IndexedDataset(path)
    else:
        raise ValueError(f"{path}: unknown dataset format {fmt!r} (use 'jsonl' or 'megatron')")
    if _shared is not None:
        _shared[(path, fmt)] = ds
    return ds


def json_keys(configured: Sequence[str] | None, ds: Dataset) -> tuple[str | None, str]:
    """(input key or None, output key) of a jsonl dataset: ``configured`` (the mixture entry's ``json_keys``),
    else the ones the converter recorded in meta.json (``--json-keys``), else ``input``/``output``."""
    keys = configured or getattr(ds, "meta", {}).get("json_keys") or DEFAULT_JSON_KEYS
    return (None, keys[0]) if len(keys) == 1 else (keys[0], keys[1])
