"""``python -m fm.train``: the training worker (see :mod:`fm.train.cli`)."""

import sys

from fm.train.cli import main

sys.exit(main())
