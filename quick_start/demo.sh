#!/usr/bin/env bash
# The whole workflow on an embedded demo corpus, on CPU, in a few minutes (`fm demo`, see fm/demo.py):
#   1. build a ~2.4 MB English corpus from the Python standard library's own documentation
#   2. txt -> jsonl -> index (plus the shipped bilingual instruction file)
#   3. mixture loader statistics
#   4. train the tiny dragonfly with 2 processes (FSDP2 on gloo), tensorboard, checkpoint, loss curve
#   5. a generated sample from the last checkpoint
# Outputs go to demo_out/ in the checkout (dataset_configs/demo.json reads its index from there). Set
# DEMO_SKIP_TRAIN=1 to stop after step 3; other arguments go to `fm demo` (--train-iters N, --nproc N).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=quick_start/_env.sh
source quick_start/_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
args=(--out demo_out)
if [ "${DEMO_SKIP_TRAIN:-0}" = "1" ]; then
  args+=(--skip-train)
fi
exec fm demo "${args[@]}" "$@"
