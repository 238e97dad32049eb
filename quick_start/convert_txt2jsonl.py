#!/usr/bin/env python
"""Plain text (stdin) → jsonl (stdout) for pretraining: one ``{"input": "", "output": text}`` per document.

    cat pretrain.txt | python quick_start/convert_txt2jsonl.py > pretrain.jsonl
    cat book.txt | python quick_start/convert_txt2jsonl.py --doc-sep blank > book.jsonl

``--doc-sep line`` (default, upstream behaviour): every non-blank line is a document.
``--doc-sep blank``: paragraphs separated by blank lines are documents (their lines joined with "\\n").
Blank lines are never written. Input is read as UTF-8; undecodable bytes are an error naming the line
(``--errors replace`` turns them into U+FFFD instead). Line endings (``\\n``, ``\\r\\n``) are removed.
"""

from __future__ import annotations

import argparse
import json
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: cat pretrain.txt | python quick_start/convert_txt2jsonl.py "
                                        "> pretrain.jsonl")
    ap.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                    help="line: each non-blank line is a document (default); blank: blank-line-separated paragraphs")
    ap.add_argument("--errors", choices=("strict", "replace"), default="strict",
                    help="invalid UTF-8 in the input: fail naming the line (default), or replace with U+FFFD")
    args = ap.parse_args(argv)
    stdout = open(sys.stdout.fileno(), "w", encoding="utf-8", newline="\n", closefd=False, buffering=1 << 20)
    bad_line = 0

    def decoded() -> Iterator[str]:
        # Decode line by line (not through a TextIOWrapper) so an error names the right line.
        nonlocal bad_line
        for lineno, raw in enumerate(sys.stdin.buffer, 1):
            try:
                yield raw.decode("utf-8", errors=args.errors)
            except UnicodeDecodeError:
                bad_line = lineno
                raise

    n = 0
    try:
        for doc in documents(decoded(), args.doc_sep):
            stdout.write(json.dumps({"input": "", "output": doc}, ensure_ascii=False) + "\n")
            n += 1
    except UnicodeDecodeError as e:
        stdout.flush()
        print(f"error: stdin line {bad_line}: invalid UTF-8 ({e.reason}); fix the input or pass "
              "--errors replace", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    stdout.flush()
    print(f"wrote {n} documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
