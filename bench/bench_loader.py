"""Loader throughput against SentencePiece alone, and worker memory against dataset size. Prints figures.

    python bench/bench_loader.py [--mb 2.4] [--rows 3000] [--max-length 512] [--batch-size 4] [--hf-only]

* throughput: packed tokens/s of one stream (the work of one DataLoader worker, run in-process) against
  SentencePiece alone on the same texts in the same run (its faster output form, in calls as large as the
  loader's); the ratio is the figure to watch (target ≥ 0.8:
  reading, JSON, transform, permutation and packing together cost ≤ 25% over tokenization).
* Hugging Face tokenizer: the same with a byte-level BPE ``tokenizer.json`` of the demo tokenizer's vocabulary
  size (8,000, trained on the demo corpus in the run: tests/support/hf_fixtures.py) against the ``tokenizers``
  library's own ``encode_batch`` on the same lines, in calls as large as the loader's (target ≥ 0.8), under each
  parallelism setting: ``TOKENIZERS_PARALLELISM=false`` (what the loader's worker processes set) and unset (the
  library's batch calls use its thread pool; the in-process loader encodes one text per call).
* memory: RSS of a fresh process that produces the same number of rows from a dataset of size S and of 8·S
  (should not grow with S: offsets are memory-mapped, the line order is a Feistel permutation, O(1) memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENIZER = os.path.join(ROOT, "quick_start", "tokenizer.model")


def build_dataset(tmp: str, copies: int) -> str:
    """The demo corpus as an index directory (plain text, one document per paragraph group), ``copies`` times."""
    txt = os.path.join(tmp, "corpus.txt")
    if not os.path.exists(txt):
        subprocess.run([sys.executable, os.path.join(ROOT, "quick_start", "build_demo_corpus.py"), txt],
                       check=True, capture_output=True)
    docs = [d.strip() for d in re.split(r"\n\s*\n", open(txt, encoding="utf-8").read()) if d.strip()]
    out = os.path.join(tmp, f"x{copies}")
    os.makedirs(out, exist_ok=True)
    offsets = [0]
    with open(os.path.join(out, "data.jsonl"), "wb") as f:
        for c in range(copies):
            for d in docs:
                line = (json.dumps({"input": "", "output": d if c == 0 else f"{c} {d}"}, ensure_ascii=False)
                        + "\n").encode()
                f.write(line)
                offsets.append(offsets[-1] + len(line))
    import h5py
    import numpy as np

    with h5py.File(os.path.join(out, "index.h5"), "w") as h:
        h.create_dataset("index", data=np.asarray(offsets, dtype=np.int64))
    with open(os.path.join(out, "index"), "w") as f:
        f.write("\n".join(map(str, offsets)) + "\n")
    cfg = os.path.join(tmp, f"mix{copies}.json")
    with open(cfg, "w") as f:
        json.dump([{"task_name": "corpus", "abs_weight": 1, "path": out,
                    "transforms": os.path.join(ROOT, "dataset_configs", "transforms", "script_cpmc.py")}], f)
    return cfg


def encode_only(cfg: str, tok, seconds: float = 3.0) -> float:
    """tokens/s (CPU time) of SentencePiece alone on the dataset's texts, in calls of as many lines as the loader
    makes (``refill_lines``); the better of list output (``encode_batch``, SentencePiece's default threads)
    and int32 arrays in one thread (``encode_batch_arrays``, what the loader calls)."""
    from fm.data.indexed import IndexedDataset
    from fm.data.sources import refill_lines

    path = json.load(open(cfg))[0]["path"]
    ds = IndexedDataset(path)
    texts = [ds.record(i)["output"] for i in range(min(len(ds), 20000))]
    step = refill_lines(ds)
    best = 0.0
    for enc in (tok.encode_batch, tok.encode_batch_arrays):
        tokens, start = 0, time.process_time()
        while time.process_time() - start < seconds / 2:
            for i in range(0, len(texts), step):
                tokens += sum(map(len, enc(texts[i:i + step])))
        best = max(best, tokens / (time.process_time() - start))
    return best


def loader_speed(cfg: str, tok, rows: int, batch_size: int, max_length: int, workers: int = 0) -> float:
    from fm.data.loader import build_train_loader

    ld = build_train_loader(cfg, tok, batch_size=batch_size, max_length=max_length, num_workers=workers)
    it = iter(ld)
    for _ in range(1 + workers):  # warm-up (one-time imports, worker start) is not throughput
        next(it)
    # CPU time of this process for one stream (other jobs on the machine do not count); wall time with workers
    clock = time.process_time if workers == 0 else time.perf_counter
    tokens, n, start = 0, 0, clock()
    for b in it:
        tokens += b["num_tokens"]
        n += batch_size
        if n >= rows:
            break
    return tokens / (clock() - start)


def hf_tokenizer(tmp: str, cfg: str, vocab_size: int = 8000):
    """A byte-level BPE tokenizer directory of ``vocab_size`` trained on the benchmark's corpus."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from fm.data.indexed import IndexedDataset
    from fm.tokenizer import load_tokenizer
    from tests.support.hf_fixtures import build_hf_tokenizer

    ds = IndexedDataset(json.load(open(cfg))[0]["path"])
    texts = [ds.record(i)["output"] for i in range(len(ds))]
    return load_tokenizer(build_hf_tokenizer(os.path.join(tmp, "hf"), vocab_size=vocab_size, texts=texts))


def hf_encode_only(cfg: str, enc, seconds: float = 3.0) -> float:
    """tokens/s (CPU time, all threads) of the ``tokenizers`` library alone (``enc``: its ``encode_batch`` or
    ``encode_batch_fast``, no offsets) on the dataset's texts, in calls of as many lines as the loader makes."""
    from fm.data.indexed import IndexedDataset
    from fm.data.sources import refill_lines

    ds = IndexedDataset(json.load(open(cfg))[0]["path"])
    texts = [ds.record(i)["output"] for i in range(min(len(ds), 20000))]
    step = refill_lines(ds)
    tokens, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for i in range(0, len(texts), step):
            tokens += sum(len(e.ids) for e in enc(texts[i:i + step], add_special_tokens=False))
    return tokens / (time.process_time() - start)


class parallelism:  # noqa: N801 - a context manager, like open()
    """``TOKENIZERS_PARALLELISM`` set to ``value`` (None: unset) inside the block (the library reads it at every
    batch call; this benchmark runs one Python thread)."""

    def __init__(self, value: str | None):
        self.value = value

    def __enter__(self) -> None:
        self.old = os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if self.value is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = self.value

    def __exit__(self, *exc) -> None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        if self.old is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = self.old


HF_SETTINGS = (
    ("false", "pool off (TOKENIZERS_PARALLELISM=false, what loader workers set): batch calls in one thread"),
    (None, "variable unset: the library's batch calls use its pool; the loader (threads=1) encodes one text per call"),
)


def hf_section(tmp: str, cfg: str, args: argparse.Namespace) -> None:
    tok = hf_tokenizer(tmp, cfg)
    print(f"HF tokenizer.json, {tok.vocab_size:,} tokens; CPU time of all threads; median of 5 interleaved runs")
    for value, label in HF_SETTINGS:
        runs = []
        with parallelism(value):
            for _ in range(5):  # interleaved, as above; the median by the ratio to encode_batch
                runs.append((hf_encode_only(cfg, tok.tk.encode_batch, seconds=1.0),
                             hf_encode_only(cfg, tok.tk.encode_batch_fast, seconds=1.0),
                             loader_speed(cfg, tok, args.rows, args.batch_size, args.max_length)))
        runs.sort(key=lambda r: r[2] / r[0])
        batch, fast, one = runs[len(runs) // 2]
        r1, r2 = sorted(r[2] / r[0] for r in runs), sorted(r[2] / r[1] for r in runs)
        print(f"  {label}")
        print(f"    encode_batch alone      : {batch:>12,.0f} tokens/s")
        print(f"    encode_batch_fast alone : {fast:>12,.0f} tokens/s (no offsets)")
        print(f"    loader, one stream      : {one:>12,.0f} packed tokens/s = {one / batch:.2f} x encode_batch "
              f"(range {r1[0]:.2f}-{r1[-1]:.2f}), {one / fast:.2f} x encode_batch_fast "
              f"(range {r2[0]:.2f}-{r2[-1]:.2f})")


def child_rss(cfg: str, rows: int, batch_size: int, max_length: int) -> None:
    from fm.tokenizer import Tokenizer

    loader_speed(cfg, Tokenizer(TOKENIZER), rows, batch_size, max_length)
    status = open("/proc/self/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    print(json.dumps({"rss_kb": rss, "peak_kb": hwm}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hf-only", action="store_true", help="only the Hugging Face tokenizer figures")
    p.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_rss(args.child[0], args.rows, args.batch_size, args.max_length)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fm.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hf_only:
            hf_section(tmp, build_dataset(tmp, 1), args)
            return
        small, large = build_dataset(tmp, 1), build_dataset(tmp, 8)
        # Interleave the two measurements so machine load affects both alike; report the median of 5 pairs.
        pairs = []
        for _ in range(5):
            pairs.append((encode_only(small, tok, seconds=1.5),
                          loader_speed(small, tok, args.rows, args.batch_size, args.max_length)))
        pairs.sort(key=lambda p: p[1] / p[0])
        enc, one = pairs[len(pairs) // 2]
        ratios = [p[1] / p[0] for p in pairs]
        print(f"SentencePiece encode alone       : {enc:>12,.0f} tokens/s")
        print(f"loader, one stream (per worker)  : {one:>12,.0f} packed tokens/s = {one / enc:.2f} x encode "
              f"(median of 5 paired runs; range {ratios[0]:.2f}-{ratios[-1]:.2f})")
        hf_section(tmp, small, args)
        two = loader_speed(small, tok, args.rows * 2, args.batch_size, args.max_length, workers=2)
        print(f"loader, 2 DataLoader workers     : {two:>12,.0f} packed tokens/s (machine has {os.cpu_count()} cores)")
        for name, cfg in (("1x", small), ("8x", large)):
            out = subprocess.run([sys.executable, __file__, "--child", cfg, "--rows", str(args.rows),
                                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            size = os.path.getsize(os.path.join(json.load(open(cfg))[0]["path"], "data.jsonl")) / 1e6
            print(f"RSS after {args.rows} rows, dataset {name} ({size:6.1f} MB): {r['rss_kb'] / 1024:7.1f} MB "
                  f"(peak {r['peak_kb'] / 1024:.1f} MB)")


if __name__ == "__main__":
    main()
