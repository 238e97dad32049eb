#!/usr/bin/env bash
# Run the test suite. Sets up .venv (or uses the active virtualenv) on first use.
# Extra arguments go to pytest, e.g.  bash tests/run.sh tests/unit -k mixture
set -euo pipefail
cd "$(dirname "$0")/.."
source quick_start/_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest "${@:-tests}"
