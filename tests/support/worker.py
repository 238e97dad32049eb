"""Run a training script the way a test needs it: ``python tests/support/worker.py [OPTIONS] SCRIPT [ARGS...]``.

For processes a test does not start itself (torchrun's workers): ``torchrun ... worker.py --bmtrain-cpu --die-after 13
apps/fm9g_2b/pretrain_dragonfly.py --config ...`` (``tests.helpers.launch(..., bmtrain_cpu=True, faults=...)``).
Options, before SCRIPT:

* ``--bmtrain-cpu``: install :mod:`tests.support.bmtrain_cpu` before anything imports ``bmtrain``;
* ``--nan-steps R:I,...``, ``--die-after N``, ``--record-indexes DIR``: the fault callbacks of
  :mod:`tests.support.faults`, added to every run the script starts.

Then SCRIPT runs as ``python SCRIPT ARGS`` would: as ``__main__``, with ``sys.argv`` = [SCRIPT, ARGS...] and
SCRIPT's folder first on ``sys.path``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {}
    while argv and argv[0].startswith("--"):
        name = argv.pop(0)[2:]
        opts[name] = "" if name == "bmtrain-cpu" else argv.pop(0)
    return opts, argv


def main() -> None:
    opts, rest = _options(sys.argv[1:])
    if not rest:
        raise SystemExit(f"usage: {sys.argv[0]} [--bmtrain-cpu] [--nan-steps R:I,...] [--die-after N] "
                         "[--record-indexes DIR] SCRIPT [ARGS...]")
    script = Path(rest[0])
    sys.path[0] = str(ROOT)  # this file's folder is on sys.path in its place; the checkout holds tests.support
    if "bmtrain-cpu" in opts:
        from tests.support.bmtrain_cpu import install

        install()
    faults = []
    if opts:
        from tests.support import faults as f

        if "nan-steps" in opts:
            faults.append(f.NanLoss(f.parse_nan_steps(opts["nan-steps"])))
        if "die-after" in opts:
            faults.append(f.DieAfter(int(opts["die-after"])))
        if "record-indexes" in opts:
            faults.append(f.RecordIndexes(opts["record-indexes"]))
    if faults:
        import fm.train.callbacks as callbacks

        builtin = callbacks.default_callbacks
        callbacks.default_callbacks = lambda: [*builtin(), *faults]  # every run this process starts
    sys.path[0] = str(script.resolve().parent)
    sys.argv = rest
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
