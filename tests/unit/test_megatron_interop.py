"""MegatronDataset reads files written by megatron-core's own IndexedDatasetBuilder (the reference)."""

from __future__ import annotations

import megatron.core.datasets.indexed_dataset as mcore  # pinned in requirements-dev.txt: missing is a failure
import numpy as np
import pytest
import torch

from fm.data.megatron import MegatronDataset


def _build(prefix, docs, dtype):
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        if isinstance(doc, tuple):  # a document made of several sequences
            for seq in doc:
                builder.add_item(torch.tensor(seq))
        else:
            builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_reads_megatron_builder_output(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(n)).tolist() for n in rng.integers(1, 50, size=20)]
    docs.append(([1, 2, 3], [4, 5]))  # two sequences in one document
    prefix = str(tmp_path / "corpus_text_document")
    _build(prefix, docs, dtype)

    ds = MegatronDataset(prefix)
    ref = mcore.IndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_sequences == len(ref)
    for j in range(len(ref)):
        np.testing.assert_array_equal(ds.sequence(j), ref[j])
    np.testing.assert_array_equal(ds.document_indices, ref.document_indices)
    for i, doc in enumerate(docs):
        want = sum(doc, []) if isinstance(doc, tuple) else doc
        assert ds[i].tolist() == want
        assert ds.document_length(i) == len(want)
    assert ds[-1].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(IndexError):
        ds[len(docs)]
    assert MegatronDataset(prefix + ".bin")[0].tolist() == docs[0]


def test_bad_header(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTMEGATRON" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="magic"):
        MegatronDataset(str(tmp_path / "x"))


def test_missing_pair(tmp_path):
    with pytest.raises(FileNotFoundError, match="prefix"):
        MegatronDataset(str(tmp_path / "nothing"))
