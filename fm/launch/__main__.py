"""``python -m fm.launch ...`` (see :mod:`fm.launch`)."""

import sys

from fm.launch import main

sys.exit(main())
