"""Spark SFT jsonl → our index directory (the counterpart of Spark's ``preprocess_sft_data_iFlytekSpark.py``).

    python apps/spark_13b/preprocess_sft_data.py --raw_data_path "data/sft/*.json" \\
        --output_filepath data_index/spark_sft --tokenizer tokenizer.model [--language zh]

Reads ``{"input", "target"}`` (or ``{"input", "output"}``) records from json/jsonl files (one object per
line, or a JSON list), renames ``target`` to ``output`` (other fields are kept) and runs the standard
converter (``fm.data.convert``: data.jsonl + index + index.h5 + meta.json, bad lines reported).
``--seq_length`` is accepted and ignored: samples are packed to ``max_length`` at training time.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def input_files(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl") and f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(spec)) if any(c in spec for c in "*?[") else [p]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"--raw_data_path {spec!r}: no json/jsonl file found")
    return files


def records(path: Path) -> Iterator[tuple[int, object]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from enumerate(json.loads(text), 1)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                yield n, line  # passed through: the converter reports it as a bad line with its reason


def to_output_format(rec: object) -> object:
    if isinstance(rec, dict) and "target" in rec and "output" not in rec:
        rec = dict(rec)
        rec["output"] = rec.pop("target")
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="preprocess_sft_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw_data_path", "--raw-data-path", required=True, help="a json/jsonl file, a glob or a directory")
    p.add_argument("--output_filepath", "--output-filepath", "--output", required=True, help="index directory to write")
    p.add_argument("--tokenizer", help="SentencePiece model: exact token counts in meta.json")
    p.add_argument("--language", default="zh", choices=["zh", "en", "code"])
    p.add_argument("--seq_length", "--seq-length", type=int, help="ignored (packing happens at training time)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from fm.data.convert import main as convert_main

    tmp = Path(tempfile.mkdtemp(prefix="spark_sft_"))
    try:
        with open(tmp / "sft.jsonl", "w", encoding="utf-8") as out:
            for f in input_files(args.raw_data_path):
                for _, rec in records(f):
                    out.write((rec if isinstance(rec, str) else json.dumps(to_output_format(rec), ensure_ascii=False))
                              + "\n")
        cmd = ["--path", str(tmp), "--language", args.language, "--output", args.output_filepath]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        if args.overwrite:
            cmd.append("--overwrite")
        return int(convert_main(cmd) or 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
