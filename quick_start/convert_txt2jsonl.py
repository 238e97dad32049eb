#!/usr/bin/env python
"""Plain text (stdin) → jsonl (stdout), one ``{"input": "", "output": text}`` per document. Same as ``fm txt2jsonl``
(``fm.data.txt2jsonl``; ``--help`` there)."""

import sys

from fm.data.txt2jsonl import main

if __name__ == "__main__":
    sys.exit(main())
