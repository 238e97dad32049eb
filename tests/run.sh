#!/usr/bin/env bash
# Lint every file, then run the test suite. Sets up .venv (or uses the active virtualenv) on first use.
# Extra arguments go to pytest, e.g.  bash tests/run.sh tests/unit -k mixture
# Exit status: pytest's if it failed, else ruff's (a lint error fails the command after the tests ran).
set -euo pipefail
cd "$(dirname "$0")/.."
source quick_start/_env.sh
source tests/_dev_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
lint=0
python -m ruff check . || lint=$?
python -m pytest "${@:-tests}"
exit "$lint"
