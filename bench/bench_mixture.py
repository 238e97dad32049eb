"""Large mixtures: memory, first batch and throughput of a 1,200-dataset mixture against a 2-dataset one.

    python bench/bench_mixture.py [--datasets 1200] [--lines 2000] [--rows 4000] [--batch-size 4]
                                  [--max-length 512] [--no-transforms] [--repeat 3]

Each dataset holds ``--lines`` short lines of the demo corpus (a different slice per dataset) with the upstream
transform ``script_cpmc.py``; weights follow Zipf's law (the largest dataset ≈ 13 %, the smallest ≈ 0.01 %), as
in real mixtures of a few large corpora and many small ones. Each mixture runs in a fresh process (the loader of
one rank, no DataLoader worker: one loader process) and reports:

* peak RSS (VmHWM) and, at the end, anonymous RSS (memory beyond the memory maps of the datasets' files);
* the time from ``build_train_loader`` to the first batch;
* packed tokens/s (CPU time of the process) over the ``--rows`` rows after the first batch (the large mixture
  opens its datasets there), then over the next ``--rows`` rows: the steady state.

Targets (issue 17): 1,200 datasets ≤ 1 GB peak RSS, ≤ 0.3 MB anonymous RSS per dataset beyond the
2-dataset mixture's, first batch ≤ 3 s, steady tokens/s ≥ 0.8 × the 2-dataset mixture's, measured in the same
run. The figures the issue measured before the change are printed next to today's.
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

TRANSFORM = os.path.join(ROOT, "dataset_configs", "transforms", "script_cpmc.py")
# What issue 17 measured before the change (batch 4 × 512, shipped tokenizer, 2,000 short lines per dataset).
BEFORE = {2: "148k tokens/s", 1200: "2.1 GB after 400 rows, 4.6 GB after 4,000; 29 s for 400 rows (5.5k tokens/s)"}


def corpus_lines(tmp: str) -> list[str]:
    txt = os.path.join(tmp, "corpus.txt")
    from fm.data.demo_corpus import main as build_corpus

    build_corpus([txt])
    lines = [s.strip() for s in open(txt, encoding="utf-8") if len(s.strip()) >= 20]
    return lines


def write_dataset(out: str, lines: list[str]) -> None:
    """An index directory as the converter writes it (data.jsonl, index.h5, meta.json)."""
    import h5py
    import numpy as np

    from fm.data.convert import FORMAT_VERSION

    os.makedirs(out, exist_ok=True)
    data = "".join(json.dumps({"input": "", "output": s}, ensure_ascii=False) + "\n" for s in lines).encode()
    with open(os.path.join(out, "data.jsonl"), "wb") as f:
        f.write(data)
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
    with h5py.File(os.path.join(out, "index.h5"), "w") as h:
        h.create_dataset("index", data=np.concatenate([[0], ends]).astype(np.int64))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"nlines": len(lines), "nbytes": len(data), "format_version": FORMAT_VERSION,
                   "index_name": "index", "language": "en"}, f)


def build_mixture(tmp: str, corpus: list[str], count: int, nlines: int, transforms: bool) -> str:
    entries = []
    for i in range(count):
        path = os.path.join(tmp, "ds", f"d{i:05d}")
        if not os.path.isdir(path):
            start = (i * 7919) % max(1, len(corpus) - nlines)
            lines = (corpus * (1 + nlines // max(1, len(corpus))))[start:start + nlines]
            write_dataset(path, lines)
        entry = {"task_name": f"task{i:05d}", "abs_weight": 1.0 / (i + 1), "path": path}
        if transforms:
            entry["transforms"] = TRANSFORM
        entries.append(entry)
    cfg = os.path.join(tmp, f"mix{count}.json")
    with open(cfg, "w") as f:
        json.dump(entries, f)
    return cfg


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def child(cfg: str, rows: int, batch_size: int, max_length: int) -> None:
    from fm.data.loader import build_train_loader
    from fm.tokenizer import Tokenizer

    tok = Tokenizer("demo")
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, tok, batch_size=batch_size, max_length=max_length)
    it = iter(loader)
    next(it)
    first_s = time.perf_counter() - t0
    speeds = []
    for _ in range(2):  # the rows that open the datasets, then the steady state
        tokens, n, start = 0, 0, time.process_time()
        for b in it:
            tokens += b["num_tokens"]
            n += batch_size
            if n >= rows:
                break
        speeds.append(tokens / (time.process_time() - start))
    print(json.dumps({"first_s": first_s, "warmup_tokens_per_s": speeds[0], "tokens_per_s": speeds[1],
                      "peak_kb": _status("VmHWM"), "anon_kb": _status("RssAnon"),
                      "datasets_touched": sum(1 for s in loader.stats().values() if s["samples"])}))


def run_child(cfg: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", cfg, "--rows", str(args.rows), "--batch-size",
                          str(args.batch_size), "--max-length", str(args.max_length)],
                         check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=int, default=1200)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--no-transforms", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="interleaved pairs of runs (the median is reported)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.rows, args.batch_size, args.max_length)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_lines(tmp)
        t0 = time.perf_counter()
        small = build_mixture(tmp, corpus, 2, args.lines, not args.no_transforms)
        large = build_mixture(tmp, corpus, args.datasets, args.lines, not args.no_transforms)
        print(f"built {args.datasets} datasets of {args.lines} lines in {time.perf_counter() - t0:.1f} s; "
              f"batch {args.batch_size} x {args.max_length}, {args.rows} rows per mixture")
        # Interleaved pairs, so machine load affects both alike; the median pair (by ratio) is reported.
        pairs = sorted(((run_child(small, args), run_child(large, args)) for _ in range(args.repeat)),
                       key=lambda p: p[1]["tokens_per_s"] / p[0]["tokens_per_s"])
        a, b = pairs[len(pairs) // 2]
        ratios = [p[1]["tokens_per_s"] / p[0]["tokens_per_s"] for p in pairs]
    per_ds = (b["anon_kb"] - a["anon_kb"]) / 1024 / (args.datasets - 2)
    for count, r in ((2, a), (args.datasets, b)):
        print(f"{count:>5} datasets: peak RSS {r['peak_kb'] / 1024:7.1f} MB, "
              f"anonymous RSS {r['anon_kb'] / 1024:7.1f} MB, "
              f"first batch {r['first_s']:5.2f} s, first {args.rows} rows {r['warmup_tokens_per_s']:>9,.0f} tokens/s, "
              f"next {args.rows} rows (steady) {r['tokens_per_s']:>9,.0f} tokens/s, "
              f"{r['datasets_touched']} datasets drawn from")
        if count in BEFORE:
            print(f"{'':>5}   before (issue 17): {BEFORE[count]}")
    ratio = b["tokens_per_s"] / a["tokens_per_s"]
    print(f"per dataset beyond the 2-dataset mixture: {per_ds:.3f} MB anonymous RSS (target <= 0.3)")
    print(f"peak RSS {b['peak_kb'] / 1024:.0f} MB (target <= 1024), first batch {b['first_s']:.2f} s (target <= 3), "
          f"tokens/s ratio {ratio:.2f} x the 2-dataset mixture (target >= 0.8; median of {len(ratios)} interleaved "
          f"pairs, range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
