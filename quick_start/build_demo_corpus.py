#!/usr/bin/env python
"""Build the demo corpus from Python's own documentation. Same as ``python -m fm.data.demo_corpus OUT.txt``
(``fm demo`` runs it)."""

import sys

from fm.data.demo_corpus import main

if __name__ == "__main__":
    sys.exit(main())
