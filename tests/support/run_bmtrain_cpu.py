"""Run a Python script with BMTrain on the CPU backend: ``python tests/support/run_bmtrain_cpu.py SCRIPT [ARGS...]``.

For processes a test does not start itself, e.g. torchrun's workers: ``torchrun ... run_bmtrain_cpu.py
apps/fm9g_2b/pretrain_dragonfly.py --config ...`` (``tests.helpers.launch(..., bmtrain_cpu=True)``). It installs
:mod:`tests.support.bmtrain_cpu` before anything imports ``bmtrain``, then runs SCRIPT as ``python SCRIPT ARGS``
would: as ``__main__``, with ``sys.argv`` = [SCRIPT, ARGS...] and SCRIPT's folder first on ``sys.path``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} SCRIPT [ARGS...]")
    script = Path(sys.argv[1])
    sys.path[0] = str(ROOT)  # this file's folder is on sys.path in its place; the checkout holds tests.support
    from tests.support.bmtrain_cpu import install

    install()
    sys.path[0] = str(script.resolve().parent)
    sys.argv = sys.argv[1:]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
