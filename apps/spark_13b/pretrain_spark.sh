#!/usr/bin/env bash
# Launch iFlytekSpark-13B pretraining with torchrun (same trainer and engines as dragonfly).
# Topology comes from the environment (defaults in brackets); hyperparameters live in the train config JSON, never here.
#   GPUS_PER_NODE  processes on this node   [GPUs: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi; else 1]
#   NNODES         number of machines       [1]
#   NODE_RANK      this machine's rank      [$RANK, else 0]   (0 = master, 1, 2, … = slaves)
#   MASTER_ENDPOINT master host name        [localhost]
#   MASTER_PORT    master port              [a free port on one node, else 12345]
#   TRAIN_CONFIG   train config JSON        [apps/spark_13b/train_configs/13b_pretrain.json]; a --config X.json argument
#                  given to this script replaces it
# Usage: bash apps/spark_13b/pretrain_spark.sh [--dry-run] [--key value …]
# Every --key value overrides one key of the train config, e.g. --train_iters 100 --engine fsdp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

dry_run=0
args=()
is_train_config() { [ -f "$1" ] && grep -qE '"(model_unique|train_iters|dataset_config)"' "$1"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --config|--train_config)
      if [ $# -gt 1 ] && { [ "$1" = --train_config ] || is_train_config "$2"; }; then TRAIN_CONFIG="$2"; else args+=("$1" "${2:-}"); fi
      [ $# -gt 1 ] && shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

TRAIN_CONFIG="${TRAIN_CONFIG:-apps/spark_13b/train_configs/13b_pretrain.json}"

# shellcheck source=quick_start/torchrun_cmd.sh
source quick_start/torchrun_cmd.sh
fm_torchrun_cmd apps/spark_13b/pretrain_spark.py --config "$TRAIN_CONFIG" ${args[@]+"${args[@]}"}
cmd=("${FM_TORCHRUN_CMD[@]}")

printf '%q ' "${cmd[@]}"
echo
if [ "$dry_run" = "1" ]; then
  exit 0
fi
# shellcheck disable=SC1091
source quick_start/_env.sh
exec "${cmd[@]}"
