#!/usr/bin/env python
"""Plain text (stdin) → jsonl (stdout), one ``{"input": "", "output": text}`` per document. Same as ``fm txt2jsonl``
(``fm.data.txt2jsonl``; ``--help`` there)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fm.data.txt2jsonl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
