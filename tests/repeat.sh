#!/usr/bin/env bash
# Run one test (a file, a node id or a -k expression's file) N times and count the runs that failed: a test that
# fails once in N is a defect to find, never one to retry. Each run's output is kept under the folder it prints.
#   bash tests/repeat.sh tests/distributed/test_bmtrain_trainer.py 10
#   bash tests/repeat.sh "tests/distributed/test_trainer.py::test_resume_after_sigkill" 10 -x
# Extra arguments after N go to pytest. Exit status: 0 when every run passed, else 1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash tests/repeat.sh TEST N [pytest args...]" >&2
  exit 2
fi
test=$1 n=$2
shift 2
source quick_start/_env.sh
source tests/_dev_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
logs=$(mktemp -d "${TMPDIR:-/tmp}/fm-repeat.XXXXXX")
failed=0
for i in $(seq 1 "$n"); do
  start=$SECONDS
  if python -m pytest -q -p no:cacheprovider "$test" "$@" > "$logs/run-$i.log" 2>&1; then
    verdict=passed
  else
    verdict=FAILED
    failed=$((failed + 1))
  fi
  echo "run $i/$n: $verdict in $((SECONDS - start)) s ($(tail -n 1 "$logs/run-$i.log"))"
done
echo "$test: $failed failed of $n runs (logs: $logs)"
[ "$failed" -eq 0 ]
