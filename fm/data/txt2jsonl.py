"""Plain text (stdin) → jsonl (stdout) for pretraining: one ``{"input": "", "output": text}`` per document.

    cat pretrain.txt | fm txt2jsonl > pretrain.jsonl          (or python quick_start/convert_txt2jsonl.py)
    cat book.txt | fm txt2jsonl --doc-sep blank > book.jsonl

``--doc-sep line`` (default, upstream behaviour): every non-blank line is a document.
``--doc-sep blank``: paragraphs separated by blank lines are documents (their lines joined with "\\n").
Blank lines are never written. Input is read as UTF-8; undecodable bytes are an error naming the line
(``--errors replace`` turns them into U+FFFD instead). Line endings (``\\n``, ``\\r\\n``) are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator


def documents(lines: Iterable[str], doc_sep: str = "line") -> Iterator[str]:
    """Documents from text lines (with or without their line endings)."""
    para: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if doc_sep == "line":
            if line.strip():
                yield line
            continue
        if line.strip():
            para.append(line)
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fm txt2jsonl", description=__doc__.split("\n\n")[0],
                                 epilog="example: cat pretrain.txt | fm txt2jsonl > pretrain.jsonl")
    ap.add_argument("inputs", nargs="*", metavar="FILE", help="text files, read in order (default: stdin)")
    ap.add_argument("-o", "--output", help="jsonl file to write, atomically (default: stdout)")
    ap.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                    help="line: each non-blank line is a document (default); blank: blank-line-separated paragraphs")
    ap.add_argument("--errors", choices=("strict", "replace"), default="strict",
                    help="invalid UTF-8 in the input: fail naming the line (default), or replace with U+FFFD")
    args = ap.parse_args(argv)
    for src in args.inputs:
        if not os.path.isfile(src):
            print(f"error: {src}: no such file", file=sys.stderr)
            return 1
    where = ["stdin", 0]

    def decoded() -> Iterator[str]:
        # Decode line by line (not through a TextIOWrapper) so an error names the right line.
        sources = args.inputs or [None]
        for src in sources:
            f = sys.stdin.buffer if src is None else open(src, "rb")  # noqa: SIM115 - closed below
            try:
                for lineno, raw in enumerate(f, 1):
                    where[:] = [src or "stdin", lineno]
                    yield raw.decode("utf-8", errors=args.errors)
            finally:
                if src is not None:
                    f.close()

    if args.output:
        from fm.io import atomic_write

        out_path = args.output
    n = 0
    try:
        if args.output:
            def write(f) -> None:
                nonlocal n
                for doc in documents(decoded(), args.doc_sep):
                    f.write((json.dumps({"input": "", "output": doc}, ensure_ascii=False) + "\n").encode())
                    n += 1

            atomic_write(out_path, write)
        else:
            stdout = open(sys.stdout.fileno(), "w", encoding="utf-8", newline="\n", closefd=False, buffering=1 << 20)
            try:
                for doc in documents(decoded(), args.doc_sep):
                    stdout.write(json.dumps({"input": "", "output": doc}, ensure_ascii=False) + "\n")
                    n += 1
            finally:
                stdout.flush()
    except UnicodeDecodeError as e:
        print(f"error: {where[0]} line {where[1]}: invalid UTF-8 ({e.reason}); fix the input or pass "
              "--errors replace", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except OSError as e:
        print(f"error: {e.filename or where[0]}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {n} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
