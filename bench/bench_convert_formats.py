"""Converter throughput on .jsonl.gz, .jsonl.zst and Parquet vs the same text as plain jsonl, in the same run.

    python bench/bench_convert_formats.py [--mb 40] [--dir /tmp/fm_bench_convert_formats] [--repeat 5]
    python bench/bench_convert_formats.py --tokenizer demo --mb 4     # the tokenizing converter

The corpus is bench_convert's random-word English jsonl; the .gz (level 6), .zst (level 3) and Parquet
(snappy, row groups of 10 000 rows, columns input/output) files hold the same records, so every conversion
writes the same data.jsonl. Figures (MB/s of the jsonl text, wall clock, best of ``--repeat`` alternating
runs, and the ratio of the medians of pairs) for one file at ``--workers 1`` and for the corpus cut in four
files at ``--workers 2``. The references measure, in this process, what reading each format costs alone
(decompressing with isal / zstandard, or turning Parquet rows into jsonl), which bounds the converter. With
``--workers 1`` on a machine with a second core, the converter reads in a background thread: the figure then
depends on that core being idle (docs/benchmarks-convert.md).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import time

import msgspec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import make_corpus  # noqa: E402

from fm.data._convert_sources import gzip_blocks, parquet_blocks, zstd_blocks  # noqa: E402
from fm.data.convert import Options, convert  # noqa: E402

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")


def write_formats(src: str, base: str, raw: bytes) -> None:
    """``base + "." + fmt`` for each format, holding the records of ``raw`` (kept between runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    if not os.path.exists(base + ".jsonl"):
        shutil.copyfile(src, base + ".jsonl.tmp")
        os.replace(base + ".jsonl.tmp", base + ".jsonl")
    if not os.path.exists(base + ".jsonl.gz"):
        with open(base + ".tmp", "wb") as f:
            f.write(gzip.compress(raw, 6, mtime=0))
        os.replace(base + ".tmp", base + ".jsonl.gz")
    if not os.path.exists(base + ".jsonl.zst"):
        with open(base + ".tmp", "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(raw))
        os.replace(base + ".tmp", base + ".jsonl.zst")
    if not os.path.exists(base + ".parquet"):
        table = pa.Table.from_pylist(msgspec.json.Decoder().decode_lines(raw))
        pq.write_table(table, base + ".tmp", row_group_size=10_000)
        os.replace(base + ".tmp", base + ".parquet")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


TOKENIZER: str | None = None  # --tokenizer: convert with exact token counts (the tokenizing converter)


def run_convert(path: str, out: str, workers: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    convert(path, out, Options(language="en", workers=workers, progress=False, fsync=False, tokenizer=TOKENIZER))


def compare(name: str, paths: dict[str, str], out: str, workers: int, mb: float, repeat: int) -> dict[str, float]:
    """Alternating runs of jsonl and each format; prints best MB/s and the median per-pair ratio."""
    times: dict[str, list[float]] = {f: [] for f in FORMATS}
    for r in range(repeat):
        for fmt in FORMATS[1:]:
            order = ("jsonl", fmt) if r % 2 == 0 else (fmt, "jsonl")
            for f in order:
                times[f].append(timed(lambda f=f: run_convert(paths[f], out, workers)))
    jsonl = times["jsonl"]
    ratios = {}
    print(f"\n{name}")
    print(f"  {'jsonl':10s} {mb / min(jsonl):8.1f} MB/s (best)")
    for fmt in FORMATS[1:]:
        t = times[fmt]
        # the jsonl run paired with this format's run r is jsonl[r * 3 + k]: pair them in order of appearance
        k = FORMATS.index(fmt) - 1
        pairs = [jsonl[r * 3 + k] / t[r] for r in range(repeat)]
        ratios[fmt] = statistics.median(pairs)
        print(f"  {fmt:10s} {mb / min(t):8.1f} MB/s (best)   vs jsonl: {min(jsonl) / min(t):.2f}x best, "
              f"{ratios[fmt]:.2f}x median of {repeat} pairs")
    return ratios


def references(base: str, mb: float) -> None:
    import pyarrow.parquet as pq

    print("\nreferences (this process, one core): reading the format alone")
    nrg = pq.ParquetFile(base + ".parquet").metadata.num_row_groups
    for name, blocks in (("gzip decompress (isal)", lambda: gzip_blocks(base + ".jsonl.gz")),
                         ("zstd decompress", lambda: zstd_blocks(base + ".jsonl.zst")),
                         ("parquet rows -> jsonl", lambda: parquet_blocks(base + ".parquet", 0, nrg))):
        t = min(timed(lambda b=blocks: sum(len(x) for x, _ in b())) for _ in range(3))
        print(f"  {name:24s} {mb / t:8.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--dir", default="/tmp/fm_bench_convert_formats")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokenizer", help="convert with --tokenizer (e.g. demo): the same comparison when the converter "
                                        "tokenizes (use a smaller --mb: tokenizing runs at ~10 MB/s)")
    args = ap.parse_args()
    global TOKENIZER
    TOKENIZER = args.tokenizer
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"corpus-{args.mb:g}.jsonl")
    make_corpus(src, args.mb)
    with open(src, "rb") as f:
        raw = f.read()
    mb = len(raw) / 1e6
    one = os.path.join(args.dir, f"one-{args.mb:g}")
    write_formats(src, one, raw)
    # four shards, one directory per format (the converter reads the directory, in sorted order)
    cuts = [0]
    for k in range(1, 4):
        cuts.append(raw.index(b"\n", len(raw) * k // 4) + 1)
    cuts.append(len(raw))
    shard_dirs = {}
    for fmt in FORMATS:
        d = shard_dirs[fmt] = os.path.join(args.dir, f"shards-{args.mb:g}-{fmt.replace('.', '_')}")
        os.makedirs(d, exist_ok=True)
    for k in range(4):
        part = raw[cuts[k]:cuts[k + 1]]
        tmp = os.path.join(args.dir, f"part{k}.jsonl")
        if not all(os.path.exists(os.path.join(shard_dirs[f], f"part{k}.{f}")) for f in FORMATS):
            with open(tmp, "wb") as f:
                f.write(part)
            write_formats(tmp, os.path.join(args.dir, f"part{k}"), part)
            for fmt in FORMATS:
                os.replace(os.path.join(args.dir, f"part{k}.{fmt}"), os.path.join(shard_dirs[fmt], f"part{k}.{fmt}"))
    print(f"{mb:.1f} MB of jsonl text ({len(raw.splitlines())} lines); file sizes: "
          + ", ".join(f"{fmt} {os.path.getsize(one + '.' + fmt) / 1e6:.1f} MB" for fmt in FORMATS))
    out = os.path.join(args.dir, "out")
    compare("one file, --workers 1", {f: one + "." + f for f in FORMATS}, out, 1, mb, args.repeat)
    compare("four files, --workers 2", shard_dirs, out, 2, mb, args.repeat)
    references(one, mb)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
