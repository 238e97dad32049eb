#!/usr/bin/env python
"""jsonl → index directory (data.jsonl, index, index.h5, meta.json). See --help and docs/data-preparation.md.

Same as ``python -m fm.data.convert``.
"""

import sys

from fm.data.convert import main

if __name__ == "__main__":
    sys.exit(main())
