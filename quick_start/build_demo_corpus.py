#!/usr/bin/env python
"""Build the demo corpus from Python's own documentation. Same as ``python -m fm.data.demo_corpus OUT.txt``
(``fm demo`` runs it)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fm.data.demo_corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
