#!/usr/bin/env python
"""jsonl → index directory (data.jsonl, index, index.h5, meta.json). See --help and docs/data-preparation.md.

Same as ``python -m fm.data.convert``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fm.data.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
