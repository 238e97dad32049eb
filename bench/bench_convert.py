"""Converter throughput vs references measured in the same run (prints figures; no assertions).

    python bench/bench_convert.py [--mb 200] [--dir /tmp/fm_bench_convert] [--tokenizer-mb 20]
    python bench/bench_convert.py --scaling 1,2,4,8 [--json out.json]    # many-core hosts: a scaling table

Figures:
* references: read+write copy of the file, msgspec decode of every line (MB/s);
* converter without a tokenizer, --workers 1 and --workers 2 (MB/s of valid jsonl, ratio 2 vs 1);
* with --tokenizer: converter MB/s vs SentencePiece ``encode`` of the same output texts as one list call
  (and per line), on a smaller file because tokenizing is much slower than converting
  (figures: docs/benchmarks-convert.md).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import time

import msgspec

from fm.data.convert import Options, convert
from fm.tokenizer import DEFAULT_TOKENIZER


def make_corpus(path: str, mb: float, seed: int = 0) -> None:
    """Random-word English jsonl, documents of 20..400 words (pretraining-like: empty input)."""
    if os.path.isfile(path) and os.path.getsize(path) >= mb * 1e6:
        return
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(5000)]
    enc = msgspec.json.Encoder()
    target = int(mb * 1e6)
    written = 0
    with open(path + ".tmp", "wb") as f:
        while written < target:
            lines = []
            for _ in range(1000):
                text = " ".join(rng.choices(words, k=rng.randint(20, 400)))
                lines.append(enc.encode({"input": "", "output": text}))
            block = b"\n".join(lines) + b"\n"
            f.write(block)
            written += len(block)
    os.replace(path + ".tmp", path)


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(n: int, fn, setup=lambda: None) -> tuple[float, float]:
    """Best (wall seconds, CPU seconds of this process and its children) over ``n`` runs (``setup`` untimed)."""
    runs = []
    for _ in range(n):
        setup()
        t, c = time.perf_counter(), _cpu()
        fn()
        runs.append((time.perf_counter() - t, _cpu() - c))
    return min(runs)


def row(name: str, mb: float, t: tuple[float, float], extra: str = "") -> None:
    print(f"{name:32s} {mb / t[0]:8.1f} MB/s wall {mb / t[1]:8.1f} MB/cpu-s {extra}")


def copy_ref(src: str, dst: str) -> None:
    with open(src, "rb") as a, open(dst, "wb") as b:
        while block := a.read(16 << 20):
            b.write(block)


BLOCK = 1 << 20  # the converter's chunk size


def _decode_range(args: tuple[str, int, int]) -> int:
    """Decode every line of ``src[start:end]`` with msgspec, in 1 MB blocks (lines cut at a block edge fail to
    decode and are passed over: fine for a speed reference)."""
    src, start, end = args
    dec = msgspec.json.Decoder().decode
    n = 0
    with open(src, "rb") as f:
        f.seek(start)
        while f.tell() < end:
            block = f.read(min(BLOCK, end - f.tell()))
            for line in block.split(b"\n"):
                try:
                    dec(line)
                    n += 1
                except msgspec.DecodeError:
                    pass
    return n


def msgspec_ref(src: str, procs: int) -> None:
    """The decode reference, the file split over ``procs`` processes: how well this machine runs two at once on
    a memory-heavy job like the converter's."""
    size = os.path.getsize(src)
    ranges = [(src, size * k // procs, size * (k + 1) // procs) for k in range(procs)]
    if procs == 1:
        _decode_range(ranges[0])
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_range, ranges)


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def cpu_ref(procs: int, n: int = 20_000_000) -> None:
    """Pure interpreter work (no memory traffic), ``n`` iterations per process: do the cores scale at all?"""
    if procs == 1:
        _spin(n)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_spin, [n] * procs)


def paired(repeat: int, one, two, setup=lambda: None) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Run ``one`` and ``two`` alternately ``repeat`` times each (order swapped every round, ``setup`` untimed
    before each run). Returns the best (wall, CPU) of each and the median of the per-round wall ratios, which
    is robust to the bursts of a shared machine."""
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(repeat):
        for k in ((1, 2) if r % 2 == 0 else (2, 1)):
            setup()
            t, c = time.perf_counter(), _cpu()
            (one if k == 1 else two)()
            runs[k].append((time.perf_counter() - t, _cpu() - c))
    ratios = sorted(a[0] / b[0] for a, b in zip(runs[1], runs[2]))
    return min(runs[1]), min(runs[2]), ratios[len(ratios) // 2]


def run_convert(src: str, out: str, workers: int, tokenizer: str | None = None, fsync: bool = True) -> None:
    convert(src, out, Options(language="en", workers=workers, tokenizer=tokenizer, progress=False, fsync=fsync))


def scaling(src: str, out: str, size: float, workers: list[int], repeat: int, json_path: str | None) -> None:
    """Best-of-``repeat`` throughput for each worker count and the speed-up over the first count."""
    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    rows = []
    for w in workers:
        t = best_of(repeat, lambda w=w: run_convert(src, out, w), clean)
        rows.append({"workers": w, "seconds": t[0], "mb_per_s": size / t[0]})
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        print(f"convert --workers {r['workers']:<3d} {r['mb_per_s']:8.1f} MB/s   speed-up vs {workers[0]}: "
              f"{r['speedup']:.2f}x")
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump({"corpus_mb": size, "cpus": os.cpu_count(), "repeat": repeat, "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--tokenizer-mb", type=float, default=20)
    ap.add_argument("--dir", default="/tmp/fm_bench_convert")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--scaling", help="only a scaling table over these worker counts, e.g. 1,2,4,8 (many-core hosts)")
    ap.add_argument("--json", help="with --scaling: also write the table to this JSON file")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    src = os.path.join(args.dir, f"corpus_{args.mb:g}mb.jsonl")
    make_corpus(src, args.mb)
    size = os.path.getsize(src) / 1e6
    out = os.path.join(args.dir, "out")
    print(f"corpus: {src} ({size:.0f} MB), cpus: {os.cpu_count()}")
    if args.scaling:
        scaling(src, out, size, [int(w) for w in args.scaling.split(",")], args.repeat, args.json)
        return

    print(f"load average before: {os.getloadavg()}")

    def clean() -> None:
        """Untimed before each run: remove the last output (not part of a conversion) and
        flush the file system, so the journal commit of that removal (and, on a ``discard`` mount, the TRIM
        of the freed blocks) happens now rather than inside the next timed run."""
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    copy_dst = os.path.join(args.dir, "copy.tmp")
    t_copy = best_of(args.repeat, lambda: copy_ref(src, copy_dst))
    os.unlink(copy_dst)
    c1, c2, c_ratio = paired(args.repeat, lambda: cpu_ref(1), lambda: cpu_ref(2))
    m1, m2, m_ratio = paired(args.repeat, lambda: msgspec_ref(src, 1), lambda: msgspec_ref(src, 2))
    t1n = best_of(args.repeat, lambda: run_convert(src, out, 1, fsync=False), clean)
    t1, t2, ratio = paired(args.repeat, lambda: run_convert(src, out, 1), lambda: run_convert(src, out, 2), clean)
    print(f"(speed-ups: best of each / median of {args.repeat} alternating pairs)")
    print(f"reference pure-CPU loop, 2 procs: speed-up {2 * c1[0] / c2[0]:.2f}x (two processes doing twice "
          f"the work; median {2 * c_ratio:.2f}x)")
    row("reference read+write copy", size, t_copy)
    row("reference msgspec decode", size, m1)
    row("reference msgspec decode, 2 procs", size, m2, f"speed-up: {m1[0] / m2[0]:.2f}x (median {m_ratio:.2f}x)")
    row("convert --workers 1", size, t1, f"= {t_copy[0] / t1[0]:.2f}x the copy")
    row("convert --workers 1 --no-fsync", size, t1n)
    row("convert --workers 2", size, t2, f"speed-up vs 1 worker: {t1[0] / t2[0]:.2f}x (median {ratio:.2f}x)")
    # The CPU split shows what the speed-up would be with two cores to itself: this process converts the pieces it
    # takes and does the serial work (split, index files, fsync), the worker process the pieces it takes.
    clean()
    me0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    run_convert(src, out, 2)
    me1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    parent = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    worker = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    print(f"--workers 2 CPU: this process {parent:.2f} s (its pieces + serial work), worker {worker:.2f} s; "
          f"projected speed-up on 2 idle cores: {t1[1] / max(parent, worker):.2f}x")

    # Tokenizer: a smaller corpus, same generator.
    tsrc = os.path.join(args.dir, f"corpus_{args.tokenizer_mb:g}mb.jsonl")
    make_corpus(tsrc, args.tokenizer_mb, seed=1)
    tsize = os.path.getsize(tsrc) / 1e6
    with open(tsrc, "rb") as f:
        texts = [msgspec.json.decode(line)["output"] for line in f]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    t_batch = best_of(1, lambda: sp.encode(texts))
    t_line = best_of(1, lambda: [sp.encode(t) for t in texts])
    tt1 = best_of(1, lambda: run_convert(tsrc, out, 1, args.tokenizer), clean)
    tt2 = best_of(1, lambda: run_convert(tsrc, out, 2, args.tokenizer), clean)
    print(f"tokenizer corpus: {tsize:.0f} MB ({args.tokenizer})")
    row("reference sp.encode(list)", tsize, t_batch)
    row("reference sp.encode per line", tsize, t_line)
    row("convert --tokenizer -j1", tsize, tt1, f"ratio vs sp.encode(list): {t_batch[0] / tt1[0]:.2f}")
    row("convert --tokenizer -j2", tsize, tt2, f"ratio vs sp.encode(list): {t_batch[0] / tt2[0]:.2f}")
    print(f"load average after: {os.getloadavg()}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
