"""IndexedDataset: our n+1 offsets, upstream's n end offsets, h5 vs text index, pickling, errors."""

from __future__ import annotations

import json
import os
import pickle

import h5py
import numpy as np
import pytest

from fm.data.indexed import IndexedDataset

RECORDS = [{"input": "", "output": "first line"}, {"input": "q", "output": "中文 second"},
           {"input": "", "output": ""}, {"input": "x", "output": "last", "extra": [1, 2]}]


def _write_dir(path, records, *, upstream=False, h5=True, text=True, chunked=False, name="index", meta=None):
    os.makedirs(path, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    with open(os.path.join(path, "data.jsonl"), "wb") as f:
        f.write(b"".join(lines))
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    if upstream:
        offsets = offsets[1:]  # upstream wrote the end offsets only
    if text:
        with open(os.path.join(path, name), "w") as f:
            f.writelines(f"{int(v)}\n" for v in offsets)
    if h5:
        with h5py.File(os.path.join(path, name + ".h5"), "w") as f:
            if chunked:
                f.create_dataset("index", data=offsets, chunks=(2,), compression="gzip")
            else:
                f.create_dataset("index", data=offsets)
    if meta is not None:
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)
    return lines


@pytest.mark.parametrize("upstream", [False, True])
@pytest.mark.parametrize("layout", ["h5", "text", "chunked"])
def test_every_line_read(tmp_path, upstream, layout):
    lines = _write_dir(tmp_path, RECORDS, upstream=upstream, h5=layout != "text", text=layout == "text",
                       chunked=layout == "chunked")
    ds = IndexedDataset(str(tmp_path))
    assert ds.upstream_format is upstream
    assert ds.index_source == {"h5": "h5-mmap", "text": "text", "chunked": "h5-read"}[layout]
    assert len(ds) == len(RECORDS)
    assert [ds[i] for i in range(len(ds))] == [x[:-1] for x in lines]
    assert ds[0] == lines[0][:-1]  # upstream lost this line
    assert [ds.record(i) for i in range(len(ds))] == RECORDS
    assert ds[-1] == lines[-1][:-1]
    assert ds[1:3] == [x[:-1] for x in lines[1:3]]
    assert ds[:] == [x[:-1] for x in lines]
    assert ds[::2] == [x[:-1] for x in lines[::2]]
    assert ds[3:1] == []
    assert ds.meta == {}
    assert list(ds) == [x[:-1] for x in lines]
    with pytest.raises(IndexError):
        ds[len(RECORDS)]


def test_h5_is_memory_mapped(tmp_path):
    _write_dir(tmp_path, RECORDS)
    ds = IndexedDataset(str(tmp_path))
    assert isinstance(ds._off, np.memmap)


def test_h5_preferred_over_text(tmp_path):
    _write_dir(tmp_path, RECORDS)
    with open(tmp_path / "index", "w") as f:
        f.write("garbage\n")
    assert IndexedDataset(str(tmp_path)).record(0) == RECORDS[0]


def test_custom_index_name_and_meta(tmp_path):
    meta = {"language": "en", "nlines": 4, "index_name": "myidx", "hdfs_path": "myidx"}
    _write_dir(tmp_path, RECORDS, name="myidx", meta=meta)
    ds = IndexedDataset(str(tmp_path))
    assert ds.index_name == "myidx" and ds.meta == meta and len(ds) == 4


def test_upstream_hdfs_path_meta(tmp_path):
    # Upstream meta.json names an HDFS directory; the files are still called ``index``.
    meta = {"language": "zh", "hdfs_path": "/user/tc_agi/llm/index_datasets/mydata"}
    _write_dir(tmp_path, RECORDS, upstream=True, meta=meta)
    ds = IndexedDataset(str(tmp_path))
    assert ds.index_name == "index" and len(ds) == 4 and ds.record(0) == RECORDS[0]


def test_empty_dataset(tmp_path):
    _write_dir(tmp_path, [])
    assert len(IndexedDataset(str(tmp_path))) == 0


def test_pickle_reopens(tmp_path):
    _write_dir(tmp_path, RECORDS)
    ds = IndexedDataset(str(tmp_path))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 500
    assert [clone.record(i) for i in range(4)] == RECORDS


def test_mismatched_index_is_an_error(tmp_path):
    _write_dir(tmp_path, RECORDS)
    with open(tmp_path / "data.jsonl", "ab") as f:
        f.write(b'{"output": "appended"}\n')
    with pytest.raises(ValueError, match="does not belong"):
        IndexedDataset(str(tmp_path))


def test_bad_text_index(tmp_path):
    _write_dir(tmp_path, RECORDS, h5=False)
    with open(tmp_path / "index", "w") as f:
        f.write("0\n5\nxx\n")
    with pytest.raises(ValueError, match="line 3|not a list of integers"):
        IndexedDataset(str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.jsonl"):
        IndexedDataset(str(tmp_path))
    (tmp_path / "data.jsonl").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="index"):
        IndexedDataset(str(tmp_path))


@pytest.mark.parametrize("upstream", [False, True])
def test_offsets_and_get_many(tmp_path, upstream):
    lines = _write_dir(tmp_path, RECORDS, upstream=upstream)
    ds = IndexedDataset(str(tmp_path))
    want = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).tolist()
    assert ds.offsets.tolist() == want
    assert ds.get_many([3, 0, -1, 1]) == [lines[i][:-1] for i in (3, 0, 3, 1)]
    assert ds.get_many(np.array([], dtype=np.int64)) == []
    with pytest.raises(IndexError):
        ds.get_many([0, 4])
    with pytest.raises(IndexError):
        ds.get_many([-5])


def test_last_line_without_newline_upstream(tmp_path):
    # Upstream copied input bytes as they were: the last line of data.jsonl may lack its newline.
    _write_dir(tmp_path, RECORDS[:1], upstream=True, h5=False)
    data = (tmp_path / "data.jsonl").read_bytes()[:-1]
    (tmp_path / "data.jsonl").write_bytes(data)
    (tmp_path / "index").write_text(f"{len(data)}\n")
    ds = IndexedDataset(str(tmp_path))
    assert ds[0] == data and ds.record(0) == RECORDS[0]


def test_reads_after_fork(tmp_path):
    import multiprocessing as mp

    _write_dir(tmp_path, RECORDS)
    ds = IndexedDataset(str(tmp_path))
    ds[0]  # map the data file in the parent first
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_all, (ds,)) == RECORDS


def _read_all(ds):
    return [ds.record(i) for i in range(len(ds))]
